"""One request/reply stream to one peer, with timeouts, turning every transport failure into PeerError."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from blockswarm.compression.codecs import WireFormatError, decode_tensor, encode_tensor
from blockswarm.pipeline.hops import PeerError
from blockswarm.wire.framing import FramingError, pack, receive
from blockswarm.wire.messages import Message

MAX_REPLY_BYTES = 2**31


class PeerStream:
    """Frames go out through a queue (the stream stays open between steps); replies are read one frame at a time."""

    def __init__(self, peer_id: PeerID, outbox: asyncio.Queue, replies: AsyncIterator):
        self.peer_id = peer_id
        self._outbox = outbox
        self._replies = replies

    @classmethod
    async def open(cls, p2p: P2P, peer_id: PeerID, rpc: str, timeout: float) -> PeerStream:
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests() -> AsyncIterator:
            while (message := await outbox.get()) is not None:
                yield message

        try:
            replies = await asyncio.wait_for(
                p2p.iterate_protobuf_handler(peer_id, rpc, requests(), runtime_pb2.ExpertResponse), timeout
            )
        except (P2PDaemonError, P2PHandlerError, OSError, asyncio.TimeoutError) as e:
            raise PeerError(peer_id, f"could not open {rpc}: {e or type(e).__name__}") from e
        return cls(peer_id, outbox, replies)

    def send(self, meta: Message | None, payloads: list[bytes]) -> None:
        """Queue one frame; `payloads` are tensors already encoded with `encode_tensor`."""
        for message in pack(meta, payloads):
            self._outbox.put_nowait(message)

    async def receive(self, schema: type[Message] | None, timeout: float) -> tuple[Message | None, list[torch.Tensor]]:
        try:
            frame = await asyncio.wait_for(receive(self._replies, schema, MAX_REPLY_BYTES), timeout)
        except asyncio.TimeoutError:
            raise PeerError(self.peer_id, f"no reply within {timeout:.1f} s") from None
        except P2PHandlerError as e:
            raise PeerError(self.peer_id, str(e).split(": ", 1)[-1]) from None
        except (P2PDaemonError, OSError, FramingError, WireFormatError, asyncio.IncompleteReadError) as e:
            raise PeerError(self.peer_id, f"broken reply: {e or type(e).__name__}") from e
        if frame is None:
            raise PeerError(self.peer_id, "the peer closed the stream")
        meta, payloads = frame
        try:
            return meta, [decode_tensor(p) for p in payloads]
        except WireFormatError as e:
            raise PeerError(self.peer_id, f"undecodable reply: {e}") from e

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        await self._replies.aclose()


async def call(
    p2p: P2P,
    peer_id: PeerID,
    rpc: str,
    meta: Message,
    tensors: list[torch.Tensor],
    codec: str,
    timeout: float,
) -> list[torch.Tensor]:
    """One request, one reply over a fresh stream (forward/backward carry tensors above the unary size limit)."""
    stream = await PeerStream.open(p2p, peer_id, rpc, timeout)
    try:
        stream.send(meta, [encode_tensor(t, codec) for t in tensors])
        _, outputs = await stream.receive(None, timeout)
        return outputs
    finally:
        await stream.close()
