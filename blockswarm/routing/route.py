"""Route finding over a swarm view: consecutive hops that cover a range of blocks."""

from __future__ import annotations

import random
from collections.abc import Sequence

from hivemind.p2p import PeerID

from blockswarm.dht import ServerInfo
from blockswarm.pipeline.hops import Hop, NoRouteError


def fewest_hops_route(
    blocks: Sequence[dict[PeerID, ServerInfo]],
    start: int,
    end: int,
    model: str,
    rng: random.Random | None = None,
) -> list[Hop]:
    """Greedy interval cover: from each block, take the peer that reaches furthest (random among equals).

    `blocks[i]` lists the usable peers of block i. Greedy furthest-reach is optimal for the number of hops.
    """
    rng = rng or random.Random()
    missing = [i for i in range(start, end) if not blocks[i]]
    if missing:
        raise NoRouteError(model, missing)
    hops, position = [], start
    while position < end:
        reach = {peer: min(info.end, end) for peer, info in blocks[position].items()}
        furthest = max(reach.values())
        peer = rng.choice(sorted((p for p, r in reach.items() if r == furthest), key=str))
        hops.append(Hop(peer, position, furthest))
        position = furthest
    return hops
