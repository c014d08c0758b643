"""Peer-to-peer push of inference steps: a peer sends its outputs straight to the next span's peer, which takes them
as its next step instead of waiting for the client to relay them (docs/architecture.md, "Inference and failover").

`PushInbox` holds, per open session that accepts pushes, the one peer allowed to push into it and a queue of pushed
steps its `rpc_inference` loop takes from. `Pusher` is the sending end: one stream per session to the next peer,
each step acknowledged once queued there (in the background); the first failure turns pushing off for the session
(the client relays).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from hivemind.p2p import P2P, PeerID

from blockswarm.peer.limits import RequestError
from blockswarm.wire.messages import PUSH_RPC, OpenSession, PushStep
from blockswarm.wire.payload_headers import read_payload_header
from blockswarm.wire.transport import Frame, WireError, WireStream

PUSH_TIMEOUT_S = 2.0  # a push not acknowledged this fast is reported failed, and the client relays the step
SESSION_WAIT_S = 5.0  # a push may arrive just before its session's OpenSession has been read: wait this long for it
MAX_ACK_BYTES = 0


@dataclass
class PushSlot:
    source: str  # base58 id of the only peer that may push into this session
    batch_size: int
    steps: asyncio.Queue[Frame[PushStep]]


class PushInbox:
    """The sessions of this peer that accept pushes, by session id."""

    def __init__(self) -> None:
        self._slots: dict[str, PushSlot] = {}
        self._opened = asyncio.Event()  # set (and replaced) whenever a session starts accepting pushes

    @contextlib.contextmanager
    def accepting(self, session: OpenSession) -> Iterator[asyncio.Queue[Frame[PushStep]] | None]:
        """While the session runs: the queue of steps pushed into it (None when its client named no push source)."""
        if session.push_from is None:
            yield None
            return
        if session.session_id in self._slots:
            raise RequestError(f"session {session.session_id!r} is already open here")
        slot = self._slots[session.session_id] = PushSlot(session.push_from, session.batch_size, asyncio.Queue(1))
        opened, self._opened = self._opened, asyncio.Event()
        opened.set()
        try:
            yield slot.steps
        finally:
            del self._slots[session.session_id]

    async def deliver(self, frame: Frame[PushStep], sender: PeerID) -> None:
        """Queue a pushed step for its session; RequestError when the session is not open here, does not accept
        pushes from `sender`, already has a step waiting, or the payload is not one tensor of the session's batch."""
        step = frame.meta
        slot = await self._slot(step.session_id)
        if slot is None:
            raise RequestError(f"no open session {step.session_id!r} accepts pushed steps here")
        if sender.to_base58() != slot.source:
            raise RequestError(
                f"session {step.session_id!r} accepts pushed steps only from the peer its client named, not from you"
            )
        if len(frame.payloads) != 1:
            raise RequestError(f"a pushed step carries one tensor of hidden states, got {len(frame.payloads)}")
        header = read_payload_header(frame.payloads[0])
        if len(header.shape) != 3 or header.shape[0] != slot.batch_size:
            raise RequestError(f"pushed states of shape {list(header.shape)}, expected [{slot.batch_size}, *, *]")
        if slot.steps.full():
            raise RequestError(f"session {step.session_id!r} has a pushed step waiting already")
        slot.steps.put_nowait(frame)

    async def _slot(self, session_id: str) -> PushSlot | None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SESSION_WAIT_S):
                while session_id not in self._slots:
                    await self._opened.wait()
        return self._slots.get(session_id)


class Pusher:
    """Sends a session's outputs to the next span's session, one frame per step, without waiting: the peer replies
    to its client at once, and the next peer's acknowledgements are read in the background. A push not acknowledged
    within PUSH_TIMEOUT_S turns pushing off for the session; the client relays from then on (and relays a step whose
    next peer is alive but silent: pipeline/span_session.py)."""

    def __init__(self, p2p: P2P, session: OpenSession):
        assert session.push_to is not None and session.push_session is not None
        self.p2p = p2p
        self.peer_id = PeerID.from_base58(session.push_to)
        self.session_id = session.push_session
        self.failed = False  # after a failure the client relays; pushing again could only duplicate its steps
        self._outbox: asyncio.Queue[tuple[int, list[bytes]]] = asyncio.Queue()
        self._sending = asyncio.ensure_future(self._send_all())  # opens the stream now, before the first step

    def push(self, position: int, payloads: list[bytes]) -> bool:
        """Send this step to the next peer; False once pushing is off for the session (the client relays)."""
        if self.failed:
            return False
        self._outbox.put_nowait((position, payloads))
        return True

    async def _send_all(self) -> None:
        stream = None
        try:
            async with asyncio.timeout(PUSH_TIMEOUT_S):
                stream = await WireStream.open(self.p2p, self.peer_id, PUSH_RPC, PUSH_TIMEOUT_S)
            while True:
                position, payloads = await self._outbox.get()
                stream.send(Frame(PushStep(session_id=self.session_id, position=position), payloads))
                await stream.receive(None, MAX_ACK_BYTES, PUSH_TIMEOUT_S)
        except (WireError, TimeoutError, OSError):
            self.failed = True
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.close()

    async def close(self) -> None:
        self._sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sending
