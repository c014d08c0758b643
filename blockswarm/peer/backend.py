"""The blocks a peer serves and their math, called from the peer's one compute thread (peer/scheduler.py).

Passes only read the weights; a training peer's optimizer writes them under `parameters_lock`, which every pass
holds. Passes without gradients use no_grad, not inference_mode: tensors cached by the blocks (rotary tables)
must stay usable by a later backward.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from blockswarm.models import KVCache, ModelConfig, SessionRows, TransformerBlock, step_block
from blockswarm.models.adapters import BlockAdapter
from blockswarm.models.quantization import block_memory_bytes
from blockswarm.peer.adapters import ReceivedAdapter

logger = logging.getLogger(__name__)

# TEST ONLY: a peer started with this variable set lies, adding Gaussian noise of this many times its outputs' standard
# deviation to every forward and inference output, so that tests and bench/verify.py can check that clients' spot
# checks catch it (LocalSwarm.start_peer(..., test_noise=...)). Never set it on a real peer.
TEST_NOISE_VARIABLE = "BLOCKSWARM_TEST_NOISE"


@dataclass
class DecodeStep:
    """One session's pending step for a batched tick (`BlockBackend.inference_steps`)."""

    start: int  # absolute index of the session's first block on this peer
    caches: list[KVCache]  # one per block of the session's span: blocks start .. start+len(caches)-1
    hidden: torch.Tensor  # [batch, seq_len, hidden]
    position: int
    adapter: ReceivedAdapter | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.caches)


