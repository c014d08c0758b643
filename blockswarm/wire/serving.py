"""The peer's end of a stream RPC: the caller's protobuf messages read one by one, each at most a bounded size.

hivemind's own stream handler reads a message of whatever length its prefix announces into memory before any
check can run, and drops the stream without a word on a garbled one. Here a message announced over
`max_message_bytes`, a garbled message or an unknown marker reaches the handler as a FramingError where it reads
its next message, so the caller gets an error reply; nothing after it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto.p2pd_pb2 import RPCError

from blockswarm.wire.transport import CHUNK_BYTES, REQUEST, FramingError

logger = logging.getLogger(__name__)

# one message of a frame: a chunk of tensor bytes and, in the first, the metadata (a few KiB; 1 MiB allowed)
MAX_MESSAGE_BYTES = CHUNK_BYTES + 2**20
PREFETCH = 1  # messages read ahead of the handler (each stream buffers at most this and one more)
_CLOSED = object()  # the caller closed the connection (it cancelled, or died)

StreamHandler = Callable[[AsyncIterator, P2PContext], AsyncIterator]


async def add_stream_handler(
    p2p: P2P, name: str, handler: StreamHandler, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> None:
    """Serve `name` with `handler(requests, context)`, which yields the replies (protobufs or RPCErrors)."""

    async def serve(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=info.peer_id)
        queue: asyncio.Queue = asyncio.Queue(PREFETCH)

        async def requests() -> AsyncIterator[REQUEST]:
            while (item := await queue.get()) is not None:
                if isinstance(item, FramingError):
                    raise item
                yield item

        async def respond() -> None:
            try:
                async with contextlib.aclosing(handler(requests(), context)) as replies:
                    async for reply in replies:
                        try:
                            await P2P.send_protobuf(reply, writer)
                        except Exception:
                            return  # the caller is gone: nobody to reply to
            except Exception as e:
                logger.warning(f"stream handler {name} failed", exc_info=True)
                with contextlib.suppress(Exception):
                    await P2P.send_protobuf(RPCError(message=f"internal error in {name}: {e!r}"), writer)

        responding = asyncio.create_task(respond())
        try:
            while True:
                item = await _unless_done(responding, _receive(reader, max_message_bytes))
                if item is _CLOSED:
                    return  # as with hivemind's handlers: a caller gone cancels its request
                await _unless_done(responding, queue.put(item))
                if isinstance(item, FramingError):
                    await responding  # nothing after a broken message is read: the handler replies and ends
                    return
        except _Done:
            return
        except Exception:
            logger.debug(f"stream {name} broke", exc_info=True)
        finally:
            responding.cancel()
            writer.close()

    await p2p.add_binary_stream_handler(name, serve)


class _Done(Exception):
    """The handler finished while the stream was still being read."""


async def drain(requests: AsyncIterator, timeout: float) -> None:
    """After an error reply, read what the caller already sent until it closes the stream (at most `timeout`
    seconds): closing a stream with unread data resets it, and the reset can overtake the error reply."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            async for _ in requests:
                pass


async def _unless_done(responding: asyncio.Task, awaitable) -> object:
    """`awaitable`'s result, or _Done as soon as the handler finishes first."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait({responding, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise _Done


async def _receive(reader: asyncio.StreamReader, max_message_bytes: int) -> object:
    """The next request, None at the end of the stream, a FramingError, or _CLOSED."""
    try:
        marker = await reader.readexactly(1)
        length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
        if length > max_message_bytes:
            return FramingError(
                f"a message of {length} bytes: one message may carry at most {max_message_bytes} "
                f"(frames travel in chunks of {CHUNK_BYTES} tensor bytes)"
            )
        data = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return _CLOSED
    if marker == P2P.ERROR_MARKER:
        return None  # the caller's end of stream
    if marker != P2P.MESSAGE_MARKER:
        return FramingError(f"not a message: unknown marker byte {marker!r}")
    try:
        return REQUEST.FromString(data)
    except DecodeError as e:
        return FramingError(f"garbled protobuf message: {e}")
