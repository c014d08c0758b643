"""Route finding over a swarm view.

Inference (`min_latency_route`): the cheapest chain of hops by expected step time. Hidden states go from the
client to the first peer, from each peer to the next (pushed directly, or relayed through the client), and from
the last back to the client; a hop also costs a fixed per-hop overhead, the peer's compute time per block, a penalty
for a peer reached through a circuit relay (its traffic crosses a third machine, whose load and bandwidth the RTT
does not show), and a large penalty where the peer's free KV cache cannot hold the session. The search is a
shortest path over (boundary, last peer) states; since every edge moves forward in the block index, a single pass
in block order (dynamic programming on a DAG) finds it in O(sum over blocks of the peers of a block times those of
the next).

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
    relay_penalty: float = 0.1  # seconds per hop through a peer that announces using_relay

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
    push: bool = True,
) -> list[Hop]:
    """`blocks[i]` lists the usable peers of block i. Equal costs are broken at random (load spreading).

    A step's trips: client -> first peer, each peer -> the next, last peer -> client, each half an RTT. With `push`,
    a trip between two peers costs half the first one's published `next_pings` to the second where it has one;
    otherwise (and without push) it goes through the client: half the client's RTTs to both."""
    _missing(blocks, start, end, model)
    rng = rng or random.Random()
    rtts = rtts or {}
    rtt = {peer: rtts.get(peer, costs.unknown_rtt) for block in blocks[start:end] for peer in block}
    hop_costs: dict[PeerID, tuple[float, float]] = {}  # peer -> (fixed cost of a hop on it, seconds per block)
    infos: dict[PeerID, ServerInfo] = {}

    def trip(before: PeerID, after: PeerID) -> float:
        direct = infos[before].next_pings.get(after.to_base58()) if push else None
        return (rtt[before] + rtt[after]) / 2 if direct is None else direct / 2

    # ending[b][peer] = (cheapest cost of blocks [start, b) with a last hop on `peer`, the block where that hop
    # began, the peer of the hop before it). Per peer, `running` keeps min over entry boundaries e of
    # cost(entering at e) - e * per_block and its argmin: spans are contiguous, so an entry stays valid while the
    # peer keeps appearing block after block.
    ending: list[dict[PeerID, tuple[float, int, PeerID | None]]] = [{} for _ in range(end + 1)]
    running: dict[PeerID, tuple[float, int, PeerID | None]] = {}
    for block in range(start, end):
        for peer, info in blocks[block].items():
            infos.setdefault(peer, info)
            params = hop_costs.get(peer)
            if params is None:
                fixed = costs.hop_overhead + rng.random() * 1e-9  # random tie-break
                if info.cache_tokens_left < cache_tokens_needed:
                    fixed += costs.no_cache_penalty
                if info.using_relay:
                    fixed += costs.relay_penalty
                params = hop_costs[peer] = (fixed, costs.block_time(info))
            fixed, per_block = params
            if block == start:
                entry, before = rtt[peer] / 2, None
            else:
                entry, before = min(
                    ((cost + trip(prev, peer), prev) for prev, (cost, _, _) in ending[block].items() if prev != peer),
                    key=lambda option: option[0],
                    default=(float("inf"), None),
                )
            enter_here = entry + fixed - block * per_block
            current = running.get(peer)
            if current is None or enter_here < current[0] or current[1] < info.start:
                running[peer] = current = (enter_here, block, before)
            ending[block + 1][peer] = (current[0] + (block + 1) * per_block, current[1], current[2])
    last = min(ending[end], key=lambda peer: ending[end][peer][0] + rtt[peer] / 2)
    hops: list[Hop] = []
    boundary, peer = end, last
    while boundary > start:
        _, entered, before = ending[boundary][peer]
        hops.append(hop_of(peer, blocks[entered][peer], entered, boundary))
        boundary, peer = entered, before
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
