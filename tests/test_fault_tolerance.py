"""Peers die at any moment; the client's result does not change."""

from __future__ import annotations

import random
import signal
import time

import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.local_swarm import LocalSwarm, generate_with_interruptions
from blockswarm.pipeline.hops import NoRouteError
from blockswarm.wire.ping import request_status

REDUNDANT_SPANS = ("0:4", "0:4", "4:8", "4:8")  # every block held by two peers
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def redundant_swarm(tiny_model, tmp_path_factory):
    with LocalSwarm(tiny_model, tmp_path_factory.mktemp("redundant")) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers(REDUNDANT_SPANS)
        yield swarm


@pytest.fixture
def swarm(redundant_swarm):
    """Before each test: every span of REDUNDANT_SPANS again has two live peers (replacing killed ones)."""
    for process in redundant_swarm.processes:
        process.signal(signal.SIGCONT)
    live = [p for p in redundant_swarm.processes if p.span and p.popen.poll() is None]
    missing = list(REDUNDANT_SPANS)
    for process in live:
        span = f"{process.span[0]}:{process.span[1]}"
        if span in missing:
            missing.remove(span)
    redundant_swarm.start_peers(missing)
    return redundant_swarm


@pytest.fixture(scope="module")
def reference(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(3, 4000, (1, 8), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def expected(reference, prompt) -> torch.Tensor:
    return reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)


def client(swarm, tiny_model, **kwargs) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, **{"codec": "none", **kwargs})


def process_of(swarm, peer_id: PeerID):
    return next(p for p in swarm.processes if p.peer_id == str(peer_id))


def generate_with_failures(model, prompt, failures: dict) -> tuple[torch.Tensor, list[float]]:
    return generate_with_interruptions(model, prompt, NEW_TOKENS, failures)


def send_signal_to_span(swarm, span_index: int, sig: int):
    def act(session):
        process_of(swarm, session.spans[span_index].hop.peer_id).signal(sig)

    return act


@pytest.mark.parametrize("where", ["random", "first", "last", "final_blocks"])
def test_sigkill_of_the_serving_peer_leaves_output_unchanged(swarm, tiny_model, prompt, expected, where):
    at_step = {"random": random.Random().randint(1, NEW_TOKENS - 2), "first": 0, "last": NEW_TOKENS - 1}.get(where, 20)
    span_index = -1 if where == "final_blocks" else 0
    with client(swarm, tiny_model, step_timeout=10) as model:
        output, _ = generate_with_failures(
            model, prompt, {at_step: send_signal_to_span(swarm, span_index, signal.SIGKILL)}
        )
    assert torch.equal(output, expected), f"output changed after a SIGKILL at step {at_step}"


def test_a_stopped_peer_is_replaced_in_about_a_second(swarm, tiny_model, prompt, expected):
    """SIGSTOP: the peer's connections stay open but nothing answers. The overdue step's `info` probe goes
    unanswered, and the session moves on long before the 30 s step timeout (pipeline/liveness.py)."""
    with client(swarm, tiny_model, step_timeout=30) as model:
        output, durations = generate_with_failures(model, prompt, {10: send_signal_to_span(swarm, 0, signal.SIGSTOP)})
    assert torch.equal(output, expected)
    assert durations[10] < 3, f"the stopped peer held the step for {durations[10]:.1f} s"


def test_two_peers_killed_in_one_session(swarm, tiny_model, prompt, expected):
    with client(swarm, tiny_model, step_timeout=10) as model:
        kills = {10: send_signal_to_span(swarm, 0, signal.SIGKILL), 30: send_signal_to_span(swarm, 1, signal.SIGKILL)}
        output, _ = generate_with_failures(model, prompt, kills)
        assert torch.equal(output, expected)


