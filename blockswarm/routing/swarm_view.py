"""The client's picture of the swarm: who serves which block, refreshed from the DHT, minus banned peers."""

from __future__ import annotations

import threading
import time

from hivemind.dht import DHT
from hivemind.p2p import PeerID

from blockswarm.dht import ServerInfo, ServerState, get_block_servers


class SwarmView:
    def __init__(self, dht: DHT, model: str, num_blocks: int, max_age: float = 30.0, ban_seconds: float = 15.0):
        self.dht = dht
        self.model = model
        self.num_blocks = num_blocks
        self.max_age = max_age
        self.ban_seconds = ban_seconds
        self._blocks: list[dict[PeerID, ServerInfo]] = [{} for _ in range(num_blocks)]
        self._updated = -float("inf")
        self._banned_until: dict[PeerID, float] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        blocks = get_block_servers(self.dht, self.model, 0, self.num_blocks, latest=True)
        with self._lock:
            self._blocks = blocks
            self._updated = time.monotonic()

    def usable_blocks(self) -> list[dict[PeerID, ServerInfo]]:
        """ONLINE, unbanned peers per block, refreshing first when the view is stale."""
        if time.monotonic() - self._updated > self.max_age:
            self.refresh()
        now = time.monotonic()
        with self._lock:
            return [
                {
                    peer: info
                    for peer, info in block.items()
                    if info.state == ServerState.ONLINE and self._banned_until.get(peer, 0) <= now
                }
                for block in self._blocks
            ]

    def ban(self, peer_id: PeerID) -> None:
        with self._lock:
            self._banned_until[peer_id] = time.monotonic() + self.ban_seconds
