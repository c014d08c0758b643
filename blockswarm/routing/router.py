"""The router a client hands to the pipeline: routes from the swarm view, refreshed when blocks look uncovered."""

from __future__ import annotations

from hivemind.p2p import PeerID

from blockswarm.pipeline.hops import Hop, NoRouteError
from blockswarm.routing.route import fewest_hops_route
from blockswarm.routing.swarm_view import SwarmView


class SwarmRouter:
    def __init__(self, view: SwarmView):
        self.view = view

    def route(self, start: int, end: int) -> list[Hop]:
        try:
            return fewest_hops_route(self.view.usable_blocks(), start, end, self.view.model)
        except NoRouteError:
            self.view.refresh()
            return fewest_hops_route(self.view.usable_blocks(), start, end, self.view.model)

    def ban(self, peer_id: PeerID) -> None:
        self.view.ban(peer_id)

    def is_usable(self, peer_id: PeerID) -> bool:
        return self.view.is_usable(peer_id)
