"""The router a client hands to the pipeline: routes from the swarm view, refreshed when blocks look uncovered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from hivemind.p2p import P2P, PeerID

from blockswarm.pipeline.hops import Hop, NoRouteError
from blockswarm.routing.route import (
    LatencyModel,
    StochasticWiring,
    covering_hops,
    min_latency_route,
    wired_route,
)
from blockswarm.routing.swarm_view import SwarmView
from blockswarm.wire.ping import RttEma, measure_rtt

T = TypeVar("T")

MAX_PINGS_PER_ROUND = 64


class SwarmRouter:
    def __init__(self, view: SwarmView, costs: LatencyModel = LatencyModel(), push: bool = True):
        """`push`: sessions push between peers, so routes count the peers' own RTTs to each other (next_pings)."""
        self.view = view
        self.costs = costs
        self.push = push
        self.rtts = RttEma()
        self.wiring = StochasticWiring()

    def route(self, start: int, end: int, cache_tokens_needed: int = 0) -> list[Hop]:
        """Fastest chain for an inference session over blocks [start, end)."""
        return self._with_refresh(
            lambda blocks: min_latency_route(
                blocks,
                start,
                end,
                self.view.model,
                self.rtts.snapshot(),
                cache_tokens_needed,
                self.costs,
                push=self.push,
            )
        )

    def wire(self, start: int, end: int) -> list[Hop]:
        """Hops for one forward/backward micro-batch, spreading work over peers by throughput."""
        return self._with_refresh(lambda blocks: wired_route(blocks, start, end, self.view.model, self.wiring))

    def ban(self, peer_id: PeerID, seconds: float | None = None) -> None:
        self.view.ban(peer_id, seconds)

    def is_usable(self, peer_id: PeerID) -> bool:
        return self.view.is_usable(peer_id)

    def covering(self, start: int, end: int) -> list[Hop]:
        """Usable peers serving all of [start, end); no DHT refresh: it runs on the event loop, and a missing
        checker only skips a spot check."""
        return covering_hops(self.view.usable_blocks(), start, end)

    def distrust(self, peer_id: PeerID) -> None:
        self.view.distrust(peer_id)

    async def ping_peers(self, p2p: P2P) -> None:
        """Measure RTTs to the peers we know, those never measured first."""
        peers = sorted(self.view.peers(), key=lambda peer: self.rtts.get(peer) is not None)[:MAX_PINGS_PER_ROUND]
        results = await asyncio.gather(*(measure_rtt(p2p, peer, timeout=2.0) for peer in peers))
        for peer, rtt in zip(peers, results):
            if rtt is not None:
                self.rtts.update(peer, rtt)

    def _with_refresh(self, find: Callable[[list], T]) -> T:
        try:
            return find(self.view.usable_blocks())
        except NoRouteError:
            self.view.refresh()
            return find(self.view.usable_blocks())
