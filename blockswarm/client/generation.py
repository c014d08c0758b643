"""The token loop shared by local and swarm generation: embed, run the blocks, constrain, pick, repeat."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from blockswarm.client.sampling import SamplingParams, next_tokens

# Hugging Face's logits-processor signature: (token ids so far [batch, n], scores [batch, vocab]) -> scores.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Ends(Protocol):
    """The local parts around the blocks: a model's ModelEnds, or a client model with its adapters."""

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TokenStep:
    """One generated position: the sequences so far, the new tokens, and the scores they were picked from."""

    token_ids: torch.Tensor  # [batch, n]: every token, the new ones last
    tokens: torch.Tensor  # [batch]
    scores: torch.Tensor  # [batch, vocab] float32 logits after the logits processors, before temperature/top-k/top-p


def token_steps(
    ends: Ends,
    run_blocks: Callable[[torch.Tensor], torch.Tensor],
    seen_ids: torch.Tensor,
    pending_ids: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_id: int | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    generator: torch.Generator | None = None,
) -> Iterator[TokenStep]:
    """Yields each of up to `max_new_tokens` steps; the caller may stop early.

    `pending_ids` are the tokens at the end of `seen_ids` that the blocks have not processed yet; the last
    generated token is never processed, so a later call can continue from it. Sequences that produced
    `eos_token_id` keep producing it until every sequence has. Each step computes in inference mode on its own
    (a generator may be resumed from another thread).
    """
    finished = torch.zeros(seen_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        with torch.inference_mode():
            hidden = run_blocks(ends.embed(pending_ids))
            scores = ends.logits(hidden[:, -1:])[:, -1].float()
            for processor in logits_processors:
                scores = processor(seen_ids, scores)
            tokens = next_tokens(scores, seen_ids, params, generator)
        if eos_token_id is not None:
            tokens = torch.where(finished, eos_token_id, tokens)
            finished |= tokens == eos_token_id
        seen_ids = torch.cat([seen_ids, tokens[:, None]], dim=1)
        pending_ids = tokens[:, None]
        yield TokenStep(seen_ids, tokens, scores)
        if eos_token_id is not None and bool(finished.all()):
            return
