"""The token loop shared by local and swarm generation: embed, run the blocks, pick, repeat."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from blockswarm.client.sampling import SamplingParams, next_tokens


class Ends(Protocol):
    """The local parts around the blocks: a model's ModelEnds, or a client model with its adapters."""

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


def generate_tokens(
    ends: Ends,
    run_blocks: Callable[[torch.Tensor], torch.Tensor],
    seen_ids: torch.Tensor,
    pending_ids: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Returns `seen_ids` extended by up to `max_new_tokens` tokens.

    `pending_ids` are the tokens at the end of `seen_ids` that the blocks have not processed yet; the last
    generated token is returned without being processed, so a later call can continue from it.
    Sequences that produced `eos_token_id` keep producing it until every sequence has.
    """
    finished = torch.zeros(seen_ids.shape[0], dtype=torch.bool)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            hidden = run_blocks(ends.embed(pending_ids))
            logits = ends.logits(hidden[:, -1:])[:, -1]
            tokens = next_tokens(logits, seen_ids, params)
            if eos_token_id is not None:
                tokens = torch.where(finished, eos_token_id, tokens)
                finished |= tokens == eos_token_id
            seen_ids = torch.cat([seen_ids, tokens[:, None]], dim=1)
            pending_ids = tokens[:, None]
            if eos_token_id is not None and bool(finished.all()):
                break
    return seen_ids
