"""Our sampling knobs mean what Hugging Face's mean: compare with its logits processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from blockswarm.client.sampling import SamplingParams, next_tokens


def hf_distribution(logits, seen, params: SamplingParams) -> torch.Tensor:
    scores = logits.clone()
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(seen, scores)
    scores = TemperatureLogitsWarper(params.temperature)(seen, scores)
    if params.top_k is not None:
        scores = TopKLogitsWarper(params.top_k)(seen, scores)
    if params.top_p is not None:
        scores = TopPLogitsWarper(params.top_p)(seen, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=0.7),
        SamplingParams(do_sample=True, top_k=5),
        SamplingParams(do_sample=True, top_p=0.8),
        SamplingParams(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.2),
    ],
)
def test_sampling_distribution_matches_transformers(params):
    torch.manual_seed(0)
    logits = torch.randn(2, 50) * 3
    seen = torch.randint(0, 50, (2, 6))
    expected = hf_distribution(logits, seen, params)
    draws = torch.stack([next_tokens(logits, seen, params) for _ in range(4000)], dim=1)
    for row in range(2):
        empirical = torch.bincount(draws[row], minlength=50).float() / draws.shape[1]
        assert (empirical[expected[row] == 0] == 0).all(), "sampled a token transformers would never pick"
        assert (empirical - expected[row]).abs().max() < 0.04


def test_greedy_with_repetition_penalty_matches_transformers():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    seen = torch.tensor([[0]])
    params = SamplingParams(repetition_penalty=1.5)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(seen, logits.clone()).argmax(-1)
    assert next_tokens(logits, seen, params).tolist() == expected.tolist() == [1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_invalid_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(do_sample=True, **kwargs)
