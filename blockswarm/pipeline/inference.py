"""An inference session: one open stream per hop, each holding a KV cache on its peer, one global position.

Fault tolerance lives here. The session keeps, for every block where a span of its route starts, exactly
the hidden states that span's peer decoded, indexed by the session's one global position. When a peer
fails, the session bans it, routes just that span's blocks anew (possibly over several peers), replays the
history onto the replacement with a lossless codec (so it rebuilds the very same KV cache), and goes on.
With push (on by default for routes of two spans or more), the client sends a step only to the first span; each
peer pushes its outputs to the next span's peer and also returns them to the client, which records them as the next
span's inputs exactly as if it had relayed them, and checks their digest against what the next peer says it got.
A failed push, a failed span and every replayed step are relayed by the client, as without push.
With a `Verifier`, a random share of steps is also computed from that history by another peer
(pipeline/verification.py); a peer caught lying is replaced the same way, and the step is computed again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import torch
from hivemind.p2p import P2P, PeerID

from blockswarm.compression.codecs import decode_tensor, encode_tensor
from blockswarm.pipeline.hops import Hop, PeerError, Router
from blockswarm.pipeline.retry import RetryPolicy, retry
from blockswarm.pipeline.span_session import Push, SpanReply, SpanSession
from blockswarm.pipeline.verification import LieDetected, Verifier
from blockswarm.wire.adapters import AdapterTensors
from blockswarm.wire.messages import payload_digest

REPLAY_CHUNK_TOKENS = 1024  # replayed history goes out in steps of at most this many tokens (x batch)


class InferenceSession:
    """Pushes hidden states through every hop of a route; the caller keeps the embeddings and the head."""

    def __init__(
        self,
        p2p: P2P,
        router: Router,
        num_blocks: int,
        max_length: int,
        batch_size: int = 1,
        codec: str = "none",
        step_timeout: float = 30.0,
        retry_policy: RetryPolicy | None = None,
        on_route: Callable[[list[Hop]], None] | None = None,
        adapter: AdapterTensors | None = None,
        verifier: Verifier | None = None,
        push: bool = True,
    ):
        self.p2p = p2p
        self.router = router
        self.num_blocks = num_blocks
        self.max_length = max_length
        self.batch_size = batch_size
        self.codec = codec  # preferred; each span uses it where its peer supports it
        self.step_timeout = step_timeout
        self.retry_policy = retry_policy or RetryPolicy()
        self.position = 0
        self.spans: list[SpanSession] = []
        self.history: dict[int, torch.Tensor] = {}  # first block of a span -> inputs its peer decoded
        self.on_route = on_route  # told about every route chosen: at open and on each failover
        self.adapter = adapter  # the client's deep prompts / LoRA of every block, sent to each span's peer at open
        self.verifier = verifier  # spot-checks a share of the steps on other peers
        self.push = push  # peers push each step's outputs to the next span's peer (routes of two spans or more)
        self.pushed_inputs = 0  # steps' inputs of spans after the first that came by push, and those relayed
        self.relayed_inputs = 0

    async def open(self) -> None:
        self.spans = await retry(self.retry_policy, lambda: self._open_spans(0, self.num_blocks), "opening a route")

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run [batch, seq_len, hidden] new tokens through all blocks; returns the last block's outputs."""
        batch, seq_len, _ = hidden.shape
        if batch != self.batch_size:
            raise ValueError(f"this session was opened for batch size {self.batch_size}, got {batch}")
        if self.position + seq_len > self.max_length:
            raise ValueError(
                f"session max_length {self.max_length} exceeded: it holds {self.position} tokens, "
                f"{seq_len} more requested; open the session with a larger max_length"
            )
        dtype, position, decode = hidden.dtype, self.position, seq_len == 1
        index, inputs, pushed_in, pushed_payload = 0, hidden, False, b""
        while index < len(self.spans):
            span = self.spans[index]
            try:
                if not self.router.is_usable(span.hop.peer_id):
                    raise PeerError(span.hop.peer_id, "announced it is leaving or was banned")
                if pushed_in:  # with the very bytes pushed, should the client have to relay them (a lost push)
                    receiving = span.receive(position, self.step_timeout, decode, pushed=pushed_payload)
                    reply = await self._checked(span, seq_len, receiving)
                    if reply.input_digest is None:  # relayed after all
                        self.relayed_inputs += 1
                    elif reply.input_digest != payload_digest(pushed_payload):
                        raise PushMismatch(self.spans[index - 1].hop.peer_id)
                    else:
                        self.pushed_inputs += 1
                else:
                    payload = encode_tensor(inputs, span.codec.name)
                    self._record(span.hop.start, inputs if span.codec.lossless else decode_tensor(payload), position)
                    span.send(payload, position)
                    reply = await self._checked(span, seq_len, span.receive(position, self.step_timeout, decode))
                    self.relayed_inputs += index > 0
                inputs, pushed_in = reply.output, self._pushed_on(index, reply)
                if pushed_in:
                    self._record(self.spans[index + 1].hop.start, inputs, position)
                    pushed_payload = reply.payload
                index += 1
            except PeerError as error:
                failed = index - 1 if isinstance(error, PushMismatch) else index
                await self._replace(failed, error)
                if failed != index:  # the previous span's inputs again, now to its replacement
                    inputs = self.history[self.spans[failed].hop.start][:, position : position + seq_len]
                index, pushed_in = failed, False
        self.position += seq_len
        return inputs.to(dtype)

    def _pushed_on(self, index: int, reply: SpanReply) -> bool:
        """Whether the span after `index` got this step's input from its peer: then the client does not relay it."""
        return reply.pushed and index + 1 < len(self.spans) and self.spans[index].pushes_to(self.spans[index + 1])

    async def _checked(self, span: SpanSession, seq_len: int, receiving: Awaitable[SpanReply]) -> SpanReply:
        """The span's reply for this step; when the verifier draws it, another peer computes it at the same time
        from the span's input history, and a liar raises LieDetected (a PeerError: the span is replaced)."""
        check = None
        if self.verifier is not None and self.verifier.draw():
            inputs = self.history[span.hop.start][:, : self.position + seq_len]
            check = self.verifier.begin(span.hop, inputs, self.adapter, tail=seq_len)
        try:
            reply = await receiving
        except BaseException:
            if check is not None:
                check.cancel()
            raise
        if check is not None:
            await self.verifier.settle(check, reply.output, span.codec.name)
        return reply

    async def close(self) -> None:
        spans, self.spans = self.spans, []
        await asyncio.gather(*(span.close() for span in spans), return_exceptions=True)

    def _record(self, block: int, inputs: torch.Tensor, position: int) -> None:
        buffer = self.history.get(block)
        if buffer is None:
            buffer = self.history[block] = inputs.new_empty(self.batch_size, self.max_length, inputs.shape[-1])
        buffer[:, position : position + inputs.shape[1]] = inputs

    async def _replace(self, index: int, error: PeerError) -> None:
        """Swap the failed span for a fresh route over the same blocks, with the session's history replayed."""
        failed = self.spans[index]
        self.router.ban(error.peer_id, error.retry_after)
        await asyncio.gather(failed.close(), return_exceptions=True)
        start, end = failed.hop.start, failed.hop.end
        why = f" ({error})" if isinstance(error, LieDetected) else ""
        replacement = await retry(
            self.retry_policy,
            lambda: self._open_spans(start, end, replay=True),
            f"replacing peer {failed.hop.peer_id} for blocks {start}:{end}{why}",
        )
        self.spans[index : index + 1] = replacement

    async def _open_spans(self, start: int, end: int, replay: bool = False) -> list[SpanSession]:
        hops = await asyncio.to_thread(self.router.route, start, end, self.batch_size * self.max_length)
        if self.on_route is not None:
            self.on_route(hops)
        spans: list[SpanSession] = []
        ids = [uuid.uuid4().hex for _ in hops]
        pushing = self.push and not replay and len(hops) > 1
        try:
            for number, hop in enumerate(hops):
                push = Push()
                if pushing:
                    after, before = hops[number + 1 : number + 2], hops[max(0, number - 1) : number]
                    push = Push(
                        to_peer=after[0].peer_id if after else None,
                        to_session=ids[number + 1] if after else None,
                        from_peer=before[0].peer_id if before else None,
                    )
                codec = hop.codec_for(self.codec)
                spans.append(
                    await SpanSession.open(
                        self.p2p,
                        hop,
                        self.max_length,
                        self.batch_size,
                        codec,
                        self.step_timeout,
                        self.adapter,
                        ids[number],
                        push,
                    )
                )
            if replay and self.position > 0:
                await self._replay(spans)
            return spans
        except PeerError as error:
            self.router.ban(error.peer_id, error.retry_after)
            await asyncio.gather(*(span.close() for span in spans), return_exceptions=True)
            raise

    async def _replay(self, spans: list[SpanSession]) -> None:
        """Rebuild the replacement's KV caches: the first span gets the recorded inputs, each later one gets
        the outputs of the span before it (and those become that block's recorded inputs)."""
        inputs = self.history[spans[0].hop.start][:, : self.position]
        chunk = max(1, REPLAY_CHUNK_TOKENS // self.batch_size)
        for number, span in enumerate(spans):
            if number > 0:
                self._record(span.hop.start, inputs, 0)
            outputs = []
            for begin in range(0, self.position, chunk):
                payload = encode_tensor(inputs[:, begin : begin + chunk], "none")
                outputs.append(await span.step(payload, begin, self.step_timeout, decode=False))
            inputs = torch.cat(outputs, dim=1)


class PushMismatch(PeerError):
    """A peer says it got pushed inputs other than the outputs its previous span's peer returned to the client."""

    def __init__(self, peer_id: PeerID):
        super().__init__(peer_id, "the outputs it pushed to the next span's peer differ from those it returned")
