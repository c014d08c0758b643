"""Whether a peer takes a request now: caps on open streams (per caller and in total), on the decoded adapter bytes
and the received tensor bytes all requests hold; and whether it is leaving. Over a cap, a busy reply at once. The
caps on requests waiting for compute are the scheduler's (`Scheduler.admit`); a leaving peer waits for them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from blockswarm.peer.limits import CallerCounts, PeerBusy, RequestError, ServingLimits
from blockswarm.peer.scheduler import Scheduler
from blockswarm.wire.messages import ChainRequest, OpenSession
from blockswarm.wire.payload_headers import payload_headers
from blockswarm.wire.transport import Frame


class PeerLeaving(RuntimeError):
    """The peer is shutting down: the caller should continue with another peer."""


class Admission:
    def __init__(self, limits: ServingLimits, scheduler: Scheduler):
        self.limits = limits
        self.scheduler = scheduler
        self.adapter_bytes = 0  # decoded adapter bytes held by running requests and open sessions
        self.receiving_bytes = 0  # tensor bytes of the frames requests receive or hold
        self._streams = CallerCounts(
            limits.max_streams_per_peer,
            limits.max_streams,
            "{count} streams from your peer id are open here, the limit is {limit}",
            "this peer serves its limit of {limit} streams",
            limits.busy_retry_after,
        )
        self.leaving = asyncio.get_running_loop().create_future()  # done once the peer refuses new work

    @property
    def active_requests(self) -> int:
        """Requests waiting for compute or computing right now."""
        return self.scheduler.active_requests

    @contextlib.contextmanager
    def stream(self, remote: object) -> Iterator[None]:
        """Count a stream from `remote` while it is open; PeerBusy at once when a cap is reached."""
        with self._streams.holding(remote):
            yield

    def adapter_room(self, frame: Frame[OpenSession | ChainRequest], begin: int) -> AbstractContextManager:
        """Check the size of the adapter in the payloads from `begin` on, from its tensors' headers (before any is
        decoded), then hold its decoded bytes against the peer's budget while the request or session runs."""
        request, count = frame.meta, len(frame.payloads) - begin
        if request.adapter is None:
            if count:
                raise RequestError(f"{count} unexpected tensor(s) after the activations, and no adapter")
            return contextlib.nullcontext()
        decoded = 4 * sum(header.numel for header in payload_headers(frame, begin))  # decoded to float32
        self.limits.check_adapter_bytes(frame.nbytes(begin), decoded)
        return self.holding_adapter(decoded)

    @contextlib.contextmanager
    def holding_adapter(self, nbytes: int) -> Iterator[None]:
        """Count `nbytes` of decoded adapter tensors while a request or session holds them; PeerBusy at once when
        they would take the peer over max_adapter_bytes_total."""
        limit = self.limits.max_adapter_bytes_total
        if nbytes and self.adapter_bytes + nbytes > limit:
            raise PeerBusy(
                f"adapters of running requests take {self.adapter_bytes} bytes here, {nbytes} more would exceed the "
                f"limit of {limit} (max_adapter_bytes_total)",
                self.limits.busy_retry_after,
            )
        self.adapter_bytes += nbytes
        try:
            yield
        finally:
            self.adapter_bytes -= nbytes

    @contextlib.contextmanager
    def receiving(self) -> Iterator[Callable[[int], None]]:
        """While a request runs: `hold(nbytes)` counts the tensor bytes its latest frame announces (a session's next
        step replaces its last); PeerBusy at once when they would take the peer over max_receiving_bytes."""
        held = 0

        def hold(nbytes: int) -> None:
            nonlocal held
            limit = self.limits.max_receiving_bytes
            if nbytes and self.receiving_bytes - held + nbytes > limit:
                raise PeerBusy(
                    f"requests being received here take {self.receiving_bytes} bytes, {nbytes} more would exceed "
                    f"the limit of {limit} (max_receiving_bytes)",
                    self.limits.busy_retry_after,
                )
            self.receiving_bytes += nbytes - held
            held = nbytes

        try:
            yield hold
        finally:
            self.receiving_bytes -= held

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
