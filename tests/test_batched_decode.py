"""Continuous batching: a session computed inside a tick of many gives what it gives alone (issue #14)."""

from __future__ import annotations

import copy

import pytest
import torch

from blockswarm.models import KVCache, ModelConfig, TransformerBlock
from blockswarm.models.adapters import BlockAdapter, lora_shapes
from blockswarm.peer.adapters import ReceivedAdapter
from blockswarm.peer.backend import BlockBackend, DecodeStep

TOL = 1e-4
HIDDEN = 64
PEER_START, NUM_BLOCKS = 2, 3  # the peer serves blocks [2, 5) of a bigger model
MAX_LENGTH = 32
FAMILIES = {
    "llama": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(sliding_window=4),  # shorter than the prompts: the window cuts while decoding
    "qwen2": dict(attention_bias=True, rope_theta=1e6),
    # q/k norms; the peer's first block (2) attends fully, the others within a window
    "qwen3": dict(qk_norm=True, sliding_window=4, full_attention_layers=(0, 1, 2)),
    "mixtral": dict(num_experts=4, experts_per_token=2, expert_intermediate_size=48, normalize_expert_weights=True),
    # the peer's block 3 has a dense MLP
    "qwen3_moe": dict(qk_norm=True, num_experts=4, experts_per_token=2, expert_intermediate_size=32, dense_layers=(3,)),
}
# (first block, number of blocks, batch, prompt length, deep prompt + LoRA?) of each session
SESSIONS = [
    (2, 3, 2, 5, False),
    (3, 2, 1, 9, True),
    (2, 2, 3, 3, True),
    (4, 1, 1, 7, False),
    (2, 3, 1, 2, True),
]


def make_config(family: str) -> ModelConfig:
    settings = dict(
        family=family,
        num_blocks=8,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        sliding_window=None,
        tie_word_embeddings=False,
        max_position_embeddings=MAX_LENGTH,
    )
    return ModelConfig(**(settings | FAMILIES[family]))


def make_backend(family: str) -> BlockBackend:
    config = make_config(family)
    torch.manual_seed(0)
    blocks = [TransformerBlock(config, PEER_START + i).eval() for i in range(NUM_BLOCKS)]
    with torch.no_grad():
        for block in blocks:
            for name, parameter in block.named_parameters():
                if "norm" in name:  # ones by default: make the norms matter too
                    parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
    return BlockBackend(config, blocks, PEER_START, torch.float32, torch.device("cpu"))


def make_adapter(config: ModelConfig, num_blocks: int, batch: int, generator: torch.Generator) -> ReceivedAdapter:
    """A deep prompt longer than some prompts (so decode steps get it too) and LoRA on an attention and MLP part
    (attention only in a mixture of experts, whose experts take no LoRA)."""
    rank, targets = 3, ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    if config.num_experts:
        targets = targets[:3]

    def rand(*shape: int) -> torch.Tensor:
        return 0.1 * torch.randn(*shape, generator=generator)

    blocks = [
        BlockAdapter(
            prompt=rand(batch if i % 2 else 1, 6, HIDDEN),
            lora={t: tuple(rand(*shape) for shape in lora_shapes(config, t, rank)) for t in targets},
            lora_scale=2.0,
        )
        for i in range(num_blocks)
    ]
    return ReceivedAdapter(blocks, [])


class Session:
    def __init__(self, backend: BlockBackend, start: int, num_blocks: int, batch: int, prompt: int, adapted: bool):
        generator = torch.Generator().manual_seed(start * 100 + batch * 10 + prompt)
        self.start, self.batch, self.position = start, batch, prompt
        self.adapter = make_adapter(backend.config, num_blocks, batch, generator) if adapted else None
        self.caches = [backend.make_cache(batch, MAX_LENGTH) for _ in range(num_blocks)]
        self.generator = generator
        backend.inference_step(start, self.caches, self.next_input(prompt), 0, self.adapter)

    def next_input(self, length: int = 1) -> torch.Tensor:
        return torch.randn(self.batch, length, HIDDEN, generator=self.generator)


