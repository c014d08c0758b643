"""Peer-to-peer push: each peer sends a step's outputs straight to the next span's peer; results stay exact."""

from __future__ import annotations

import signal

import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM

import blockswarm.pipeline.inference as inference_module
from blockswarm.client import DistributedModelForCausalLM
from blockswarm.compression.codecs import encode_tensor
from blockswarm.local_swarm import LocalSwarm, generate_with_interruptions
from blockswarm.pipeline.span_session import Push
from blockswarm.pipeline.streams import PeerStream
from blockswarm.wire.messages import INFERENCE_RPC, PUSH_RPC, InferenceStep, OpenSession, PushStep, StepReply
from blockswarm.wire.transport import Frame, RemoteError, WireStream

SPANS = ("0:3", "3:6", "6:8", "3:6")  # a route of three hops, and a spare peer for the middle one
NEW_TOKENS = 24
HIDDEN = 256  # tiny preset


@pytest.fixture(scope="module")
def push_swarm(tiny_model, tmp_path_factory):
    with LocalSwarm(tiny_model, tmp_path_factory.mktemp("push")) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers(SPANS)
        yield swarm


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(3, 4000, (1, 8), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def expected(tiny_model, prompt) -> torch.Tensor:
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)


def client(swarm, tiny_model, **kwargs) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, **{"codec": "none", **kwargs})


def generate(model, prompt, interruptions=None) -> tuple[torch.Tensor, object]:
    """Greedy generation; returns the tokens and the client's inference session (for its push counters)."""
    sessions = []
    steps = {0: sessions.append, **(interruptions or {})}
    if 0 in (interruptions or {}):
        raise ValueError("step 0 records the session")
    output, _ = generate_with_interruptions(model, prompt, NEW_TOKENS, steps)
    return output, sessions[0]


def test_generation_with_push_is_token_exact(push_swarm, tiny_model, prompt, expected):
    with client(push_swarm, tiny_model) as model:
        output, session = generate(model, prompt)
    assert torch.equal(output, expected)
    assert session.relayed_inputs == 0
    assert session.pushed_inputs == 2 * NEW_TOKENS  # every step, into the second and the third span


def test_without_push_every_step_is_relayed(push_swarm, tiny_model, prompt, expected):
    with client(push_swarm, tiny_model, push=False) as model:
        output, session = generate(model, prompt)
    assert torch.equal(output, expected)
    assert session.pushed_inputs == 0 and session.relayed_inputs == 2 * NEW_TOKENS


def test_a_refused_push_falls_back_to_relaying(push_swarm, tiny_model, prompt, expected, monkeypatch):
    """The client names, as each span's push source, a peer that is not the previous span's: every peer refuses the
    push it gets, reports it failed, and the client relays instead."""

    def wrong_source(**fields) -> Push:
        if fields.get("from_peer") is not None:
            fields["from_peer"] = PeerID(b"not-the-previous-peer")
        return Push(**fields)

    monkeypatch.setattr(inference_module, "Push", wrong_source)
    with client(push_swarm, tiny_model) as model:
        output, session = generate(model, prompt)
    assert torch.equal(output, expected)
    assert session.pushed_inputs == 0 and session.relayed_inputs == 2 * NEW_TOKENS


def test_a_strangers_push_is_refused_and_the_session_goes_on(push_swarm, tiny_model):
    middle = next(p for p in push_swarm.processes if p.span == (3, 6))
    first = next(p for p in push_swarm.processes if p.span == (0, 3))
    middle_id = PeerID.from_base58(middle.peer_id)
    hidden = torch.randn(1, 2, HIDDEN, generator=torch.Generator().manual_seed(0))
    opening = OpenSession(session_id="s" * 32, start=3, end=6, max_length=8, push_from=first.peer_id)
    with client(push_swarm, tiny_model) as owner, client(push_swarm, tiny_model) as stranger:

        async def open_and_step(position: int, stream: PeerStream | None = None):
            stream = stream or await PeerStream.open(owner.remote.p2p, middle_id, INFERENCE_RPC, timeout=10)
            if position == 0:
                stream.send(opening, [])
            step = InferenceStep(session_id=opening.session_id, position=position)
            stream.send(step, [encode_tensor(hidden[:, position : position + 1], "none")])
            meta, (output,) = await stream.receive(StepReply, timeout=10)
            return stream, meta, output

        async def stranger_push() -> str:
            stream = await WireStream.open(stranger.remote.p2p, middle_id, PUSH_RPC, timeout=10)
            try:
                step = PushStep(session_id=opening.session_id, position=1)
                stream.send(Frame(step, [encode_tensor(hidden[:, 1:2], "none")]))
                with pytest.raises(RemoteError) as refused:
                    await stream.receive(None, 0, timeout=10)
                return str(refused.value)
            finally:
                await stream.close()

        stream, first_reply, _ = owner.remote.loop.run(open_and_step(0))
        try:
            assert first_reply.input_digest is None and first_reply.pushed is None
            assert "only from the peer its client named" in stranger.remote.loop.run(stranger_push())
            _, second_reply, output = owner.remote.loop.run(open_and_step(1, stream))
        finally:
            owner.remote.loop.run(stream.close())
        assert second_reply.position == 1 and second_reply.input_digest is None
        # the same two steps in a fresh session: the stranger's push changed nothing
        opening = opening.model_copy(update={"session_id": "t" * 32})
        fresh, _, _ = owner.remote.loop.run(open_and_step(0))
        try:
            _, _, again = owner.remote.loop.run(open_and_step(1, fresh))
        finally:
            owner.remote.loop.run(fresh.close())
    assert torch.equal(output, again)


def test_sigkill_of_the_middle_peer_with_push_leaves_output_unchanged(push_swarm, tiny_model, prompt, expected):
    def kill_middle(session) -> None:
        peer_id = str(session.spans[1].hop.peer_id)
        next(p for p in push_swarm.processes if p.peer_id == peer_id).signal(signal.SIGKILL)

    with client(push_swarm, tiny_model, step_timeout=10) as model:
        output, session = generate(model, prompt, {8: kill_middle})
    assert torch.equal(output, expected)
    assert session.pushed_inputs > 0 and session.relayed_inputs > 0