class BlockBackend:
    def __init__(
        self,
        config: ModelConfig,
        blocks: list[TransformerBlock],
        start: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.config = config
        self.blocks = blocks
        self.start = start
        self.end = start + len(blocks)
        self.dtype = dtype
        self.device = device
        # bytes resident per served block (weights and quantization state), averaged over the span; fixed once loaded
        self.memory_per_block = sum(block_memory_bytes(block) for block in blocks) // len(blocks)
        # set on a peer started with --train: given the gradients w.r.t. the blocks' parameters (in the order of
        # `parameters()`) and the micro-batch size after each training backward pass; hands them to the stage
        self.learn: Callable[[list[torch.Tensor], int], None] | None = None
        # held while computing; a training peer makes it a real lock, under which its optimizer updates the blocks
        self.parameters_lock: threading.Lock | contextlib.nullcontext = contextlib.nullcontext()
        self.test_noise = float(os.environ.get(TEST_NOISE_VARIABLE) or 0.0)
        if self.test_noise:
            logger.warning("%s=%g: this peer LIES on purpose (a test helper)", TEST_NOISE_VARIABLE, self.test_noise)

    def make_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache.allocate(self.config, batch_size, max_length, self.dtype, self.device)

    def _span(self, start: int, end: int) -> list[TransformerBlock]:
        return self.blocks[start - self.start : end - self.start]

    @property
    def trainable(self) -> bool:
        return self.learn is not None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for block in self.blocks for p in block.parameters()]

    def inference_step(
        self,
        start: int,
        caches: list[KVCache],
        hidden: torch.Tensor,
        position: int,
        adapter: ReceivedAdapter | None = None,
    ) -> torch.Tensor:
        with torch.no_grad(), self.parameters_lock:
            hidden = hidden.to(self.device, self.dtype)
            blocks = self._span(start, start + len(caches))
            for block, cache, block_adapter in zip(blocks, caches, _per_block(adapter, len(blocks))):
                hidden = block(hidden, position=position, cache=cache, adapter=block_adapter)
            return self._maybe_lie(hidden.cpu())

    def inference_steps(self, steps: list[DecodeStep]) -> list[torch.Tensor]:
        """Outputs of each step, equal (1e-4 fp32) to `inference_step` of each alone; sessions sharing a block are
        computed together in it (one matmul per projection for all their rows), so a tick of many sessions costs
        little more than one. Every step is checked before any cache is written."""
        for step in steps:
            self._check_step(step)
        if len({id(cache) for step in steps for cache in step.caches}) != sum(len(step.caches) for step in steps):
            raise ValueError("two steps of one tick share a KV cache: a session may have one pending step per tick")
        with torch.no_grad(), self.parameters_lock:
            hiddens = [step.hidden.to(self.device, self.dtype) for step in steps]
            adapters = [_per_block(step.adapter, len(step.caches)) for step in steps]
            for index in range(min((s.start for s in steps), default=0), max((s.end for s in steps), default=0)):
                active = [i for i, step in enumerate(steps) if step.start <= index < step.end]
                sessions = [
                    SessionRows(
                        hiddens[i],
                        steps[i].position,
                        steps[i].caches[index - steps[i].start],
                        adapters[i][index - steps[i].start],
                    )
                    for i in active
                ]
                for i, output in zip(active, step_block(self.blocks[index - self.start], sessions)):
                    hiddens[i] = output
            return [self._maybe_lie(hidden.cpu()) for hidden in hiddens]

    def _check_step(self, step: DecodeStep) -> None:
        """Refuse a step that could not complete, before any session's cache of the tick is written."""
        if not (self.start <= step.start and step.end <= self.end and step.caches):
            raise ValueError(
                f"blocks [{step.start}, {step.end}) are not a non-empty part of [{self.start}, {self.end})"
            )
        if step.hidden.dim() != 3 or step.hidden.shape[1] < 1 or step.hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden states must be [batch, length, {self.config.hidden_size}], got {list(step.hidden.shape)}"
            )
        if step.adapter is not None and len(step.adapter.blocks) != len(step.caches):
            raise ValueError(f"the adapter has {len(step.adapter.blocks)} blocks for a span of {len(step.caches)}")
        batch, length = step.hidden.shape[:2]
        for cache in step.caches:
            if step.position < 0 or step.position + length > cache.max_length or cache.key.shape[0] != batch:
                raise ValueError(
                    f"cache holds batch {cache.key.shape[0]} x {cache.max_length} tokens, "
                    f"got batch {batch} at positions [{step.position}, {step.position + length})"
                )

    def forward(
        self, start: int, end: int, hidden: torch.Tensor, adapter: ReceivedAdapter | None = None
    ) -> torch.Tensor:
        with torch.no_grad(), self.parameters_lock:
            hidden = hidden.to(self.device, self.dtype)
            blocks = self._span(start, end)
            for block, block_adapter in zip(blocks, _per_block(adapter, len(blocks))):
                hidden = block(hidden, adapter=block_adapter)
            return self._maybe_lie(hidden.cpu())

    def backward(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        adapter: ReceivedAdapter | None = None,
        train: bool = False,
    ) -> list[torch.Tensor]:
        """Recomputes the forward pass from the inputs the client kept; returns d(loss)/d(inputs), then the
        gradients w.r.t. the adapter's tensors in wire order. With `train`, the blocks learn from it too."""
        blocks = self._span(start, end)
        leaves = adapter.leaves if adapter is not None else []
        params = self.parameters() if train else []
        with torch.enable_grad(), self.parameters_lock:
            inputs = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            outputs = inputs
            for block, block_adapter in zip(blocks, _per_block(adapter, len(blocks))):
                outputs = block(outputs, adapter=block_adapter)
            grads = torch.autograd.grad(
                outputs,
                [inputs, *leaves, *params],
                grad_output.to(self.device, self.dtype),
                allow_unused=True,
            )
        grad_input, adapter_grads, param_grads = grads[0], grads[1 : 1 + len(leaves)], grads[1 + len(leaves) :]
        if train:
            self.learn([torch.zeros_like(p) if g is None else g for p, g in zip(params, param_grads)], hidden.shape[0])
        return [grad_input.cpu()] + [
            (torch.zeros_like(leaf) if grad is None else grad).cpu() for leaf, grad in zip(leaves, adapter_grads)
        ]

    def _maybe_lie(self, outputs: torch.Tensor) -> torch.Tensor:
        """The outputs, or with TEST_NOISE_VARIABLE set (tests only), the outputs plus noise."""
        if not self.test_noise:
            return outputs
        return outputs + self.test_noise * outputs.float().std() * torch.randn_like(outputs)


def _per_block(adapter: ReceivedAdapter | None, num_blocks: int) -> list[BlockAdapter | None]:
    return adapter.blocks if adapter is not None else [None] * num_blocks
