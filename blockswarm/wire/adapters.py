"""How a client's adapter tensors (deep prompts, LoRA) travel after a request's activations, and their gradients
after a backward reply's: the same layout both ways, so the peer and the pipeline agree on what each tensor is."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockswarm.wire.messages import AdapterSpec
from blockswarm.wire.transport import encode

# adapter tensors and their gradients travel exactly: they are parameters, and what the client's optimizer steps on
ADAPTER_CODEC = "none"


@dataclass
class AdapterTensors:
    """Adapter tensors (or their gradients) of consecutive blocks.

    `prompts` [blocks, batch or 1, prompt_len, hidden] when the spec has deep prompts; `lora[i]` holds block i's
    [A, B] pairs in the order of `spec.lora_targets`. On the wire: prompts first, then each block's LoRA tensors.
    """

    spec: AdapterSpec
    prompts: torch.Tensor | None
    lora: list[list[torch.Tensor]]

    def sliced(self, begin: int, end: int) -> AdapterTensors:
        """Blocks [begin, end) of these, counted from this object's first block."""
        prompts = None if self.prompts is None else self.prompts[begin:end]
        return AdapterTensors(self.spec, prompts, self.lora[begin:end])

    def flat(self) -> list[torch.Tensor]:
        return ([] if self.prompts is None else [self.prompts]) + [t for block in self.lora for t in block]

    @classmethod
    def from_flat(cls, spec: AdapterSpec, num_blocks: int, tensors: list[torch.Tensor]) -> AdapterTensors:
        if len(tensors) != spec.num_tensors(num_blocks):
            raise ValueError(
                f"an adapter of {num_blocks} block(s) needs {spec.num_tensors(num_blocks)} tensors, got {len(tensors)}"
            )
        prompts = tensors[0] if spec.prompt_len else None
        rest = tensors[1:] if spec.prompt_len else tensors
        width = spec.lora_tensors_per_block
        lora = [rest[i * width : (i + 1) * width] for i in range(num_blocks)] if width else []
        return cls(spec, prompts, lora)

    def add_(self, begin: int, span: AdapterTensors) -> None:
        """Add `span` (e.g. one hop's gradients) into the blocks of these that it covers, from `begin` on."""
        if self.prompts is not None and span.prompts is not None:
            self.prompts[begin : begin + span.prompts.shape[0]] += span.prompts
        for own, other in zip(self.lora[begin:], span.lora):
            for target, value in zip(own, other):
                target += value

    def zeros_like(self) -> AdapterTensors:
        prompts = None if self.prompts is None else torch.zeros_like(self.prompts)
        return AdapterTensors(self.spec, prompts, [[torch.zeros_like(t) for t in block] for block in self.lora])


def adapter_payloads(adapter: AdapterTensors | None, begin: int, end: int) -> list[bytes]:
    """The encoded tensors of `adapter`'s blocks [begin, end), as they follow a request's activations."""
    return [] if adapter is None else encode(adapter.sliced(begin, end).flat(), ADAPTER_CODEC)
