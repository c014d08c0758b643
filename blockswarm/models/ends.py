"""The two ends of the model that a client runs locally, around the remote blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockswarm.models.block import RMSNorm
from blockswarm.models.config import ModelConfig


class ModelEnds(nn.Module):
    """The parts a client keeps locally: token embeddings, final norm, LM head (tied to embeddings or not).

    Parameter names match a checkpoint's `model.embed_tokens.weight`, `model.norm.weight` and `lm_head.weight`
    after stripping `model.`. With tied embeddings there is no `lm_head`: the head is `embed_tokens.weight`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, H] input hidden states of the first block."""
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H] output of the last block -> [B, T, V] logits (final norm, then LM head)."""
        return F.linear(self.norm(hidden), self.lm_head_weight)
