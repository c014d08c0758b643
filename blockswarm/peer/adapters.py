"""A client's adapter tensors as received: checked against the served blocks, then turned into BlockAdapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockswarm.models import ModelConfig
from blockswarm.models.adapters import BlockAdapter, lora_shapes
from blockswarm.wire.adapters import AdapterTensors
from blockswarm.wire.messages import AdapterSpec


class AdapterError(ValueError):
    """The adapter sent with a request does not fit the served blocks; the message says how."""


@dataclass
class ReceivedAdapter:
    """`blocks[i]` applies to the span's i-th block; `leaves` are the received tensors in wire order (gradients
    w.r.t. them go back in that order)."""

    blocks: list[BlockAdapter]
    leaves: list[torch.Tensor]


def receive_adapter(
    spec: AdapterSpec,
    received: list[torch.Tensor],
    config: ModelConfig,
    num_blocks: int,
    batch_size: int,
    device: torch.device,
    requires_grad: bool = False,
) -> ReceivedAdapter:
    """Check a decoded adapter against the served blocks (`spec` itself, its LoRA targets included, was validated
    when it was read); with `requires_grad`, a backward pass can return gradients w.r.t. it."""
    tensors = [tensor.to(device, torch.float32).requires_grad_(requires_grad) for tensor in received]
    try:
        adapter = AdapterTensors.from_flat(spec, num_blocks, tensors)
    except ValueError as e:
        raise AdapterError(str(e)) from None
    if spec.lora_rank and not spec.lora_targets:
        raise AdapterError("lora_rank is set but lora_targets is empty")
    if adapter.prompts is not None:
        _check_shape("deep prompts", adapter.prompts, (num_blocks, None, spec.prompt_len, config.hidden_size))
        if adapter.prompts.shape[1] not in (1, batch_size):
            raise AdapterError(
                f"deep prompts must have batch dimension 1 or {batch_size}, got {adapter.prompts.shape[1]}"
            )
    try:
        shapes = {target: lora_shapes(config, target, spec.lora_rank) for target in spec.lora_targets}
    except ValueError as e:  # a target this model has no LoRA for
        raise AdapterError(str(e)) from None
    for block, tensors_of_block in enumerate(adapter.lora):
        for index, target in enumerate(spec.lora_targets):
            for tensor, shape, kind in zip(tensors_of_block[2 * index : 2 * index + 2], shapes[target], "AB"):
                _check_shape(f"LoRA {kind} of {target} in block {block} of the span", tensor, shape)
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise AdapterError("adapter tensors must be finite")
    blocks = [
        BlockAdapter(
            prompt=None if adapter.prompts is None else adapter.prompts[i],
            lora={
                target: (adapter.lora[i][2 * j], adapter.lora[i][2 * j + 1])
                for j, target in enumerate(spec.lora_targets)
            }
            if adapter.lora
            else {},
            lora_scale=spec.lora_scale,
        )
        for i in range(num_blocks)
    ]
    return ReceivedAdapter(blocks, tensors)


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    if tensor.dim() != len(expected) or any(e is not None and s != e for s, e in zip(tensor.shape, expected)):
        shown = ", ".join("*" if e is None else str(e) for e in expected)
        raise AdapterError(f"{name} must have shape [{shown}], got {list(tensor.shape)}")
