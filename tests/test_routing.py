"""Route finding and block selection on synthetic swarm views."""

from __future__ import annotations

import random

import pytest
from hivemind.p2p import PeerID

from blockswarm.dht import ServerInfo, ServerState
from blockswarm.peer.block_selection import block_coverage, choose_span_start
from blockswarm.pipeline.hops import NoRouteError
from blockswarm.routing.route import fewest_hops_route


def peer(n: int) -> PeerID:
    return PeerID(f"peer-{n}".encode())


def view(spans: dict[int, tuple[int, int]], num_blocks: int, state=ServerState.ONLINE):
    blocks = [{} for _ in range(num_blocks)]
    for n, (start, end) in spans.items():
        for i in range(start, end):
            blocks[i][peer(n)] = ServerInfo(state=state, start=start, end=end)
    return blocks


def test_fewest_hops_prefers_long_spans():
    blocks = view({0: (0, 2), 1: (0, 6), 2: (2, 8), 3: (5, 8), 4: (6, 8)}, 8)
    route = fewest_hops_route(blocks, 0, 8, "m", random.Random(0))
    assert len(route) == 2
    assert (route[0].peer_id, route[0].start, route[0].end) == (peer(1), 0, 6)
    assert (route[1].start, route[1].end) == (6, 8) and route[1].peer_id in {peer(2), peer(3), peer(4)}


def test_route_uses_sub_spans_and_covers_every_block_once():
    blocks = view({0: (0, 3), 1: (2, 6), 2: (5, 8)}, 8)
    route = fewest_hops_route(blocks, 0, 8, "m")
    assert [(h.start, h.end) for h in route] == [(0, 3), (3, 6), (6, 8)]
    partial = fewest_hops_route(blocks, 4, 7, "m")
    assert [(h.peer_id, h.start, h.end) for h in partial] == [(peer(1), 4, 6), (peer(2), 6, 7)]


def test_missing_blocks_are_named():
    blocks = view({0: (0, 3), 1: (5, 8)}, 8)
    with pytest.raises(NoRouteError, match=r"block\(s\) 3, 4 of model 'm'") as error:
        fewest_hops_route(blocks, 0, 8, "m")
    assert error.value.missing_blocks == [3, 4]


def test_random_tie_break_spreads_load():
    blocks = view({0: (0, 8), 1: (0, 8)}, 8)
    rng = random.Random(1)
    chosen = {fewest_hops_route(blocks, 0, 8, "m", rng)[0].peer_id for _ in range(50)}
    assert chosen == {peer(0), peer(1)}


def test_new_peer_takes_the_weakest_window():
    blocks = view({0: (0, 4), 1: (0, 4), 2: (4, 6)}, 8)
    coverage = block_coverage(blocks)
    assert coverage == [2, 2, 2, 2, 1, 1, 0, 0]
    assert choose_span_start(coverage, 2) == 6
    assert choose_span_start(coverage, 4) == 4
    assert block_coverage(blocks, exclude=[peer(2)]) == [2, 2, 2, 2, 0, 0, 0, 0]
    offline = view({0: (0, 8)}, 8, state=ServerState.OFFLINE)
    assert block_coverage(offline) == [0] * 8
    with pytest.raises(ValueError, match="cannot serve 9 blocks"):
        choose_span_start(coverage, 9)
