"""One request/reply stream to one peer, with timeouts, turning every wire failure into PeerError."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from hivemind.p2p import P2P, PeerID

from blockswarm.pipeline.hops import PeerError
from blockswarm.wire.messages import Message
from blockswarm.wire.transport import Frame, PeerBusyError, WireError, WireStream

MAX_REPLY_BYTES = 2**31


class PeerStream:
    """A `WireStream` to one peer whose failures (error replies, broken or closed streams, timeouts, undecodable
    tensors) are PeerErrors naming that peer, which the pipeline retries elsewhere."""

    def __init__(self, peer_id: PeerID, stream: WireStream):
        self.peer_id = peer_id
        self._stream = stream

    @classmethod
    async def open(cls, p2p: P2P, peer_id: PeerID, rpc: str, timeout: float) -> PeerStream:
        with _peer_errors(peer_id):
            return cls(peer_id, await WireStream.open(p2p, peer_id, rpc, timeout))

    def send(self, meta: Message | None, payloads: list[bytes]) -> None:
        """Queue one frame for writing; `payloads` are tensors already encoded (wire.transport.encode)."""
        self._stream.send(Frame(meta, payloads))

    async def receive(self, schema: type[Message] | None, timeout: float) -> tuple[Message | None, list[torch.Tensor]]:
        """The next reply's metadata and its decoded tensors."""
        frame, tensors = await self.receive_frame(schema, timeout)
        return frame.meta, tensors

    async def receive_frame(self, schema: type[Message] | None, timeout: float) -> tuple[Frame, list[torch.Tensor]]:
        """The next reply as it came (its payloads still encoded) and its tensors decoded."""
        with _peer_errors(self.peer_id):
            frame = await self._stream.receive(schema, MAX_REPLY_BYTES, timeout)
            return frame, frame.tensors()

    async def close(self) -> None:
        await self._stream.close()


async def call(
    p2p: P2P,
    peer_id: PeerID,
    rpc: str,
    meta: Message,
    payloads: list[bytes],
    timeout: float,
) -> list[torch.Tensor]:
    """One request, one reply over a fresh stream (forward/backward carry tensors above the unary size limit).
    `payloads` are tensors already encoded (wire.transport.encode)."""
    stream = await PeerStream.open(p2p, peer_id, rpc, timeout)
    try:
        stream.send(meta, payloads)
        _, outputs = await stream.receive(None, timeout)
        return outputs
    finally:
        await stream.close()


@contextlib.contextmanager
def _peer_errors(peer_id: PeerID) -> Iterator[None]:
    try:
        yield
    except PeerBusyError as e:
        raise PeerError(peer_id, str(e), retry_after=e.retry_after) from e
    except WireError as e:
        raise PeerError(peer_id, str(e)) from e
