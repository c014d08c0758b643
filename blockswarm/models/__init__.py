"""Llama-family transformer blocks in plain torch, and loading any span of them from a checkpoint."""

from blockswarm.models.block import KVCache, TransformerBlock
from blockswarm.models.config import ModelConfig
from blockswarm.models.ends import ModelEnds
from blockswarm.models.loading import (
    load_blocks,
    load_config,
    load_ends,
    resolve_checkpoint,
    weights_fingerprint,
)
from blockswarm.models.random_init import PRESETS, init_random_model

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "ModelEnds",
    "TransformerBlock",
    "init_random_model",
    "load_blocks",
    "load_config",
    "load_ends",
    "resolve_checkpoint",
    "weights_fingerprint",
]
