"""One request/reply stream to one peer, with timeouts, turning every transport failure into PeerError."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from blockswarm.compression.codecs import WireFormatError, decode_tensor, encode_tensor
from blockswarm.pipeline.hops import PeerError
from blockswarm.wire.adapters import AdapterTensors
from blockswarm.wire.framing import FramingError, pack, receive
from blockswarm.wire.messages import Message

MAX_REPLY_BYTES = 2**31


class PeerStream:
    """A raw stream to one peer: frames are written as they are sent, replies are read one frame at a time.

    Reading and writing the stream directly (rather than through a request iterator) means a stream closed
    or reset by the peer's side surfaces at once as an error, never as a silent wait.
    """

    def __init__(self, peer_id: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.peer_id = peer_id
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, p2p: P2P, peer_id: PeerID, rpc: str, timeout: float) -> PeerStream:
        try:
            _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer_id, rpc), timeout)
        except (TimeoutError, P2PDaemonError, P2PHandlerError, OSError) as e:
            raise PeerError(peer_id, f"could not open {rpc}: {e or type(e).__name__}") from e
        return cls(peer_id, reader, writer)

    def send(self, meta: Message | None, payloads: list[bytes]) -> None:
        """Queue one frame for writing; `payloads` are tensors already encoded with `encode_tensor`."""
        for message in pack(meta, payloads):
            data = message.SerializeToString()
            self._writer.write(P2P.MESSAGE_MARKER + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
            self._writer.write(data)

    async def receive(self, schema: type[Message] | None, timeout: float) -> tuple[Message | None, list[torch.Tensor]]:
        try:
            await self._writer.drain()
            frame = await asyncio.wait_for(receive(self._replies(), schema, MAX_REPLY_BYTES), timeout)
        except TimeoutError:
            raise PeerError(self.peer_id, f"no reply within {timeout:.1f} s") from None
        except (OSError, FramingError, WireFormatError, asyncio.IncompleteReadError) as e:
            raise PeerError(self.peer_id, f"broken reply: {e or type(e).__name__}") from e
        if frame is None:
            raise PeerError(self.peer_id, "the peer closed the stream")
        meta, payloads = frame
        try:
            return meta, [decode_tensor(p) for p in payloads]
        except WireFormatError as e:
            raise PeerError(self.peer_id, f"undecodable reply: {e}") from e

    async def _replies(self) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        while True:
            try:
                reply, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, self._reader)
            except asyncio.IncompleteReadError:
                return  # the peer closed its side
            if error is not None:
                raise PeerError(self.peer_id, error.message)
            yield reply

    async def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            await P2P.send_protobuf(P2P.END_OF_STREAM, self._writer)
        self._writer.close()


async def call(
    p2p: P2P,
    peer_id: PeerID,
    rpc: str,
    meta: Message,
    payloads: list[bytes],
    timeout: float,
) -> list[torch.Tensor]:
    """One request, one reply over a fresh stream (forward/backward carry tensors above the unary size limit).
    `payloads` are tensors encoded with `encode_tensor`."""
    stream = await PeerStream.open(p2p, peer_id, rpc, timeout)
    try:
        stream.send(meta, payloads)
        _, outputs = await stream.receive(None, timeout)
        return outputs
    finally:
        await stream.close()


def adapter_payloads(adapter: AdapterTensors | None, start: int, end: int) -> list[bytes]:
    """The adapter's part for blocks [start, end), encoded losslessly: these tensors are parameters."""
    if adapter is None:
        return []
    return [encode_tensor(t.detach(), "none") for t in adapter.sliced(start, end).flat()]
