"""The client's picture of the swarm: who serves which block, refreshed from the DHT, minus banned peers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from hivemind.dht import DHT
from hivemind.p2p import PeerID

from blockswarm.dht import ServerInfo, ServerState, get_block_servers

logger = logging.getLogger(__name__)

LEAVING_STATES = (ServerState.DRAINING, ServerState.OFFLINE)


def usable_peers(
    blocks: list[dict[PeerID, ServerInfo]],
    excluded: set[PeerID],
    allowed: set[PeerID] | None = None,
    training: bool = False,
) -> list[dict[PeerID, ServerInfo]]:
    """Per block, the ONLINE peers that are not excluded (and are allowed, when an allow list is given).

    Peers started with --train (their weights move) serve SWARM trainers only, and trainers use only them."""
    return [
        {
            peer: info
            for peer, info in block.items()
            if info.state == ServerState.ONLINE
            and info.training == training
            and peer not in excluded
            and (allowed is None or peer in allowed)
        }
        for block in blocks
    ]


class SwarmView:
    """Refreshed in a background thread every `refresh_period` seconds, and on demand when routes fail.

    A failing peer is banned for `ban_seconds`, doubled on each repeated failure up to `max_ban_seconds`; a peer
    caught lying (spot checks, pipeline/verification.py) is distrusted: never used again by this view.
    `allowed_peers` (if given) pins routing to those peers; `blocked_peers` are never used. With `training`, the
    view holds the peers that train their blocks (SWARM), otherwise the frozen ones.
    """

    def __init__(
        self,
        dht: DHT,
        model: str,
        num_blocks: int,
        refresh_period: float = 10.0,
        ban_seconds: float = 15.0,
        max_ban_seconds: float = 300.0,
        allowed_peers: Iterable[PeerID] | None = None,
        blocked_peers: Iterable[PeerID] = (),
        training: bool = False,
    ):
        self.dht = dht
        self.model = model
        self.num_blocks = num_blocks
        self.refresh_period = refresh_period
        self.ban_seconds = ban_seconds
        self.max_ban_seconds = max_ban_seconds
        self.allowed_peers = None if allowed_peers is None else set(allowed_peers)
        self.blocked_peers = set(blocked_peers)
        self.training = training
        self._blocks: list[dict[PeerID, ServerInfo]] = [{} for _ in range(num_blocks)]
        self._leaving: set[PeerID] = set()
        self._banned_until: dict[PeerID, float] = {}
        self._failures: dict[PeerID, int] = {}
        self._distrusted: set[PeerID] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refreshed = threading.Event()
        self._thread = threading.Thread(target=self._refresh_forever, name="blockswarm-swarm-view", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        blocks = get_block_servers(self.dht, self.model, 0, self.num_blocks, latest=True)
        leaving = {peer for block in blocks for peer, info in block.items() if info.state in LEAVING_STATES}
        with self._lock:
            self._blocks, self._leaving = blocks, leaving
        self._refreshed.set()

    def usable_blocks(self) -> list[dict[PeerID, ServerInfo]]:
        """ONLINE, unbanned peers per block (after the first refresh has completed)."""
        if not self._refreshed.is_set():
            self.refresh()
        now = time.monotonic()
        with self._lock:
            banned = {peer for peer, until in self._banned_until.items() if until > now}
            excluded = self.blocked_peers | self._distrusted | banned
            return usable_peers(self._blocks, excluded, self.allowed_peers, self.training)

    def peers(self) -> set[PeerID]:
        """Every peer the view knows as ONLINE, usable or not."""
        with self._lock:
            return {peer for block in self._blocks for peer, info in block.items() if info.state == ServerState.ONLINE}

    def is_usable(self, peer_id: PeerID) -> bool:
        return (
            peer_id not in self._leaving
            and peer_id not in self._distrusted
            and self._banned_until.get(peer_id, 0) <= time.monotonic()
        )

    def distrust(self, peer_id: PeerID) -> None:
        """Never use `peer_id` again: it was caught returning wrong outputs. Unlike a ban, this does not expire."""
        with self._lock:
            self._distrusted.add(peer_id)

    def distrusted(self) -> set[PeerID]:
        with self._lock:
            return set(self._distrusted)

    def ban(self, peer_id: PeerID, seconds: float | None = None) -> None:
        """Avoid a failed peer (longer on each failure), or a busy one for `seconds`."""
        with self._lock:
            if seconds is None:
                failures = self._failures[peer_id] = self._failures.get(peer_id, 0) + 1
                seconds = min(self.ban_seconds * 2 ** (failures - 1), self.max_ban_seconds)
            self._banned_until[peer_id] = max(self._banned_until.get(peer_id, 0.0), time.monotonic() + seconds)

    def close(self) -> None:
        self._stop.set()

    def _refresh_forever(self) -> None:
        while not self._stop.wait(0 if not self._refreshed.is_set() else self.refresh_period):
            try:
                self.refresh()
            except Exception as e:  # the DHT may be unreachable for a while; the next period tries again
                if self._stop.is_set():
                    return
                logger.warning("could not refresh the swarm view of %s: %s", self.model, e)
