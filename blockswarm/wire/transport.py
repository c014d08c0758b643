"""One way to send and receive a typed message with its tensors, used by both ends of every RPC.

A frame is a `Message` (msgpack metadata) and tensors, each encoded with a named codec (compression/codecs.py).
It travels as hivemind protobuf messages: the first carries the metadata and the payload sizes, and each carries
at most CHUNK_BYTES of the payloads. A client writes and reads frames on a raw stream (`WireStream`); a peer's
handlers read them from hivemind's request iterator (`read_frame`) and yield `Frame.messages` as replies.
Whatever goes wrong on the way is a `WireError`, at either end.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgpack
import torch
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError
from pydantic import ValidationError

from blockswarm.compression.codecs import WireFormatError, decode_tensor, encode_tensor
from blockswarm.wire.messages import Message

# Tensor bytes per protobuf message. hivemind caps unary calls (4 MiB, DEFAULT_MAX_MSG_SIZE) but not the messages
# of a stream, and a reader accepts chunks of any size; chunking keeps what this side sends, and what a peer's
# handler prefetches of a stream (5 messages), small.
CHUNK_BYTES = 2**21
MAX_RETRY_AFTER = 60.0  # seconds; a busy reply asking a client to stay away longer is read as this
REQUEST = runtime_pb2.ExpertRequest  # the protobuf a caller sends
REPLY = runtime_pb2.ExpertResponse  # the protobuf a handler sends back

M = TypeVar("M", bound=Message)


class WireError(Exception):
    """A frame that did not cross the wire intact; the text says why. Both ends catch this one type."""


class FramingError(WireError, ValueError):
    """Broken framing: bad metadata, missing or extra tensor bytes, or more of them than the reader accepts."""


class UndecodableTensor(WireError, ValueError):
    """A tensor payload its codec cannot decode: truncated, corrupt, or of an unknown codec or dtype."""


class StreamClosed(WireError):
    """The stream could not be opened, broke, or ended where a frame was expected."""


class RemoteError(WireError):
    """The other end sent an error instead of a frame; the text is its message."""


class WireTimeout(WireError):
    """No frame arrived in time."""


class PeerBusyError(RemoteError):
    """The other end is at a limit right now and refused the request at once; try elsewhere, or here later."""

    def __init__(self, reason: str, retry_after: float):
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(busy_message(reason, retry_after))


_BUSY_RE = re.compile(r"busy: (.*); retry in ([0-9.]+(?:e[+-]?[0-9]+)?) s")


def busy_message(reason: str, retry_after: float) -> str:
    """The error text of a busy reply: what limit was hit and after how many seconds to come back."""
    return f"busy: {reason}; retry in {retry_after:g} s"


def remote_error(text: str) -> RemoteError:
    """The exception for an error reply: PeerBusyError when it is a busy reply, else RemoteError."""
    match = _BUSY_RE.fullmatch(text)
    if match is None:
        return RemoteError(text)
    return PeerBusyError(match.group(1), min(float(match.group(2)), MAX_RETRY_AFTER))


# what hivemind and asyncio raise when a stream cannot be opened or breaks; the only ones WireStream turns into
# StreamClosed
_TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, P2PDaemonError, P2PHandlerError)


@dataclass(frozen=True)
class Frame(Generic[M]):
    """A message and its tensors, kept encoded until asked for: a receiver checks how many there are and how
    many bytes they take before it decodes any."""

    meta: M | None
    payloads: list[bytes]  # tensors encoded with `encode` (or `encode_tensor`), each naming its codec

    def tensors(self, begin: int = 0, end: int | None = None) -> list[torch.Tensor]:
        """The tensors of payloads [begin, end), decoded on CPU; raises UndecodableTensor."""
        try:
            return [decode_tensor(payload) for payload in self.payloads[begin:end]]
        except WireFormatError as e:
            raise UndecodableTensor(str(e)) from None

    def nbytes(self, begin: int = 0, end: int | None = None) -> int:
        """Encoded bytes of payloads [begin, end)."""
        return sum(len(payload) for payload in self.payloads[begin:end])

    def messages(self, cls: type = REQUEST) -> Iterator:
        """The protobuf messages (`REQUEST` or `REPLY`) that carry this frame."""
        header = {"sizes": [len(p) for p in self.payloads]}
        if self.meta is not None:
            header["meta"] = self.meta.model_dump(mode="json")
        blob = b"".join(self.payloads)
        chunks = [blob[i : i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
        yield cls(metadata=msgpack.packb(header), tensors=[runtime_pb2.Tensor(buffer=chunks[0])])
        for chunk in chunks[1:]:
            yield cls(tensors=[runtime_pb2.Tensor(buffer=chunk)])


def encode(tensors: Iterable[torch.Tensor], codec: str = "none") -> list[bytes]:
    """Payloads of `tensors` (any device; the codecs detach them) encoded with `codec`, for a `Frame`."""
    return [encode_tensor(tensor, codec) for tensor in tensors]


async def read_frame(
    messages: AsyncIterator,
    schema: type[M] | None,
    max_bytes: int,
    first_message_timeout: float | None = None,
    announced: Callable[[int], None] | None = None,
) -> Frame[M] | None:
    """Read one frame of at most `max_bytes` tensor bytes; None when the stream ended cleanly before it.

    `schema` validates the metadata (None: a frame without). Raises FramingError, or WireTimeout when the frame's
    first message takes more than `first_message_timeout` seconds to come; tensors stay encoded. `announced` is
    called with the tensor bytes the header announces before the rest is read (it may raise to refuse them).
    """
    try:
        first = await asyncio.wait_for(anext(messages, None), first_message_timeout)
    except TimeoutError:
        raise WireTimeout(f"no request within {first_message_timeout:g} s of opening the stream") from None
    if first is None:
        return None
    meta, sizes, blob = _read_header(first, schema, max_bytes)
    if announced is not None:
        announced(sum(sizes))
    parts = [blob]
    received, total = len(blob), sum(sizes)
    while received < total:
        message = await anext(messages, None)
        if message is None:
            raise FramingError(f"stream ended after {received} of {total} tensor bytes")
        chunk = _buffers(message)
        parts.append(chunk)
        received += len(chunk)
    if received != total:
        raise FramingError(f"message carries {received} tensor bytes, its header announced {total}")
    blob = b"".join(parts) if len(parts) > 1 else parts[0]
    payloads, offset = [], 0
    for size in sizes:
        payloads.append(blob[offset : offset + size])
        offset += size
    return Frame(meta, payloads)


def read_meta(message: runtime_pb2.ExpertRequest | runtime_pb2.ExpertResponse, schema: type[M]) -> M:
    """The metadata of a frame that is one message without tensors (a unary call's request or reply)."""
    return _read_header(message, schema, 0)[0]


def error_message(text: str) -> RPCError:
    """What a handler sends instead of a reply frame; the caller's `WireStream` raises RemoteError(text)."""
    return RPCError(message=text)


class WireStream:
    """The calling end of one RPC: frames are written as they are sent, replies read one frame at a time.

    Reading and writing the raw stream (rather than through a request iterator) means a stream closed or reset by
    the other side surfaces at once as a WireError, never as a silent wait.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, p2p: P2P, peer_id: PeerID, rpc: str, timeout: float) -> WireStream:
        """A stream to `peer_id`'s handler `rpc`; raises StreamClosed when it cannot be opened in time."""
        try:
            _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer_id, rpc), timeout)
        except (TimeoutError, *_TRANSPORT_ERRORS) as e:
            raise StreamClosed(f"could not open {rpc}: {str(e) or type(e).__name__}") from e
        return cls(reader, writer)

    def send(self, frame: Frame) -> None:
        """Queue `frame` for writing; `receive` flushes it."""
        for message in frame.messages(REQUEST):
            data = message.SerializeToString()
            self._writer.write(P2P.MESSAGE_MARKER + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
            self._writer.write(data)

    async def receive(self, schema: type[M] | None, max_bytes: int, timeout: float) -> Frame[M]:
        """The next reply frame, within `timeout` seconds; raises WireError."""
        try:
            await self._writer.drain()
            frame = await asyncio.wait_for(read_frame(self._replies(), schema, max_bytes), timeout)
        except TimeoutError:
            raise WireTimeout(f"no reply within {timeout:.1f} s") from None
        except _TRANSPORT_ERRORS as e:
            raise StreamClosed(f"broken reply: {str(e) or type(e).__name__}") from e
        if frame is None:
            raise StreamClosed("the peer closed the stream")
        return frame

    async def _replies(self) -> AsyncIterator[REPLY]:
        while True:
            try:
                reply, error = await P2P.receive_protobuf(REPLY, self._reader)
            except asyncio.IncompleteReadError:
                return  # the other end closed its side
            if error is not None:
                raise remote_error(error.message)
            yield reply

    async def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            await P2P.send_protobuf(P2P.END_OF_STREAM, self._writer)
        self._writer.close()


def _read_header(message, schema: type[M] | None, max_bytes: int) -> tuple[M | None, list[int], bytes]:
    """Parse the first message of a frame: (meta, payload sizes, the tensor bytes it already carries)."""
    try:
        header = msgpack.unpackb(message.metadata)
    except Exception as e:
        raise FramingError(f"malformed message metadata: not msgpack ({e})") from None
    if not isinstance(header, dict) or not isinstance(sizes := header.get("sizes"), list):
        raise FramingError("malformed message metadata: expected a map with 'sizes', a list of payload byte counts")
    if not all(type(size) is int for size in sizes):
        raise FramingError("malformed message metadata: 'sizes' must hold integers")
    if schema is not None and "meta" not in header:
        raise FramingError(f"malformed message metadata: no 'meta' ({schema.__name__} expected)")
    try:
        meta = schema.model_validate(header["meta"]) if schema is not None else None
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, ('meta', *error['loc'])))}: {error['msg']}" for error in e.errors())
        raise FramingError(f"malformed message metadata: {problems}") from None
    except Exception as e:
        raise FramingError(f"malformed message metadata: {e}") from None
    if any(size < 0 for size in sizes):
        raise FramingError(f"malformed message metadata: negative payload size in {sizes[:16]}")
    if sum(sizes) > max_bytes:
        raise FramingError(f"message carries {sum(sizes)} bytes of tensors, the limit is {max_bytes}")
    return meta, sizes, _buffers(message)


def _buffers(message) -> bytes:
    if len(message.tensors) == 1:
        return message.tensors[0].buffer
    return b"".join(t.buffer for t in message.tensors)
