"""Round-trip times from this peer to the peers serving the block right after its span, published in its record as
next_pings: clients' routes count them as the cost of pushing a step to the next peer, and the monitor shows them."""

from __future__ import annotations

import asyncio

from hivemind.p2p import P2P

from blockswarm.dht import SwarmNode, get_block_servers
from blockswarm.wire.ping import RttEma, measure_rtt

MAX_NEXT_PINGS = 8


class NextPeerPinger:
    def __init__(self, node: SwarmNode, model_name: str, total_blocks: int):
        self.node = node
        self.model_name = model_name
        self.total_blocks = total_blocks
        self.rtts = RttEma()

    async def ping(self, p2p: P2P, span_end: int) -> None:
        if span_end >= self.total_blocks:
            return
        (successors,) = await asyncio.to_thread(
            get_block_servers, self.node.dht, self.model_name, span_end, span_end + 1
        )
        peers = list(successors)[:MAX_NEXT_PINGS]
        for peer, rtt in zip(peers, await asyncio.gather(*(measure_rtt(p2p, peer, timeout=2.0) for peer in peers))):
            if rtt is not None:
                self.rtts.update(peer, rtt)

    def snapshot(self) -> dict[str, float]:
        """Fresh RTTs in seconds by base58 peer id, as records carry them."""
        return {peer.to_base58(): rtt for peer, rtt in self.rtts.snapshot().items()}
