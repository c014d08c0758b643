"""The `info` call: a peer's status, and round-trip times measured with it (smoothed, forgotten when stale)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from hivemind.p2p import P2P, PeerID

from blockswarm.wire.messages import INFO_RPC, PeerStatus
from blockswarm.wire.transport import REPLY, REQUEST, read_meta


async def request_status(p2p: P2P, peer_id: PeerID, timeout: float = 5.0) -> PeerStatus:
    """The peer's `info` reply; raises TimeoutError, a transport error, or FramingError for a malformed reply."""
    reply = await asyncio.wait_for(p2p.call_protobuf_handler(peer_id, INFO_RPC, REQUEST(), REPLY), timeout)
    return read_meta(reply, PeerStatus)


async def measure_rtt(p2p: P2P, peer_id: PeerID, timeout: float = 5.0) -> float | None:
    """Seconds for one `info` round trip, or None when the peer does not answer in time."""
    began = time.perf_counter()
    try:
        await request_status(p2p, peer_id, timeout)
    except Exception:  # any failure means "unreachable now"; the caller treats it as no measurement
        return None
    return time.perf_counter() - began


@dataclass
class RttEma:
    """Exponential moving average of RTTs per peer; a value older than `max_age` seconds counts as unknown."""

    alpha: float = 0.3
    max_age: float = 300.0
    _values: dict[PeerID, tuple[float, float]] = field(default_factory=dict)

    def update(self, peer_id: PeerID, rtt: float) -> None:
        previous = self.get(peer_id)
        value = rtt if previous is None else self.alpha * rtt + (1 - self.alpha) * previous
        self._values[peer_id] = (value, time.monotonic())

    def get(self, peer_id: PeerID) -> float | None:
        entry = self._values.get(peer_id)
        if entry is None or time.monotonic() - entry[1] > self.max_age:
            return None
        return entry[0]

    def snapshot(self) -> dict[PeerID, float]:
        return {peer: value for peer in list(self._values) if (value := self.get(peer)) is not None}