def clone(caches: list[KVCache]) -> list[KVCache]:
    return [KVCache(cache.key.clone(), cache.value.clone()) for cache in caches]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_ticks_equal_each_session_alone(family):
    """Sessions of different batch sizes, positions, spans and adapters, over several ticks; outputs and caches."""
    backend = make_backend(family)
    sessions = [Session(backend, *spec) for spec in SESSIONS]
    for tick in range(4):
        # a session may sit a tick out, one sends two tokens at once, and one a 5-token prefill chunk: all still
        # batch correctly with the decode steps
        ticking = [s for i, s in enumerate(sessions) if (i + tick) % 4 != 3]
        lengths = {id(ticking[0]): 2 if tick == 1 else 1, id(ticking[-1]): 5 if tick == 2 else 1}
        inputs = [s.next_input(lengths.get(id(s), 1)) for s in ticking]
        alone_caches = [clone(s.caches) for s in ticking]
        expected = [
            backend.inference_step(s.start, caches, hidden, s.position, s.adapter)
            for s, caches, hidden in zip(ticking, alone_caches, inputs)
        ]
        steps = [DecodeStep(s.start, s.caches, hidden, s.position, s.adapter) for s, hidden in zip(ticking, inputs)]
        outputs = backend.inference_steps(steps)
        for s, hidden, output, wanted, caches in zip(ticking, inputs, outputs, expected, alone_caches):
            assert output.shape == hidden.shape
            assert max_diff(output, wanted) <= TOL, f"tick {tick}, session at block {s.start}"
            for ours, theirs in zip(s.caches, caches):
                assert max_diff(ours.key, theirs.key) <= TOL and max_diff(ours.value, theirs.value) <= TOL
            s.position += hidden.shape[1]


def test_lone_session_tick_is_exactly_its_step():
    backend = make_backend("mistral")
    session = Session(backend, 3, 2, 2, 6, True)
    hidden = session.next_input()
    alone_caches = clone(session.caches)
    wanted = backend.inference_step(3, alone_caches, hidden, session.position, session.adapter)
    (output,) = backend.inference_steps([DecodeStep(3, session.caches, hidden, session.position, session.adapter)])
    assert torch.equal(output, wanted)
    assert all(
        torch.equal(a.key, b.key) and torch.equal(a.value, b.value) for a, b in zip(session.caches, alone_caches)
    )


def test_bad_step_refused_before_any_cache_is_written():
    backend = make_backend("llama")
    good, bad = Session(backend, 2, 3, 1, 4, False), Session(backend, 2, 1, 1, 4, False)
    before = clone(good.caches)
    steps = [DecodeStep(2, good.caches, good.next_input(), 4), DecodeStep(2, bad.caches, bad.next_input(), MAX_LENGTH)]
    with pytest.raises(ValueError, match="cache holds"):
        backend.inference_steps(steps)
    assert all(torch.equal(a.key, b.key) for a, b in zip(good.caches, before))
    with pytest.raises(ValueError, match="not a non-empty part"):
        backend.inference_steps([DecodeStep(1, good.caches, good.next_input(), 4)])
    with pytest.raises(ValueError, match="share a KV cache"):
        backend.inference_steps([DecodeStep(2, good.caches, good.next_input(), 4)] * 2)
    assert backend.inference_steps([]) == []


def test_inputs_are_not_modified():
    """The steps' tensors are not modified in place (the scheduler may keep them, e.g. for replay history)."""
    backend = make_backend("qwen2")
    session = Session(backend, 2, 2, 2, 3, True)
    other = Session(backend, 2, 3, 1, 5, True)
    hiddens = [session.next_input(), other.next_input()]
    kept = copy.deepcopy(hiddens)
    backend.inference_steps(
        [
            DecodeStep(2, session.caches, hiddens[0], session.position, session.adapter),
            DecodeStep(2, other.caches, hiddens[1], other.position, other.adapter),
        ]
    )
    assert all(torch.equal(a, b) for a, b in zip(hiddens, kept))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_training_backward_gives_experts_their_gradients(family):
    """A SWARM stage learns from backward: every parameter gets its gradient, experts that no token chose zeros."""
    backend = make_backend(family)
    for parameter in backend.parameters():
        parameter.requires_grad_(True)
    learned = []
    backend.learn = lambda grads, batch_size: learned.append(grads)
    hidden = torch.randn(1, 2, HIDDEN, generator=torch.Generator().manual_seed(5))  # 2 tokens x top-2 of 4 experts
    grad_output = torch.randn(1, 2, HIDDEN, generator=torch.Generator().manual_seed(6))
    backend.backward(PEER_START, PEER_START + NUM_BLOCKS, hidden, grad_output, train=True)

    outputs = hidden
    for block in backend.blocks:
        outputs = block(outputs)
    expected = torch.autograd.grad(outputs, backend.parameters(), grad_output, allow_unused=True)
    (grads,) = learned
    assert len(grads) == len(expected) == len(backend.parameters())
    unused = 0
    for grad, wanted in zip(grads, expected):
        if wanted is None:
            unused += 1
            assert not grad.any()
        else:
            assert max_diff(grad, wanted) <= TOL
    assert unused > 0  # some expert was chosen by no token: the case this test is about
