"""Spot checks catch a peer that lies, route around it, and never accuse an honest peer."""

from __future__ import annotations

import time

import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.compression.codecs import decode_tensor, encode_tensor
from blockswarm.dht import get_reports
from blockswarm.local_swarm import LocalSwarm
from blockswarm.pipeline.hops import Hop, NoRouteError
from blockswarm.pipeline.verification import WIRE_CODEC_ERROR, relative_error, tolerance
from blockswarm.routing.route import LatencyModel

NEW_TOKENS = 24
LIE_NOISE = 0.5  # the liar adds noise of half its outputs' std: far above any honest difference
FEW_CACHE_TOKENS = "8"  # checkers: they compute forwards, but no session fits in their cache, so routes avoid them


@pytest.fixture(scope="module")
def lying_swarm(tiny_model, tmp_path_factory):
    """A liar serving every block; two honest peers splitting them; two honest checkers serving every block with
    almost no KV cache (routes avoid them, spot checks and arbitration use them)."""
    with LocalSwarm(tiny_model, tmp_path_factory.mktemp("lying")) as swarm:
        swarm.start_bootstrap()
        launched = {
            "liar": swarm.start_peer("--blocks", "0:8", name="liar", wait=False, test_noise=LIE_NOISE),
            "first": swarm.start_peer("--blocks", "0:4", name="first", wait=False),
            "second": swarm.start_peer("--blocks", "4:8", name="second", wait=False),
            "checker0": swarm.start_peer("--blocks", "0:8", "--cache-tokens", FEW_CACHE_TOKENS, wait=False),
            "checker1": swarm.start_peer("--blocks", "0:8", "--cache-tokens", FEW_CACHE_TOKENS, wait=False),
        }
        for process in launched.values():
            swarm.wait_peer(process)
        swarm.ids = {role: process.peer_id for role, process in launched.items()}
        yield swarm


