"""What differs between the model families a block serves: one row per family.

`ModelConfig.from_hf` reads a transformers config through this table; the loaders and span checkpoints use its
tensor names. The block itself (`block.py`) is one implementation that reads only `ModelConfig` fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Family:
    """How one family's config and checkpoint say what its blocks are."""

    qkv_bias: Literal["never", "always", "config"]  # "config": the config's attention_bias
    o_proj_bias: bool  # o_proj has a bias when the config's attention_bias says so
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary positions (Qwen3)
    sliding_window: Literal["never", "config", "opt_in"] = "never"  # "opt_in": only with use_sliding_window
    window_per_layer: bool = False  # `layer_types` (or Qwen's `max_window_layers`) say which layers use the window
    num_experts_field: str | None = None  # config field with the number of experts; None: a dense MLP only
    expert_size_field: str = "intermediate_size"  # config field with each expert's hidden size
    normalize_field: str | None = (
        None  # config field saying whether top-k routing weights are renormalized; None: always
    )
    round_routing_weights: bool = False  # routing weights cast to the hidden states' dtype before weighting (Qwen3-MoE)
    # (our name, the checkpoint's name) as regex substitutions on a block's tensor names, where they differ
    checkpoint_names: tuple[tuple[str, str], ...] = ()


FAMILIES: dict[str, Family] = {
    "llama": Family(qkv_bias="config", o_proj_bias=True),
    "mistral": Family(qkv_bias="never", o_proj_bias=False, sliding_window="config"),
    "qwen2": Family(qkv_bias="always", o_proj_bias=False, sliding_window="opt_in", window_per_layer=True),
    "qwen3": Family(qkv_bias="config", o_proj_bias=True, qk_norm=True, sliding_window="opt_in", window_per_layer=True),
    "mixtral": Family(
        qkv_bias="never",
        o_proj_bias=False,
        sliding_window="config",
        num_experts_field="num_local_experts",
        checkpoint_names=(
            (r"^mlp\.gate\.", "block_sparse_moe.gate."),
            (r"^mlp\.experts\.(\d+)\.gate_proj\.", r"block_sparse_moe.experts.\1.w1."),
            (r"^mlp\.experts\.(\d+)\.down_proj\.", r"block_sparse_moe.experts.\1.w2."),
            (r"^mlp\.experts\.(\d+)\.up_proj\.", r"block_sparse_moe.experts.\1.w3."),
        ),
    ),
    "qwen3_moe": Family(
        qkv_bias="config",
        o_proj_bias=True,
        qk_norm=True,
        sliding_window="opt_in",
        num_experts_field="num_experts",
        expert_size_field="moe_intermediate_size",
        normalize_field="norm_topk_prob",
        round_routing_weights=True,
    ),
}


def checkpoint_name(family: str, name: str) -> str:
    """The checkpoint's name for a block tensor we call `name` (relative to the block: "mlp.gate.weight")."""
    for ours, theirs in FAMILIES[family].checkpoint_names:
        renamed, count = re.subn(ours, theirs, name)
        if count:
            return renamed
    return name
