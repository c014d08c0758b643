"""RPC handlers: validate every request, run it on the backend, reply or explain what was wrong.

A bad request gets an error reply on its own stream; it never reaches the math and never stops the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from blockswarm.compression.codecs import CODECS, WireFormatError, decode_tensor, encode_tensor
from blockswarm.peer.adapters import AdapterError, ReceivedAdapter, receive_adapter
from blockswarm.peer.backend import BlockBackend
from blockswarm.peer.cache import CacheFullError, CachePool
from blockswarm.wire.framing import FramingError, pack, receive
from blockswarm.wire.messages import (
    BACKWARD_RPC,
    FORWARD_RPC,
    INFERENCE_RPC,
    INFO_RPC,
    AdapterSpec,
    ChainRequest,
    InferenceStep,
    OpenSession,
    PeerStatus,
    StepReply,
)

logger = logging.getLogger(__name__)

ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INLINE_STEP_TOKENS = 16  # decoding steps this small run on the event loop: a thread hand-off would cost more


class RequestError(ValueError):
    """The request is invalid; its message is sent back to the caller verbatim."""


class PeerLeaving(RuntimeError):
    """The peer is shutting down: the caller should continue with another peer."""


@dataclass(frozen=True)
class ServingLimits:
    max_batch_tokens: int = 8192  # batch x sequence tokens in one forward/backward/inference step
    max_session_length: int = 8192
    session_timeout: float = 120.0  # idle seconds before an inference session is closed and its cache freed
    step_timeout: float = 300.0  # the most a client may wait between messages of one frame
    alloc_timeout: float = 10.0  # how long a new session waits for cache room

    max_adapter_bytes: int = 2**26  # deep prompts and LoRA weights a client may send with one request

    def max_request_bytes(self, hidden_size: int) -> int:
        return 2 * self.max_batch_tokens * hidden_size * 4 + self.max_adapter_bytes + 2**16


class RequestHandlers:
    def __init__(
        self,
        model: str,
        backend: BlockBackend,
        cache: CachePool,
        limits: ServingLimits,
        status: Callable[[], dict],
    ):
        self.model = model
        self.backend = backend
        self.cache = cache
        self.limits = limits
        self._status = status
        self._max_bytes = limits.max_request_bytes(backend.config.hidden_size)
        self._leaving = asyncio.get_running_loop().create_future()
        self.active_requests = 0

    async def register(self, p2p: P2P) -> None:
        await p2p.add_protobuf_handler(INFO_RPC, self.rpc_info, runtime_pb2.ExpertRequest)
        for name, handler in (
            (INFERENCE_RPC, self.rpc_inference),
            (FORWARD_RPC, self.rpc_forward),
            (BACKWARD_RPC, self.rpc_backward),
        ):
            await p2p.add_protobuf_handler(
                name, handler, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
            )

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        status = PeerStatus(
            model=self.model,
            start=self.backend.start,
            end=self.backend.end,
            cache_tokens_left=self.cache.tokens_left,
            memory_per_block=self.backend.memory_per_block,
            max_batch_tokens=self.limits.max_batch_tokens,
            max_session_length=self.limits.max_session_length,
            session_timeout=self.limits.session_timeout,
            **self._status(),
        )
        return next(pack(status, [], runtime_pb2.ExpertResponse))

    async def rpc_inference(self, requests: AsyncIterator, context: P2PContext) -> AsyncIterator:
        try:
            frame = await self._receive(requests, OpenSession, self.limits.step_timeout)
            if frame is None:
                return
            session, adapter_payloads = frame
            self._check_not_leaving()
            self._check_span(session.start, session.end)
            self._check_codec(session.codec)
            if session.batch_size < 1 or session.max_length < 1:
                raise RequestError("batch_size and max_length must be positive")
            adapter = self._receive_adapter(
                session.adapter, adapter_payloads, session.end - session.start, session.batch_size
            )
            if session.max_length > self.limits.max_session_length:
                raise RequestError(
                    f"max_length {session.max_length} exceeds this peer's limit of {self.limits.max_session_length}"
                )
            num_blocks = session.end - session.start
            async with self.cache.allocate(
                num_blocks, session.batch_size, session.max_length, self.limits.alloc_timeout
            ) as caches:
                length = 0
                while True:
                    frame = await self._next_step(requests)
                    if frame is None:
                        return
                    step, payloads = frame
                    if step.session_id != session.session_id:
                        raise RequestError(
                            f"unknown session {step.session_id!r}: this stream serves session {session.session_id!r}"
                        )
                    hidden = self._decode_hidden(payloads, expected_batch=session.batch_size)
                    seq_len = hidden.shape[1]
                    if not 0 <= step.position <= length:
                        raise RequestError(
                            f"position {step.position} is out of range: the session holds {length} tokens, "
                            "a step must start at or before its end"
                        )
                    if step.position + seq_len > session.max_length:
                        raise RequestError(
                            f"step of {seq_len} tokens at position {step.position} exceeds the session's "
                            f"max_length of {session.max_length}"
                        )
                    with self._active():
                        output = await self.backend.run(
                            self.backend.inference_step,
                            session.start,
                            caches,
                            hidden,
                            step.position,
                            adapter,
                            inline=hidden.shape[0] * seq_len <= INLINE_STEP_TOKENS,
                        )
                    length = step.position + seq_len
                    for message in pack(
                        StepReply(position=step.position),
                        [encode_tensor(output, session.codec)],
                        runtime_pb2.ExpertResponse,
                    ):
                        yield message
        except (RequestError, FramingError, WireFormatError, AdapterError, CacheFullError, PeerLeaving) as e:
            yield RPCError(message=str(e))
            await self._drain(requests)
        except TimeoutError:
            yield RPCError(message=f"inference session closed after {self.limits.session_timeout:.0f} s idle")

    async def rpc_forward(self, requests: AsyncIterator, context: P2PContext) -> AsyncIterator:
        try:
            request, payloads = await self._receive_chain_request(requests, num_activations=1)
            hidden = self._decode_hidden(payloads[:1])
            adapter = self._receive_adapter(request.adapter, payloads[1:], request.end - request.start, hidden.shape[0])
            with self._active():
                output = await self.backend.run(self.backend.forward, request.start, request.end, hidden, adapter)
            for message in pack(None, [encode_tensor(output, request.codec)], runtime_pb2.ExpertResponse):
                yield message
        except (RequestError, FramingError, WireFormatError, AdapterError, PeerLeaving) as e:
            yield RPCError(message=str(e))
            await self._drain(requests)

    async def rpc_backward(self, requests: AsyncIterator, context: P2PContext) -> AsyncIterator:
        try:
            request, payloads = await self._receive_chain_request(requests, num_activations=2)
            hidden = self._decode_hidden(payloads[:1])
            grad_output = self._decode_hidden(payloads[1:2])
            if grad_output.shape != hidden.shape:
                raise RequestError(f"grad_output shape {list(grad_output.shape)} != inputs shape {list(hidden.shape)}")
            if request.train and not self.backend.trainable:
                raise RequestError("this peer's blocks are frozen: only peers started with --train learn from backward")
            if request.train and (request.start, request.end) != (self.backend.start, self.backend.end):
                raise RequestError(
                    f"a training peer learns from passes over its whole stage [{self.backend.start}, "
                    f"{self.backend.end}), got [{request.start}, {request.end})"
                )
            adapter = self._receive_adapter(
                request.adapter, payloads[2:], request.end - request.start, hidden.shape[0], requires_grad=True
            )
            with self._active():
                grad_input, *adapter_grads = await self.backend.run(
                    self.backend.backward, request.start, request.end, hidden, grad_output, adapter, request.train
                )
            # adapter gradients go back exactly: they are small, and they are what the client's optimizer steps on
            replies = [encode_tensor(grad_input, request.codec)] + [encode_tensor(g, "none") for g in adapter_grads]
            for message in pack(None, replies, runtime_pb2.ExpertResponse):
                yield message
        except (RequestError, FramingError, WireFormatError, AdapterError, PeerLeaving) as e:
            yield RPCError(message=str(e))
            await self._drain(requests)

    async def _receive_chain_request(self, requests: AsyncIterator, num_activations: int):
        frame = await self._receive(requests, ChainRequest, self.limits.step_timeout)
        if frame is None:
            raise RequestError("empty request")
        request, payloads = frame
        self._check_not_leaving()
        self._check_span(request.start, request.end)
        self._check_codec(request.codec)
        adapter_tensors = request.adapter.num_tensors(request.end - request.start) if request.adapter else 0
        if len(payloads) != num_activations + adapter_tensors:
            raise RequestError(
                f"expected {num_activations + adapter_tensors} tensors ({num_activations} of activations, "
                f"{adapter_tensors} of the adapter), got {len(payloads)}"
            )
        return request, payloads

    def _receive_adapter(
        self,
        spec: AdapterSpec | None,
        payloads: list[bytes],
        num_blocks: int,
        batch_size: int,
        requires_grad: bool = False,
    ) -> ReceivedAdapter | None:
        if spec is None:
            if payloads:
                raise RequestError(f"{len(payloads)} unexpected tensor(s) after the activations, and no adapter")
            return None
        return receive_adapter(
            spec, payloads, self.backend.config, num_blocks, batch_size, self.backend.device, requires_grad
        )

    async def _receive(self, requests: AsyncIterator, schema, timeout: float):
        return await asyncio.wait_for(receive(requests, schema, self._max_bytes), timeout)

    async def _next_step(self, requests: AsyncIterator):
        """The next frame of a session, unless the peer starts leaving or the client stays silent too long."""
        receiving = asyncio.ensure_future(receive(requests, InferenceStep, self._max_bytes))
        done, _ = await asyncio.wait(
            (receiving, self._leaving), timeout=self.limits.session_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if receiving in done:
            return receiving.result()
        receiving.cancel()
        self._check_not_leaving()
        raise TimeoutError

    async def _drain(self, requests: AsyncIterator) -> None:
        """After an error reply, read what the client already sent until it closes the stream: closing a stream
        with unread data resets it, and the reset can overtake the error reply on its way to the client."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.limits.alloc_timeout):
                async for _ in requests:
                    pass

    def serve(self, backend: BlockBackend, cache: CachePool) -> None:
        """Start serving another span (after a rebalancing move): new blocks, new cache, accepting work again."""
        self.backend, self.cache = backend, cache
        self._leaving = asyncio.get_running_loop().create_future()

    def begin_leaving(self) -> None:
        """Refuse new work and tell every open session to move on; steps already running still finish."""
        if not self._leaving.done():
            self._leaving.set_result(None)

    async def wait_idle(self, grace_period: float) -> None:
        deadline = asyncio.get_running_loop().time() + grace_period
        while self.active_requests and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        self.active_requests += 1
        try:
            yield
        finally:
            self.active_requests -= 1

    def _check_not_leaving(self) -> None:
        if self._leaving.done():
            raise PeerLeaving("peer leaving: it is shutting down, continue with another peer")

    def _check_span(self, start: int, end: int) -> None:
        if not self.backend.start <= start < end <= self.backend.end:
            raise RequestError(
                f"blocks [{start}, {end}) are not served here: this peer serves "
                f"[{self.backend.start}, {self.backend.end})"
            )

    def _check_codec(self, codec: str) -> None:
        if codec not in CODECS:
            raise RequestError(f"unsupported codec {codec!r}; this peer supports {sorted(CODECS)}")

    def _decode_hidden(self, payloads: list[bytes], expected_batch: int | None = None) -> torch.Tensor:
        if len(payloads) != 1:
            raise RequestError(f"expected exactly one tensor of hidden states, got {len(payloads)}")
        hidden = decode_tensor(payloads[0])
        hidden_size = self.backend.config.hidden_size
        if hidden.dim() != 3 or hidden.shape[-1] != hidden_size:
            raise RequestError(
                f"hidden states must have shape [batch, seq_len, {hidden_size}], got {list(hidden.shape)}"
            )
        if hidden.dtype not in ACCEPTED_DTYPES:
            raise RequestError(f"hidden states must be float32, float16 or bfloat16, got {hidden.dtype}")
        batch, seq_len, _ = hidden.shape
        if batch < 1 or seq_len < 1:
            raise RequestError(f"hidden states are empty: shape {list(hidden.shape)}")
        if expected_batch is not None and batch != expected_batch:
            raise RequestError(f"batch size {batch} != the session's batch size {expected_batch}")
        if batch * seq_len > self.limits.max_batch_tokens:
            raise RequestError(
                f"{batch} x {seq_len} tokens exceed this peer's limit of {self.limits.max_batch_tokens} per request"
            )
        return hidden
