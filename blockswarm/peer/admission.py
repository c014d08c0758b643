"""Whether a peer takes a request now: caps on open streams per caller and in total, and whether it is leaving;
and how many requests are computing, which a leaving peer waits for."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator

from blockswarm.peer.limits import PeerBusy, ServingLimits


class PeerLeaving(RuntimeError):
    """The peer is shutting down: the caller should continue with another peer."""


class Admission:
    def __init__(self, limits: ServingLimits):
        self.limits = limits
        self.active_requests = 0  # requests computing right now
        self._streams_per_peer: Counter = Counter()
        self._streams = 0
        self.leaving = asyncio.get_running_loop().create_future()  # done once the peer refuses new work

    @contextlib.contextmanager
    def stream(self, remote: object) -> Iterator[None]:
        """Count a stream from `remote` while it is open; PeerBusy at once when a cap is reached."""
        limits = self.limits
        if self._streams_per_peer[remote] >= limits.max_streams_per_peer:
            raise PeerBusy(
                f"{self._streams_per_peer[remote]} streams from your peer id are open here, the limit is "
                f"{limits.max_streams_per_peer}",
                limits.busy_retry_after,
            )
        if self._streams >= limits.max_streams:
            raise PeerBusy(f"this peer serves its limit of {limits.max_streams} streams", limits.busy_retry_after)
        self._streams_per_peer[remote] += 1
        self._streams += 1
        try:
            yield
        finally:
            self._streams -= 1
            self._streams_per_peer[remote] -= 1
            if not self._streams_per_peer[remote]:
                del self._streams_per_peer[remote]

    @contextlib.contextmanager
    def computing(self) -> Iterator[None]:
        self.active_requests += 1
        try:
            yield
        finally:
            self.active_requests -= 1

    def check_not_leaving(self) -> None:
        if self.leaving.done():
            raise PeerLeaving("peer leaving: it is shutting down, continue with another peer")

    def begin_leaving(self) -> None:
        """Refuse new work and tell every open session to move on; steps already running still finish."""
        if not self.leaving.done():
            self.leaving.set_result(None)

    def accept_again(self) -> None:
        """Take new work again (after a rebalancing move)."""
        self.leaving = asyncio.get_running_loop().create_future()

    async def wait_idle(self, grace_period: float) -> None:
        """Until no request computes, or `grace_period` seconds have passed."""
        deadline = asyncio.get_running_loop().time() + grace_period
        while self.active_requests and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
