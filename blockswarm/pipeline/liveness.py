"""Telling a hung peer from a slow one in about a second, instead of waiting out the whole step timeout.

A step that takes several times longer than the span's recent steps of its kind makes the peer suspect, and the
client asks the peer for `info` with a short timeout. A peer that is only loaded answers at once (its event loop
answers `info` while its compute thread works), and the wait goes on; a stopped, hung or unreachable one does
not, and the step fails with a PeerError, so the session replaces that peer and replays its history. A step
waits at most `step_timeout` in all, answered probes or not.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from hivemind.p2p import P2P, PeerID

from blockswarm.pipeline.hops import PeerError
from blockswarm.wire.ping import request_status

T = TypeVar("T")

SUSPECT_FLOOR_S = 0.5  # never suspect a peer sooner than this into a step
SUSPECT_FACTOR = 3.0  # suspect a step that takes this many times the slowest recent step of its kind
# an `info` probe unanswered for twice the fastest recent step (at least one round trip), within these bounds, means
# the peer is hung or unreachable: a loaded peer answers `info` in about a round trip
PROBE_TIMEOUT_S = (0.5, 2.0)
RECENT_STEPS = 16  # recent step durations remembered per kind


class Liveness:
    """Watches the steps of one peer: how long recent ones took, and probes the peer when one takes too long."""

    def __init__(self, p2p: P2P, peer_id: PeerID):
        self.p2p = p2p
        self.peer_id = peer_id
        self.probes = 0  # answered and unanswered, for tests and logs
        self._recent: dict[bool, deque[float]] = {True: deque(maxlen=RECENT_STEPS), False: deque(maxlen=RECENT_STEPS)}

    def suspect_after(self, decode: bool) -> float:
        """Seconds into a step (a decode step of one token, or a longer one) after which the peer is probed."""
        recent = self._recent[decode]
        return max(SUSPECT_FLOOR_S, SUSPECT_FACTOR * max(recent, default=0.0))

    @property
    def probe_timeout(self) -> float:
        fastest = min((*self._recent[True], *self._recent[False]), default=0.0)
        low, high = PROBE_TIMEOUT_S
        return min(high, max(low, 2 * fastest))

    async def wait(self, reply: Awaitable[T], decode: bool, if_alive: Callable[[], None] | None = None) -> T:
        """`reply`'s result; PeerError as soon as the peer, asked while the reply is overdue, does not answer.
        `if_alive` is called once, the first time the peer answers while the reply is overdue."""
        task = asyncio.ensure_future(reply)
        began = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.suspect_after(decode))
                if done:
                    result = task.result()  # a failed reply raises its own PeerError here
                    self._recent[decode].append(time.monotonic() - began)
                    return result
                await self._probe(time.monotonic() - began)
                if if_alive is not None:
                    if_alive, called = None, if_alive
                    called()
        finally:
            task.cancel()

    async def _probe(self, waited: float) -> None:
        self.probes += 1
        timeout = self.probe_timeout
        try:
            await request_status(self.p2p, self.peer_id, timeout)
        except Exception as e:  # no answer in time, a broken connection, a malformed reply: not serving
            raise PeerError(
                self.peer_id,
                f"no reply after {waited:.1f} s and no answer to `info` within {timeout:.2f} s: hung or "
                f"unreachable ({type(e).__name__})",
            ) from e
