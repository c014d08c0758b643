"""Route finding over a swarm view.

Inference (`min_latency_route`): the cheapest chain of hops by expected step time. Hidden states go from the
client to each peer and back, so a hop costs the client's RTT to that peer, a fixed per-hop overhead, the
peer's compute time per block, and a large penalty where the peer's free KV cache cannot hold the session.
The search is a shortest path over (peer, block) nodes; since every edge moves forward in the block index,
a single pass in block order (dynamic programming on a DAG) finds it in O(total coverage).

Forward/backward (`wired_route`): SWARM stochastic wiring, see `StochasticWiring`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from hivemind.p2p import PeerID

from blockswarm.dht import ServerInfo
from blockswarm.pipeline.hops import Hop, NoRouteError


@dataclass(frozen=True)
class LatencyModel:
    unknown_rtt: float = 0.15  # seconds, for peers the client has not measured yet
    hop_overhead: float = 0.002  # serialization and scheduling per hop, measured on loopback
    unknown_block_time: float = 0.01  # seconds per block per step for peers that published no inference_rps
    no_cache_penalty: float = 100.0  # seconds: only used when no other peer can hold the session

    def block_time(self, info: ServerInfo) -> float:
        """Seconds per block of a step of one more session on this peer.

        Alone, a step takes 1 / inference_rps; a peer batching its sessions' steps computes every open session in
        each tick, so once it is busy, a tick of its sessions plus this one takes (sessions + 1) / batched rate.
        """
        alone = 1.0 / info.inference_rps if info.inference_rps else self.unknown_block_time
        if not info.batched_inference_tps:
            return alone
        return max(alone, (info.active_sessions + 1) / info.batched_inference_tps)


def _missing(blocks: Sequence[dict[PeerID, ServerInfo]], start: int, end: int, model: str) -> None:
    missing = [i for i in range(start, end) if not blocks[i]]
    if missing:
        raise NoRouteError(model, missing)


def min_latency_route(
    blocks: Sequence[dict[PeerID, ServerInfo]],
    start: int,
    end: int,
    model: str,
    rtts: dict[PeerID, float] | None = None,
    cache_tokens_needed: int = 0,
    costs: LatencyModel = LatencyModel(),
    rng: random.Random | None = None,
) -> list[Hop]:
    """`blocks[i]` lists the usable peers of block i. Equal costs are broken at random (load spreading)."""
    _missing(blocks, start, end, model)
    rng = rng or random.Random()
    rtts = rtts or {}
    hop_costs: dict[PeerID, tuple[float, float]] = {}  # peer -> (cost of entering it, seconds per block)
    best = [float("inf")] * (end + 1)  # cheapest known cost to have computed blocks [start, i)
    came_from: list[tuple[PeerID, int, ServerInfo] | None] = [None] * (end + 1)
    best[start] = 0.0
    # per peer: min over entry boundaries e of best[e] + entry - e * per_block, with the argmin e. Spans are
    # contiguous, so an entry stays valid while the peer keeps appearing block after block.
    running: dict[PeerID, tuple[float, int]] = {}
    for block in range(start, end):
        for peer, info in blocks[block].items():
            params = hop_costs.get(peer)
            if params is None:
                entry = rtts.get(peer, costs.unknown_rtt) + costs.hop_overhead + rng.random() * 1e-9  # random tie-break
                if info.cache_tokens_left < cache_tokens_needed:
                    entry += costs.no_cache_penalty
                params = hop_costs[peer] = (entry, costs.block_time(info))
            entry, per_block = params
            enter_here = best[block] + entry - block * per_block
            current = running.get(peer)
            if current is None or enter_here < current[0] or current[1] < info.start:
                running[peer] = current = (enter_here, block)
            cost = current[0] + (block + 1) * per_block
            if cost < best[block + 1]:
                best[block + 1] = cost
                came_from[block + 1] = (peer, current[1], info)
    hops: list[Hop] = []
    boundary = end
    while boundary > start:
        peer, entered, info = came_from[boundary]
        hops.append(hop_of(peer, info, entered, boundary))
        boundary = entered
    return hops[::-1]


@dataclass
class StochasticWiring:
    """SWARM wiring: each stage goes to the peer with the least expected time of work already sent to it,
    relative to its throughput, so a peer twice as fast gets about twice the micro-batches."""

    rng: random.Random = field(default_factory=random.Random)
    _sent: dict[PeerID, float] = field(default_factory=dict)

    def choose(self, candidates: dict[PeerID, ServerInfo], work: dict[PeerID, float]) -> PeerID:
        """`work[peer]`: what the peer would compute (e.g. blocks x tokens) if chosen."""

        def expected_time(peer: PeerID) -> tuple[float, float]:
            throughput = max(candidates[peer].throughput, 1e-9)
            return (self._sent.get(peer, 0.0) + work[peer]) / throughput, self.rng.random()

        peer = min(candidates, key=expected_time)
        self._sent[peer] = self._sent.get(peer, 0.0) + work[peer]
        return peer


def wired_route(
    blocks: Sequence[dict[PeerID, ServerInfo]], start: int, end: int, model: str, wiring: StochasticWiring
) -> list[Hop]:
    """Hops for one micro-batch: at each boundary the wiring picks among the peers holding the next block,
    and the chosen peer computes as far as its span goes."""
    _missing(blocks, start, end, model)
    hops, position = [], start
    while position < end:
        candidates = blocks[position]
        reach = {peer: min(info.end, end) for peer, info in candidates.items()}
        peer = wiring.choose(candidates, {p: reach[p] - position for p in candidates})
        hops.append(hop_of(peer, candidates[peer], position, reach[peer]))
        position = reach[peer]
    return hops


def hop_of(peer: PeerID, info: ServerInfo, start: int, end: int) -> Hop:
    """Blocks [start, end) on `peer`, with what it announced about how it computes and speaks."""
    return Hop(peer, start, end, tuple(info.codecs), info.dtype, info.quant)


def covering_hops(blocks: Sequence[dict[PeerID, ServerInfo]], start: int, end: int) -> list[Hop]:
    """Every peer of `blocks[start]` whose span reaches `end`, as a hop over exactly [start, end)."""
    return [hop_of(peer, info, start, end) for peer, info in blocks[start].items() if info.end >= end]


def describe_route(hops: Sequence[Hop]) -> str:
    return " -> ".join(f"{hop.peer_id}[{hop.start}:{hop.end}]" for hop in hops)
