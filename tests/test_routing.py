"""Route finding, stochastic wiring and block selection on synthetic swarm views."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
from hivemind.p2p import PeerID

from blockswarm.dht import ServerInfo, ServerState
from blockswarm.peer.block_selection import block_coverage, choose_move, choose_mover, choose_span_start
from blockswarm.pipeline.hops import NoRouteError
from blockswarm.routing.route import LatencyModel, StochasticWiring, min_latency_route, wired_route
from blockswarm.routing.swarm_view import SwarmView, usable_peers


def peer(n: int) -> PeerID:
    return PeerID(f"peer-{n}".encode())


def view(spans: dict[int, tuple[int, int]], num_blocks: int, state=ServerState.ONLINE, fields=None):
    """A swarm view: peer n serves spans[n]; fields[n] sets its other record fields."""
    blocks = [{} for _ in range(num_blocks)]
    for n, (start, end) in spans.items():
        info = ServerInfo(state=state, start=start, end=end, **(fields or {}).get(n, {}))
        for i in range(start, end):
            blocks[i][peer(n)] = info
    return blocks


def spans_of(route):
    return [(h.peer_id, h.start, h.end) for h in route]


def test_min_latency_prefers_the_low_latency_chain():
    blocks = view({0: (0, 8), 1: (0, 4), 2: (4, 8)}, 8)
    near = {peer(1): 0.001, peer(2): 0.001, peer(0): 0.5}
    assert spans_of(min_latency_route(blocks, 0, 8, "m", near)) == [(peer(1), 0, 4), (peer(2), 4, 8)]
    far = {peer(1): 0.2, peer(2): 0.2, peer(0): 0.01}
    assert spans_of(min_latency_route(blocks, 0, 8, "m", far)) == [(peer(0), 0, 8)]


def test_min_latency_weighs_compute_speed():
    fast, slow = {"inference_rps": 1000.0}, {"inference_rps": 10.0}
    blocks = view({0: (0, 8), 1: (0, 8)}, 8, fields={0: slow, 1: fast})
    rtts = {peer(0): 0.001, peer(1): 0.001}
    assert spans_of(min_latency_route(blocks, 0, 8, "m", rtts)) == [(peer(1), 0, 8)]
    # a slow peer is worth using for the blocks only it serves, then the fast one takes over
    blocks = view({0: (0, 8), 1: (3, 8)}, 8, fields={0: slow, 1: fast})
    assert spans_of(min_latency_route(blocks, 0, 8, "m", rtts)) == [(peer(0), 0, 3), (peer(1), 3, 8)]


def test_a_batching_peer_is_weighed_by_its_load():
    # both take 10 ms per block alone; a batching peer with 50 open sessions needs 51 / 1000 s per block per tick
    busy = {"inference_rps": 100.0, "batched_inference_tps": 1000.0, "active_sessions": 50}
    idle = {"inference_rps": 100.0, "batched_inference_tps": 1000.0, "active_sessions": 2}
    blocks = view({0: (0, 8), 1: (0, 8)}, 8, fields={0: busy, 1: idle})
    rtts = {peer(0): 0.001, peer(1): 0.001}
    assert spans_of(min_latency_route(blocks, 0, 8, "m", rtts)) == [(peer(1), 0, 8)]
    # a few sessions cost nothing: the tick is latency-bound, as fast as one session alone
    blocks = view({0: (0, 8), 1: (0, 8)}, 8, fields={0: idle, 1: {"inference_rps": 50.0}})
    assert spans_of(min_latency_route(blocks, 0, 8, "m", rtts)) == [(peer(0), 0, 8)]


def test_peers_without_cache_room_are_avoided_unless_nothing_else_serves():
    blocks = view({0: (0, 8), 1: (0, 8)}, 8, fields={0: {"cache_tokens_left": 10}, 1: {"cache_tokens_left": 5000}})
    rtts = {peer(0): 0.001, peer(1): 0.05}
    assert spans_of(min_latency_route(blocks, 0, 8, "m", rtts, cache_tokens_needed=100)) == [(peer(1), 0, 8)]
    only = view({0: (0, 8)}, 8, fields={0: {"cache_tokens_left": 10}})
    assert spans_of(min_latency_route(only, 0, 8, "m", {}, cache_tokens_needed=100)) == [(peer(0), 0, 8)]


def test_relayed_peers_cost_a_penalty_but_serve_when_alone():
    blocks = view({0: (0, 8), 1: (0, 8)}, 8, fields={0: {"using_relay": True}})
    rtts = {peer(0): 0.01, peer(1): 0.01}
    for seed in range(10):  # as fast as the direct peer: the relay's hop decides, not the random tie-break
        route = min_latency_route(blocks, 0, 8, "m", rtts, rng=random.Random(seed))
        assert spans_of(route) == [(peer(1), 0, 8)]
    # a relayed peer far faster than the penalty is still worth it; and it serves its blocks when alone
    assert spans_of(min_latency_route(blocks, 0, 8, "m", {peer(0): 0.01, peer(1): 0.5})) == [(peer(0), 0, 8)]
    alone = view({0: (0, 4), 1: (4, 8)}, 8, fields={1: {"using_relay": True}})
    assert spans_of(min_latency_route(alone, 0, 8, "m", rtts)) == [(peer(0), 0, 4), (peer(1), 4, 8)]
    free = LatencyModel(relay_penalty=0.0)
    chosen = {
        min_latency_route(blocks, 0, 8, "m", rtts, costs=free, rng=random.Random(s))[0].peer_id for s in range(20)
    }
    assert chosen == {peer(0), peer(1)}, "without the penalty, equal peers are equal"


def test_unknown_rtts_count_as_slow_but_usable():
    blocks = view({0: (0, 8), 1: (0, 8)}, 8)
    assert spans_of(min_latency_route(blocks, 0, 8, "m", {peer(1): 0.01})) == [(peer(1), 0, 8)]
    assert len(min_latency_route(blocks, 0, 8, "m", {})) == 1
    chosen = {min_latency_route(blocks, 0, 8, "m", {}, rng=random.Random(seed))[0].peer_id for seed in range(20)}
    assert chosen == {peer(0), peer(1)}, "equal costs should be broken at random"


def test_partial_ranges_use_sub_spans():
    spans = {0: (0, 3), 1: (2, 6), 2: (5, 8)}
    blocks = view(spans, 8)
    for start, end, hops in ((0, 8, 3), (4, 7, 2)):
        route = min_latency_route(blocks, start, end, "m")
        assert len(route) == hops
        assert route[0].start == start and route[-1].end == end
        assert all(a.end == b.start for a, b in zip(route, route[1:]))
        for hop in route:
            served = spans[int(hop.peer_id.to_bytes().decode().split("-")[1])]
            assert served[0] <= hop.start < hop.end <= served[1]


def test_missing_blocks_are_named():
    blocks = view({0: (0, 3), 1: (5, 8)}, 8)
    with pytest.raises(NoRouteError, match=r"block\(s\) 3, 4 of model 'm'") as error:
        min_latency_route(blocks, 0, 8, "m")
    assert error.value.missing_blocks == [3, 4]
    with pytest.raises(NoRouteError):
        wired_route(blocks, 0, 8, "m", StochasticWiring())


def test_bans_and_allow_block_lists_filter_peers():
    blocks = view({0: (0, 8), 1: (0, 8), 2: (0, 8)}, 8)
    assert set(usable_peers(blocks, excluded={peer(0)})[0]) == {peer(1), peer(2)}
    assert set(usable_peers(blocks, excluded=set(), allowed={peer(2)})[0]) == {peer(2)}
    offline = view({0: (0, 8)}, 8, state=ServerState.DRAINING)
    assert usable_peers(offline, excluded=set()) == [{}] * 8
    route = min_latency_route(usable_peers(blocks, excluded={peer(0), peer(1)}), 0, 8, "m")
    assert spans_of(route) == [(peer(2), 0, 8)]


def test_stochastic_wiring_shares_work_by_throughput():
    throughputs = {0: 100.0, 1: 200.0, 2: 50.0, 3: 650.0}
    blocks = view({n: (0, 8) for n in throughputs}, 8, fields={n: {"throughput": t} for n, t in throughputs.items()})
    wiring = StochasticWiring(rng=random.Random(0))
    counts = Counter(wired_route(blocks, 0, 8, "m", wiring)[0].peer_id for _ in range(2000))
    total = sum(throughputs.values())
    for n, throughput in throughputs.items():
        share = counts[peer(n)] / 2000
        assert abs(share - throughput / total) <= 0.1 * throughput / total, (n, share)


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


def test_a_move_lifts_the_weakest_blocks_it_can_and_only_by_a_clear_margin():
    # two weak regions: no single move lifts the bottleneck, but this peer takes one of them
    assert choose_move([10, 10, 30, 30, 10, 10, 30, 30], (6, 8), 10.0) == 0
    # 29 -> 30 is a tenth of this peer's throughput: not worth draining and reloading for
    assert choose_move([29, 29, 30, 30, 30, 30, 30, 30], (6, 8), 10.0) is None
    assert choose_move([29, 29, 30, 30, 30, 30, 30, 30], (6, 8), 10.0, min_gain=0.05) == 0
    # leaving block 6 would uncover it, however much the move helps blocks 0:2
    assert choose_move([0, 0, 30, 30, 30, 30, 0, 30], (5, 7), 10.0) is None


def test_exactly_one_peer_leaves_shared_blocks_for_a_gap():
    spans = {0: (0, 6), 1: (0, 6), 2: (4, 10)}  # blocks 10:16 lost their only peer
    balancing = {n: {"balancing": True} for n in spans}
    blocks = view(spans, 16, fields=balancing)
    # each of peers 0 and 1, deciding alone, would move there, and both leaving would uncover blocks 0:4
    assert choose_move(block_coverage(blocks, exclude=[peer(0)]), (0, 6), 1.0) == 10
    assert choose_move(block_coverage(blocks, exclude=[peer(1)]), (0, 6), 1.0) == 10

    mover = choose_mover(blocks)
    assert mover == (peer(0), 10) if str(peer(0)) < str(peer(1)) else (peer(1), 10)
    reordered = view(dict(reversed(spans.items())), 16, fields=balancing)
    assert choose_mover(reordered) == mover  # every peer reaches the same answer

    moved = dict(spans)
    moved[0 if mover[0] == peer(0) else 1] = (10, 16)
    after = view(moved, 16, fields=balancing)
    assert min(block_coverage(after)) == 1
    assert choose_mover(after) is None

    assert choose_mover(view(spans, 16)) is None  # pinned peers (--blocks, --train) never move
    draining = view(spans, 16, state=ServerState.DRAINING, fields=balancing)
    assert choose_mover(draining) is None


def test_a_busy_peer_is_avoided_briefly_and_a_failed_one_for_longer():
    swarm_view = SwarmView(None, "m", 8, ban_seconds=30.0)  # no DHT: its refreshes fail quietly
    try:
        swarm_view.ban(peer(0), seconds=0.2)  # busy: a short pause, not a failure
        assert not swarm_view.is_usable(peer(0))
        time.sleep(0.3)
        assert swarm_view.is_usable(peer(0))
        swarm_view.ban(peer(1))  # failed: banned for ban_seconds
        time.sleep(0.3)
        assert not swarm_view.is_usable(peer(1))
        swarm_view.ban(peer(1), seconds=0.1)  # a busy reply does not shorten a ban
        time.sleep(0.2)
        assert not swarm_view.is_usable(peer(1))
    finally:
        swarm_view.close()


def test_push_routes_prefer_peers_close_to_each_other():
    """Equal client RTTs everywhere, but peer 0 published a short next_pings to peer 3: pushed from 0 to 3, a step
    crosses a short link instead of going through the client; relayed, both chains cost the same."""
    far = 0.05
    fields = {n: {"next_pings": {peer(3).to_base58(): 0.002, peer(2).to_base58(): 0.2}} for n in (0, 1)}
    blocks = view({0: (0, 4), 1: (0, 4), 2: (4, 8), 3: (4, 8)}, 8, fields=fields)
    rtts = {peer(n): far for n in range(4)}
    for seed in range(10):
        route = min_latency_route(blocks, 0, 8, "m", rtts, rng=random.Random(seed))
        assert route[1].peer_id == peer(3)
    relayed = {
        min_latency_route(blocks, 0, 8, "m", rtts, rng=random.Random(seed), push=False)[1].peer_id for seed in range(20)
    }
    assert relayed == {peer(2), peer(3)}  # next_pings ignored: a tie, broken at random