def test_replacement_dies_too(swarm, tiny_model, prompt, expected):
    """Kill the first-span peer, then the peer that replaced it: no span of 0:4 is left, so a 0:8 peer started in
    between must take over, and the replay moves to it."""
    with client(swarm, tiny_model, step_timeout=10) as model:
        extra = swarm.start_peer("--blocks", "0:8")

        def kill_first_span(session):
            process_of(swarm, session.spans[0].hop.peer_id).signal(signal.SIGKILL)

        output, _ = generate_with_failures(model, prompt, {5: kill_first_span, 25: kill_first_span})
        assert torch.equal(output, expected)
    extra.stop()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_forward_backward_with_a_peer_failing_in_between(swarm, tiny_model, reference, sig):
    """Killed, or stopped (caught by the overdue call's `info` probe in about a second, not the 30 s timeout)."""
    input_ids = torch.randint(3, 4000, (1, 9), generator=torch.Generator().manual_seed(3))
    with client(swarm, tiny_model, step_timeout=30) as model:
        forward, used = model.remote.chain.forward, []

        async def recording_forward(*args):
            outputs, hop_inputs = await forward(*args)
            used.extend(hop for hop, _ in hop_inputs)
            return outputs, hop_inputs

        model.remote.chain.forward = recording_forward
        embeds = model.ends.embed(input_ids).detach().requires_grad_(True)
        logits = model.ends.logits(model.remote.forward(embeds))
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:])
        process_of(swarm, used[-1].peer_id).signal(sig)  # backward starts with the last hop
        began = time.monotonic()
        loss.backward()
        elapsed = time.monotonic() - began

    ref_embeds = reference.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    ref_loss = torch.nn.functional.cross_entropy(reference(inputs_embeds=ref_embeds).logits[0, :-1], input_ids[0, 1:])
    ref_loss.backward()
    assert (embeds.grad - ref_embeds.grad).abs().max() <= 1e-4
    assert elapsed < 5, f"the failed peer held the backward pass for {elapsed:.1f} s"


def test_sigterm_moves_the_session_on_without_a_timeout_stall(swarm, tiny_model, prompt, expected):
    with client(swarm, tiny_model, step_timeout=30) as model:
        output, durations = generate_with_failures(model, prompt, {10: send_signal_to_span(swarm, 0, signal.SIGTERM)})
    assert torch.equal(output, expected)
    assert max(durations) < 5, f"a step took {max(durations):.1f} s: the leaving peer was waited for"


def test_no_peer_left_for_some_blocks_is_a_clear_error(tiny_model, tmp_path):
    with LocalSwarm(tiny_model, tmp_path) as lonely:
        lonely.start_bootstrap()
        lonely.start_peer("--blocks", "0:4")
        with client(lonely, tiny_model, failover_deadline=3) as model:
            began = time.monotonic()
            with pytest.raises(NoRouteError, match=r"block\(s\) 4, 5, 6, 7 .*gave up") as error:
                model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
            assert time.monotonic() - began < 15
            assert error.value.missing_blocks == [4, 5, 6, 7]


def cache_tokens_left(model, peer_id: PeerID) -> int:
    return model.remote.loop.run(request_status(model.remote.p2p, peer_id)).cache_tokens_left


def test_abandoned_sessions_give_their_cache_back(swarm, tiny_model, prompt):
    peer = swarm.start_peer("--blocks", "0:8", "--session-timeout", "2", "--cache-tokens", "1000")
    peer_id = PeerID.from_base58(peer.peer_id)
    with client(swarm, tiny_model) as model:
        assert cache_tokens_left(model, peer_id) == 1000
        for other in swarm.processes:
            if other.peer_id and other is not peer:
                model.remote.view.ban(PeerID.from_base58(other.peer_id))
        session = model.remote.open_session(max_length=300, batch_size=2)
        model.remote.step(session, torch.randn(2, 3, 256))
        assert cache_tokens_left(model, peer_id) == 400
        model.remote.close_session(session)
        deadline = time.monotonic() + 5
        while cache_tokens_left(model, peer_id) != 1000:
            assert time.monotonic() < deadline, "a closed session kept its cache"
            time.sleep(0.1)

        abandoned = model.remote.open_session(max_length=500, batch_size=1)
        model.remote.step(abandoned, torch.randn(1, 3, 256))
        assert cache_tokens_left(model, peer_id) == 500
        deadline = time.monotonic() + 10
        while cache_tokens_left(model, peer_id) != 1000:
            assert time.monotonic() < deadline, "an idle session was never reclaimed"
            time.sleep(0.2)
    peer.stop()
