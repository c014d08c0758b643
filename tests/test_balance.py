"""Peers that choose their own blocks cover the model, fill a gap a leaving peer opens, and do not thrash."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from hivemind.dht import DHT

from blockswarm.dht import NodeRole, ServerState, get_block_servers, start_dht
from blockswarm.local_swarm import LocalSwarm
from blockswarm.models import load_config, weights_fingerprint
from blockswarm.models.naming import swarm_model_name
from blockswarm.models.random_init import init_random_model

PEER_ARGS = ("--num-blocks", "6", "--throughput", "100", "--balance-period", "2", "--update-period", "1")


@pytest.fixture(scope="module")
def sixteen_block_model(tmp_path_factory) -> str:
    return str(init_random_model(tmp_path_factory.mktemp("models") / "small", preset="small"))


def coverage(dht: DHT, model: str, num_blocks: int) -> list[int]:
    blocks = get_block_servers(dht, model, 0, num_blocks, latest=True)
    return [sum(info.state == ServerState.ONLINE for info in block.values()) for block in blocks]


def moves(process) -> int:
    return process.log().count("blockswarm peer moved")


def test_self_placing_peers_cover_fill_gaps_and_do_not_thrash(sixteen_block_model, tmp_path):
    num_blocks = load_config(sixteen_block_model).num_blocks
    assert num_blocks == 16
    name = swarm_model_name(sixteen_block_model, weights_fingerprint(sixteen_block_model))
    with LocalSwarm(sixteen_block_model, tmp_path) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(*PEER_ARGS) for _ in range(4)]  # one after another: each sees the others
        dht = start_dht(NodeRole.CLIENT, swarm.initial_peers).dht
        try:
            assert min(coverage(dht, name, num_blocks)) >= 1, [p.span for p in peers]

            sole = next(p for p in peers if sum(q.span == p.span for q in peers) == 1)
            sole.signal(signal.SIGTERM)
            assert sole.popen.wait(timeout=30) == 0
            deadline = time.monotonic() + 45
            while min(coverage(dht, name, num_blocks)) < 1:
                assert time.monotonic() < deadline, f"the gap left by {sole.span} was never filled"
                time.sleep(0.5)
            remaining = [p for p in peers if p is not sole]
            assert sum(moves(p) for p in remaining) >= 1

            time.sleep(10)  # several more balancing rounds: nobody should move again
            assert min(coverage(dht, name, num_blocks)) >= 1
            assert all(moves(p) <= 1 for p in remaining), [moves(p) for p in remaining]
        finally:
            dht.shutdown()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--blocks", "4:99"), "--blocks 4:99 is outside the model's blocks 0:8"),
        (("--num-blocks", "9"), "--num-blocks 9 must be between 1 and 8"),
        (("--throughput", "1e12"), "--throughput must be between 0 and 1e+09"),
        (("--cache-tokens", "0"), "--cache-tokens must be between 1 and"),
    ],
)
def test_options_that_do_not_fit_are_refused_before_joining(tiny_model, args, message):
    """No DHT node is started: the unreachable initial peer would otherwise be the error."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockswarm",
            "run-server",
            tiny_model,
            "--initial-peers",
            "/ip4/127.0.0.1/tcp/9",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"error: {message}" in result.stderr
