"""A peer's life cycle: JOINING -> ONLINE -> DRAINING -> OFFLINE, and back to JOINING when it moves its span.

Each change is announced at once. Leaving always drains first (new work is refused, running requests get up to
the grace period) and ends with OFFLINE announced whenever the DHT can still take it; the announcements are
bounded in time, so a peer whose DHT process is gone still exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

from blockswarm.dht import ServerState
from blockswarm.peer.handlers import RequestHandlers

NEXT_STATES = {
    ServerState.JOINING: (ServerState.ONLINE, ServerState.OFFLINE),
    ServerState.ONLINE: (ServerState.DRAINING,),
    ServerState.DRAINING: (ServerState.OFFLINE,),
    ServerState.OFFLINE: (ServerState.JOINING,),
}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Lifecycle:
    def __init__(self, announce: Callable[[], Awaitable[object]], grace_period: float):
        """`announce()` stores the peer's record as of now (this lifecycle's `state` included)."""
        self.state = ServerState.JOINING
        self.grace_period = grace_period
        self._announce = announce
        self._stop = asyncio.Event()

    async def enter(self, state: ServerState) -> None:
        if state not in NEXT_STATES[self.state]:
            raise RuntimeError(f"a peer cannot go from {self.state.value} to {state.value}")
        self.state = state
        await self._announce()

    def stop_on_signals(self) -> None:
        """SIGINT and SIGTERM (to this process alone or to its whole group) make the peer leave."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stop.set)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def wait_stop(self, timeout: float) -> bool:
        """True once the peer is asked to stop; False when `timeout` seconds pass first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout)
        return self._stop.is_set()

    async def drain(self, handlers: RequestHandlers) -> None:
        """DRAINING: refuse new work, let running requests finish within the grace period."""
        await self.enter(ServerState.DRAINING)
        handlers.admission.begin_leaving()
        await handlers.admission.wait_idle(self.grace_period)

    async def leave(self, handlers: RequestHandlers) -> None:
        await self.drain(handlers)
        await self.enter(ServerState.OFFLINE)
