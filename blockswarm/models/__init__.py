"""Llama-family transformer blocks in plain torch, loading any span of them from a checkpoint, and quantizing them.

Random-weight test checkpoints live in `blockswarm.models.random_init`, imported only by what makes them.
"""

from blockswarm.models.batching import SessionRows, step_block
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

__all__ = [
    "KVCache",
    "ModelConfig",
    "ModelEnds",
    "SessionRows",
    "TransformerBlock",
    "load_blocks",
    "load_config",
    "load_ends",
    "resolve_checkpoint",
    "step_block",
    "weights_fingerprint",
]