@pytest.fixture(scope="module")
def reference(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(3, 4000, (1, 8), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def expected(reference, prompt) -> torch.Tensor:
    return reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)


def client(swarm, tiny_model, prefer_one_hop: bool = False, **kwargs) -> DistributedModelForCausalLM:
    """`prefer_one_hop`: a hop costs the router a full second, so sessions start on the liar (one hop for all
    blocks) rather than on the two honest peers that split them."""
    model = DistributedModelForCausalLM.from_pretrained(
        tiny_model, swarm.initial_peers, **{"codec": "none", "verify_fraction": 1.0, **kwargs}
    )
    if prefer_one_hop:
        model.remote.router.costs = LatencyModel(hop_overhead=1.0)
    return model


def generate_and_record_routes(model, prompt) -> tuple[torch.Tensor, list[list[str]]]:
    routes: list[list[str]] = []
    with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
        output = model.generate(prompt, max_new_tokens=NEW_TOKENS)
        routes.append([str(span.hop.peer_id) for span in session._remote.spans])
    return output, routes


def test_a_lying_peer_is_caught_banned_and_routed_around(lying_swarm, tiny_model, prompt, expected):
    ids = lying_swarm.ids
    with client(lying_swarm, tiny_model, prefer_one_hop=True) as model:
        route = model.remote.router.route(0, 8, prompt.shape[1] + NEW_TOKENS)
        assert [str(hop.peer_id) for hop in route] == [ids["liar"]], "the test needs the liar on the route"
        output, routes = generate_and_record_routes(model, prompt)
        reports = model.lie_reports
        assert torch.equal(output, expected), "a lie reached the output"
        assert [report.peer_id for report in reports] == [ids["liar"]]
        (report,) = reports
        assert report.confirmed and (report.start, report.end) == (0, 8)
        assert set(report.witnesses) <= {ids["checker0"], ids["checker1"]}
        assert report.relative_error > report.tolerance
        assert not model.remote.view.is_usable(PeerID.from_base58(ids["liar"]))
        assert routes[-1] == [ids["first"], ids["second"]]
        assert report.as_dict()["peer_id"] == ids["liar"]
        # and the swarm's monitor can see it: a signed report in the DHT
        deadline = time.monotonic() + 30
        while not (published := get_reports(model.remote.dht, model.remote.model_name)):
            assert time.monotonic() < deadline, "the client never published its report"
            time.sleep(0.5)
        assert {str(peer) for peer in published} == {ids["liar"]}


def test_a_liar_checking_others_is_caught_too(lying_swarm, tiny_model, prompt, expected):
    """Sessions through the honest peers (the liar looks far away); the liar is drawn as a checker, outvoted by a
    third peer, and the honest peer's outputs are kept."""
    liar = PeerID.from_base58(lying_swarm.ids["liar"])
    with client(lying_swarm, tiny_model) as model:
        model.remote._pinging.cancel()
        for _ in range(20):
            model.remote.router.rtts.update(liar, 10.0)
        assert liar not in [hop.peer_id for hop in model.remote.router.route(0, 8, prompt.shape[1] + NEW_TOKENS)]
        output, routes = generate_and_record_routes(model, prompt)
        assert torch.equal(output, expected)
        (report,) = model.lie_reports
        assert report.peer_id == str(liar) and report.confirmed
        assert routes[-1] == [lying_swarm.ids["first"], lying_swarm.ids["second"]]


@pytest.mark.parametrize("codec", ["none", "int8-blockwise"])
def test_honest_peers_are_never_reported(lying_swarm, tiny_model, prompt, expected, codec):
    with client(lying_swarm, tiny_model, codec=codec, blocked_peers=[lying_swarm.ids["liar"]]) as model:
        output, _ = generate_and_record_routes(model, prompt)
        model(prompt)  # forward hops are checked too
        assert model.lie_reports == []
        assert model.remote.verifier.checked >= NEW_TOKENS
    if codec == "none":
        assert torch.equal(output, expected)


def test_forward_with_a_liar_in_the_swarm_gives_the_local_logits(lying_swarm, tiny_model, reference, prompt):
    expected_logits = reference(prompt).logits
    with client(lying_swarm, tiny_model) as model:
        for _ in range(20):
            with torch.no_grad():
                logits = model(prompt)
            assert (logits - expected_logits).abs().max() < 1e-4
            if model.lie_reports:
                break
        assert {report.peer_id for report in model.lie_reports} == {lying_swarm.ids["liar"]}


def test_a_dispute_nobody_can_settle_distrusts_both(lying_swarm, tiny_model, prompt, expected):
    """Only one checker can compute the liar's blocks: both are distrusted, and the session moves on through the
    honest peers that split the blocks."""
    ids = lying_swarm.ids
    allowed = [ids["liar"], ids["checker0"], ids["first"], ids["second"]]
    with client(lying_swarm, tiny_model, prefer_one_hop=True, allowed_peers=allowed) as model:
        output, routes = generate_and_record_routes(model, prompt)
        assert torch.equal(output, expected)
        reports = model.lie_reports
        assert {report.peer_id for report in reports} == {ids["liar"], ids["checker0"]}
        assert not any(report.confirmed for report in reports)
        assert routes[-1] == [ids["first"], ids["second"]]


def test_a_dispute_with_no_way_around_is_a_clear_error(lying_swarm, tiny_model, prompt):
    ids = lying_swarm.ids
    allowed = [ids["liar"], ids["checker0"]]
    with client(lying_swarm, tiny_model, allowed_peers=allowed, failover_deadline=2) as model:
        with pytest.raises(NoRouteError, match="disputed by .* nobody could settle it"):
            model.generate(prompt, max_new_tokens=2)
        assert {report.peer_id for report in model.lie_reports} == {ids["liar"], ids["checker0"]}


def test_verify_fraction_is_checked(tiny_model):
    for wrong in (-0.1, 1.5, "all"):
        with pytest.raises(ValueError, match="verify_fraction must be a number between 0 and 1"):
            DistributedModelForCausalLM.from_pretrained(tiny_model, [], verify_fraction=wrong)


def test_the_int8_tolerance_bounds_the_codec_error_and_not_a_lie():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 64, 256, generator=generator)
    hidden[..., :6] *= 100  # outlier channels, the codec's hardest case
    sparse = torch.randn(4, 64, 256, generator=generator) * (torch.rand(4, 64, 256, generator=generator) < 0.02)
    for values in (hidden, sparse, torch.randn(2, 8, 4096, generator=generator).pow(3)):
        decoded = decode_tensor(encode_tensor(values, "int8-blockwise"))
        assert relative_error(decoded, values) <= WIRE_CODEC_ERROR["int8-blockwise"]
    hop = Hop(PeerID(b"x" * 34), 0, 8)
    assert tolerance(hop, ("int8-blockwise", "none")) < 0.05
    lie = hidden + 0.1 * hidden.std() * torch.randn(hidden.shape, generator=generator)
    assert relative_error(lie, hidden) > tolerance(hop, ("int8-blockwise", "none"))
    assert relative_error(torch.full_like(hidden, float("nan")), hidden) == float("inf")
