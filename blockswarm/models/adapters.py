"""What a client may add to a frozen block for one request or session: deep prompts and LoRA.

The block's own weights never change; the additions arrive with the client's request, so many clients can tune
different adapters through the same peer at once, and a replacement peer needs no setup.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from blockswarm.models.config import ModelConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def check_lora_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    """`targets` if every one is a projection LoRA can adapt; the one check that clients and peers share."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown} in lora_targets; choose from {', '.join(LORA_TARGETS)}")
    return targets


def lora_scaling(alpha: float, rank: int) -> float:
    """LoRA scales its delta by alpha / rank, so that changing the rank keeps the update's size."""
    return alpha / rank if rank else 0.0


def lora_shapes(config: ModelConfig, target: str, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of LoRA's (A, B) for one projection of a block: A [rank, in_features], B [out_features, rank]."""
    attention = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    features = {
        "q_proj": (config.hidden_size, attention),
        "k_proj": (config.hidden_size, kv),
        "v_proj": (config.hidden_size, kv),
        "o_proj": (attention, config.hidden_size),
        "gate_proj": (config.hidden_size, config.intermediate_size),
        "up_proj": (config.hidden_size, config.intermediate_size),
        "down_proj": (config.intermediate_size, config.hidden_size),
    }
    if target not in features:
        raise ValueError(f"unknown LoRA target {target!r}; choose from {', '.join(LORA_TARGETS)}")
    if config.num_experts and target in _MLP_TARGETS:
        raise ValueError(
            f"LoRA target {target!r} is a projection of the experts in this mixture-of-experts model "
            f"({config.family}), and LoRA of experts is not supported; choose from "
            f"{', '.join(t for t in LORA_TARGETS if t not in _MLP_TARGETS)}"
        )
    in_features, out_features = features[target]
    return (rank, in_features), (out_features, rank)


@dataclass
class BlockAdapter:
    """Additions to one block. `prompt` [batch or 1, prompt_len, hidden] is added to the hidden states at absolute
    positions [0, prompt_len) before the block; `lora` maps a projection name to (A, B), adding
    `lora_scale * x @ A.T @ B.T` to that projection's output."""

    prompt: torch.Tensor | None = None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lora_scale: float = 1.0

    def add_prompt(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        if self.prompt is None:
            return hidden
        covered = min(position + hidden.shape[1], self.prompt.shape[1]) - position
        if covered <= 0:
            return hidden
        piece = self.prompt[:, position : position + covered].to(hidden.dtype)
        return hidden + F.pad(piece, (0, 0, 0, hidden.shape[1] - covered))


def project(linear: nn.Module, x: torch.Tensor, adapter: BlockAdapter | None, name: str) -> torch.Tensor:
    """`linear(x)`, plus the adapter's LoRA delta for this projection if it has one."""
    out = linear(x)
    if adapter is None or name not in adapter.lora:
        return out
    down, up = adapter.lora[name]
    delta = F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
    return out + adapter.lora_scale * delta
