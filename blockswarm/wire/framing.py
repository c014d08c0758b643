"""Packing metadata and encoded tensors into hivemind protobuf messages, split below the message size limit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import msgpack
from hivemind.proto import runtime_pb2

from blockswarm.wire.messages import Message

CHUNK_BYTES = 2**21  # well below libp2p's default 4 MiB message limit

M = TypeVar("M", bound=Message)


class FramingError(ValueError):
    """A request or reply whose framing is broken: bad metadata, missing or extra tensor bytes."""


def pack(meta: Message | None, payloads: list[bytes], cls=runtime_pb2.ExpertRequest) -> Iterator:
    """Yield protobuf messages carrying `meta` and `payloads`; large payloads are split into chunks."""
    header = {"sizes": [len(p) for p in payloads]}
    if meta is not None:
        header["meta"] = meta.model_dump(mode="json")
    blob = b"".join(payloads)
    chunks = [blob[i : i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
    yield cls(metadata=msgpack.packb(header), tensors=[runtime_pb2.Tensor(buffer=chunks[0])])
    for chunk in chunks[1:]:
        yield cls(tensors=[runtime_pb2.Tensor(buffer=chunk)])


def unpack_header(message, schema: type[M] | None, max_bytes: int) -> tuple[M | None, list[int], bytes]:
    """Parse the first message of a frame: (meta, payload sizes, the bytes it already carries)."""
    try:
        header = msgpack.unpackb(message.metadata)
        sizes = [int(s) for s in header["sizes"]]
        meta = schema.model_validate(header["meta"]) if schema is not None else None
    except Exception as e:
        raise FramingError(f"malformed message metadata: {e}") from None
    if any(size < 0 for size in sizes) or sum(sizes) > max_bytes:
        raise FramingError(f"message carries {sum(sizes)} bytes of tensors, the limit is {max_bytes}")
    return meta, sizes, _buffers(message)


async def receive(
    messages: AsyncIterator, schema: type[M] | None, max_bytes: int
) -> tuple[M | None, list[bytes]] | None:
    """Read one frame from a stream of protobuf messages; None when the stream ended cleanly."""
    first = await anext(messages, None)
    if first is None:
        return None
    meta, sizes, blob = unpack_header(first, schema, max_bytes)
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
    return meta, payloads


def _buffers(message) -> bytes:
    if len(message.tensors) == 1:
        return message.tensors[0].buffer
    return b"".join(t.buffer for t in message.tensors)
