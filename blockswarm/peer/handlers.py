"""RPC handlers: validate every request, have the peer's scheduler compute it, reply or explain what was wrong.

A bad request gets an error reply on its own stream; it never reaches the math and never stops the peer.
Requests and replies are frames of wire/transport.py, read and written the same way as on the client's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable

import torch
from hivemind.p2p import P2P, P2PContext

from blockswarm.models import KVCache
from blockswarm.peer.adapters import AdapterError, ReceivedAdapter
from blockswarm.peer.admission import Admission, PeerLeaving
from blockswarm.peer.backend import BlockBackend, DecodeStep
from blockswarm.peer.cache import CacheFullError, CachePool
from blockswarm.peer.limits import RequestError, ServingLimits
from blockswarm.peer.push import Pusher, PushInbox
from blockswarm.peer.request_checks import (
    check_codec,
    check_session,
    check_span,
    decode_hidden,
    receive_request_adapter,
)
from blockswarm.peer.scheduled_work import DecodingSession
from blockswarm.peer.scheduler import Scheduler
from blockswarm.peer.session_steps import SessionSteps
from blockswarm.wire.adapters import ADAPTER_CODEC
from blockswarm.wire.messages import (
    BACKWARD_RPC,
    FORWARD_RPC,
    INFERENCE_RPC,
    INFO_RPC,
    PUSH_RPC,
    ChainRequest,
    InferenceStep,
    OpenSession,
    PeerStatus,
    PushStep,
    StepReply,
    payload_digest,
)
from blockswarm.wire.serving import add_stream_handler, drain
from blockswarm.wire.trainer_auth import is_valid_train_proof
from blockswarm.wire.transport import REPLY, REQUEST, Frame, M, WireError, encode, error_message, read_frame

Hold = Callable[[int], None]  # counts the tensor bytes of a request's latest frame, or refuses them (PeerBusy)


# what refuses one request: its caller gets the message as an error reply, and the peer goes on serving
REFUSALS = (RequestError, AdapterError, CacheFullError, PeerLeaving, WireError)


def _refusing(handler: Callable[..., AsyncIterator]) -> Callable[..., AsyncIterator]:
    """A stream handler that answers a refused request with an error reply; it is admitted under the stream caps,
    and gets `hold`, which counts the bytes of the frames it receives (Admission.receiving)."""

    @functools.wraps(handler)
    async def refusing(self: RequestHandlers, requests: AsyncIterator, context: P2PContext) -> AsyncIterator:
        try:
            with self.admission.stream(context.remote_id), self.admission.receiving() as hold:
                async for message in handler(self, requests, context, hold):
                    yield message
        except REFUSALS as e:
            yield error_message(str(e))
            await drain(requests, self.limits.drain_timeout)

    return refusing


class RequestHandlers:
    def __init__(
        self,
        model: str,
        backend: BlockBackend,
        cache: CachePool,
        limits: ServingLimits,
        status: Callable[[], dict],
        train_key: str | None = None,
        scheduler: Scheduler | None = None,
    ):
        """`train_key`: the run key of a --train peer; training backward passes must prove they know it.
        `scheduler`: the peer's one compute queue (the server's, which stops it; a new one when omitted)."""
        self.model = model
        self.train_key = train_key
        self.backend = backend
        self.cache = cache
        self.limits = limits
        self._status = status
        self._max_bytes = limits.max_request_bytes(backend.config.hidden_size)
        self.scheduler = scheduler if scheduler is not None else Scheduler(limits)
        self.admission = Admission(limits, self.scheduler)
        self.pushes = PushInbox()
        self._p2p: P2P | None = None  # set by `register`; pushes go out through it

    async def register(self, p2p: P2P) -> None:
        self._p2p = p2p
        await p2p.add_protobuf_handler(INFO_RPC, self.rpc_info, REQUEST)
        for name, handler in (
            (INFERENCE_RPC, self.rpc_inference),
            (PUSH_RPC, self.rpc_push),
            (FORWARD_RPC, self.rpc_forward),
            (BACKWARD_RPC, self.rpc_backward),
        ):
            await add_stream_handler(p2p, name, handler)  # each message read with a size cap

    async def rpc_info(self, request: REQUEST, context: P2PContext) -> REPLY:
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
        return next(Frame(status, []).messages(REPLY))

    @_refusing
    async def rpc_inference(self, requests: AsyncIterator, context: P2PContext, hold: Hold) -> AsyncIterator:
        try:
            opening = await self._receive(requests, OpenSession, hold)
            if opening is None:
                return
            session = opening.meta
            self.admission.check_not_leaving()
            check_session(self.backend, self.limits, session)
            with self.admission.adapter_room(opening, 0):
                adapter = receive_request_adapter(opening, 0, self.backend, session.batch_size)
                with (
                    self.cache.allocate(session.end - session.start, session.batch_size, session.max_length) as caches,
                    self.scheduler.session() as rhythm,
                    self.pushes.accepting(session) as pushed,
                ):
                    read = functools.partial(read_frame, requests, InferenceStep, self._max_bytes, announced=hold)
                    steps = SessionSteps(read, pushed, self.admission.leaving, self.limits.session_timeout)
                    pusher = None if session.push_to is None else Pusher(self._p2p, session)
                    try:
                        serving = self._serve_steps(session, steps, pusher, context, caches, adapter, rhythm)
                        async for message in serving:
                            yield message
                    finally:
                        steps.close()
                        if pusher is not None:
                            await pusher.close()
        except TimeoutError:
            yield error_message(f"inference session closed after {self.limits.session_timeout:.0f} s idle")

    async def _serve_steps(
        self,
        session: OpenSession,
        steps: SessionSteps,
        pusher: Pusher | None,
        context: P2PContext,
        caches: list[KVCache],
        adapter: ReceivedAdapter | None,
        rhythm: DecodingSession,
    ) -> AsyncIterator:
        """Compute each step of an open session and reply with its outputs, pushed on first when there is a pusher."""
        length = 0
        while (frame := await steps.next()) is not None:
            input_digest = None
            if isinstance(frame.meta, PushStep):
                if frame.meta.position != length:
                    continue  # the client relayed this step already (its push was reported failed) or it is stale
                input_digest = payload_digest(frame.payloads[0])
            with self.scheduler.admit(context.remote_id):
                output = await self._step(session, frame, length, caches, adapter, rhythm)
            length = frame.meta.position + output.shape[1]
            payloads = encode([output], session.codec)
            pushed = None if pusher is None else pusher.push(frame.meta.position, payloads)
            reply = StepReply(position=frame.meta.position, pushed=pushed, input_digest=input_digest)
            for message in Frame(reply, payloads).messages(REPLY):
                yield message
        self.admission.check_not_leaving()

    @_refusing
    async def rpc_push(self, requests: AsyncIterator, context: P2PContext, hold: Hold) -> AsyncIterator:
        """Steps pushed by the previous span's peer of a session, each acknowledged once queued (peer/push.py)."""
        reading = read_frame(requests, PushStep, self._max_bytes, announced=hold)
        with contextlib.suppress(TimeoutError):  # a pusher silent for a whole session timeout: its session is over
            while (frame := await asyncio.wait_for(reading, self.limits.session_timeout)) is not None:
                await self.pushes.deliver(frame, context.remote_id)
                for message in Frame(None, []).messages(REPLY):
                    yield message
                reading = read_frame(requests, PushStep, self._max_bytes, announced=hold)

    async def _step(
        self,
        session: OpenSession,
        frame: Frame[InferenceStep | PushStep],
        length: int,
        caches: list[KVCache],
        adapter: ReceivedAdapter | None,
        rhythm: DecodingSession,
    ) -> torch.Tensor:
        """One step of a session that holds `length` tokens: checked, decoded, computed."""
        step = frame.meta
        if step.session_id != session.session_id:
            raise RequestError(
                f"unknown session {step.session_id!r}: this stream serves session {session.session_id!r}"
            )
        hidden = decode_hidden(frame, self.backend, self.limits, expected_batch=session.batch_size)
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
        return await self.scheduler.submit_step(
            self.backend, DecodeStep(session.start, caches, hidden, step.position, adapter), rhythm
        )

    @_refusing
    async def rpc_forward(self, requests: AsyncIterator, context: P2PContext, hold: Hold) -> AsyncIterator:
        frame = await self._receive_chain_request(requests, hold, num_activations=1)
        request = frame.meta
        with self.scheduler.admit(context.remote_id), self.admission.adapter_room(frame, 1):
            hidden = decode_hidden(frame, self.backend, self.limits, 0, 1)
            adapter = receive_request_adapter(frame, 1, self.backend, hidden.shape[0])
            output = await self.scheduler.submit_job(self.backend.forward, request.start, request.end, hidden, adapter)
        for message in Frame(None, encode([output], request.codec)).messages(REPLY):
            yield message

    @_refusing
    async def rpc_backward(self, requests: AsyncIterator, context: P2PContext, hold: Hold) -> AsyncIterator:
        frame = await self._receive_chain_request(requests, hold, num_activations=2)
        request = frame.meta
        if request.train and not self.backend.trainable:
            raise RequestError("this peer's blocks are frozen: only peers started with --train learn from backward")
        if request.train and not is_valid_train_proof(
            self.train_key, context.local_id, context.remote_id, request.train_proof
        ):
            raise RequestError(
                "this peer learns only from the trainers of its run: train=True needs a proof made with the run's "
                "key (swarm_training=True, train_key=... on the client; --train-key on the peers)"
            )
        if request.train and (request.start, request.end) != (self.backend.start, self.backend.end):
            raise RequestError(
                f"a training peer learns from passes over its whole stage [{self.backend.start}, "
                f"{self.backend.end}), got [{request.start}, {request.end})"
            )
        with self.scheduler.admit(context.remote_id), self.admission.adapter_room(frame, 2):
            hidden = decode_hidden(frame, self.backend, self.limits, 0, 1)
            grad_output = decode_hidden(frame, self.backend, self.limits, 1, 2)
            if grad_output.shape != hidden.shape:
                raise RequestError(f"grad_output shape {list(grad_output.shape)} != inputs shape {list(hidden.shape)}")
            adapter = receive_request_adapter(frame, 2, self.backend, hidden.shape[0], requires_grad=True)
            grad_input, *adapter_grads = await self.scheduler.submit_job(
                self.backend.backward, request.start, request.end, hidden, grad_output, adapter, request.train
            )
        replies = encode([grad_input], request.codec) + encode(adapter_grads, ADAPTER_CODEC)
        for message in Frame(None, replies).messages(REPLY):
            yield message

    async def _receive_chain_request(
        self, requests: AsyncIterator, hold: Hold, num_activations: int
    ) -> Frame[ChainRequest]:
        frame = await self._receive(requests, ChainRequest, hold)
        if frame is None:
            raise RequestError("empty request")
        request, payloads = frame.meta, frame.payloads
        self.admission.check_not_leaving()
        check_span(self.backend, request.start, request.end)
        check_codec(request.codec)
        adapter_tensors = request.adapter.num_tensors(request.end - request.start) if request.adapter else 0
        if len(payloads) != num_activations + adapter_tensors:
            raise RequestError(
                f"expected {num_activations + adapter_tensors} tensors ({num_activations} of activations, "
                f"{adapter_tensors} of the adapter), got {len(payloads)}"
            )
        return frame

    async def _receive(self, requests: AsyncIterator, schema: type[M], hold: Hold) -> Frame[M] | None:
        """A request's first frame: the client has first_message_timeout to start it, step_timeout to send all of it."""
        timeout = self.limits.first_message_timeout
        reading = read_frame(requests, schema, self._max_bytes, first_message_timeout=timeout, announced=hold)
        return await asyncio.wait_for(reading, self.limits.step_timeout)

    def serve(self, backend: BlockBackend, cache: CachePool) -> None:
        """Start serving another span (after a rebalancing move): new blocks, new cache, accepting work again."""
        self.backend, self.cache = backend, cache
        self.admission.accept_again()
