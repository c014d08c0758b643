"""An inference session: one open stream per hop, each holding a KV cache on its peer, one global position.

Fault tolerance lives here. The session keeps, for every block where a span of its route starts, exactly
the hidden states that span's peer decoded, indexed by the session's one global position. When a peer
fails, the session bans it, routes just that span's blocks anew (possibly over several peers), replays the
history onto the replacement with a lossless codec (so it rebuilds the very same KV cache), and goes on.
With a `Verifier`, a random share of steps is also computed from that history by another peer
(pipeline/verification.py); a peer caught lying is replaced the same way, and the step is computed again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import torch
from hivemind.p2p import P2P

from blockswarm.compression.codecs import decode_tensor, encode_tensor, get_codec
from blockswarm.pipeline.hops import Hop, PeerError, Router
from blockswarm.pipeline.liveness import Liveness
from blockswarm.pipeline.retry import RetryPolicy, retry
from blockswarm.pipeline.streams import PeerStream
from blockswarm.pipeline.verification import LieDetected, Verifier
from blockswarm.wire.adapters import AdapterTensors, adapter_payloads
from blockswarm.wire.messages import INFERENCE_RPC, InferenceStep, OpenSession, StepReply

REPLAY_CHUNK_TOKENS = 1024  # replayed history goes out in steps of at most this many tokens (x batch)


class SpanSession:
    """Blocks [hop.start, hop.end) of a session, computed by hop.peer_id."""

    def __init__(self, hop: Hop, stream: PeerStream, session_id: str, codec: str, liveness: Liveness):
        self.hop = hop
        self.stream = stream
        self.session_id = session_id
        self.codec = get_codec(codec)
        self.liveness = liveness

    @classmethod
    async def open(
        cls,
        p2p: P2P,
        hop: Hop,
        max_length: int,
        batch_size: int,
        codec: str,
        timeout: float,
        adapter: AdapterTensors | None = None,
    ) -> SpanSession:
        """Open the stream; the peer holds `adapter`'s part for these blocks (deep prompts, LoRA) for the session."""
        session_id = uuid.uuid4().hex
        stream = await PeerStream.open(p2p, hop.peer_id, INFERENCE_RPC, timeout)
        opening = OpenSession(
            session_id=session_id,
            start=hop.start,
            end=hop.end,
            max_length=max_length,
            batch_size=batch_size,
            codec=codec,
            adapter=None if adapter is None else adapter.spec,
        )
        stream.send(opening, adapter_payloads(adapter, hop.start, hop.end))
        return cls(hop, stream, session_id, codec, Liveness(p2p, hop.peer_id))

    async def step(self, payload: bytes, position: int, timeout: float, decode: bool) -> torch.Tensor:
        """Send one encoded tensor of hidden states at `position` (`decode`: one token per row); returns this span's
        outputs. A hung peer fails the step in about a second (pipeline/liveness.py), a slow one does not."""
        self.stream.send(InferenceStep(session_id=self.session_id, position=position), [payload])
        _, (output,) = await self.liveness.wait(self.stream.receive(StepReply, timeout), decode)
        return output

    async def close(self) -> None:
        await self.stream.close()


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
        dtype = hidden.dtype
        index = 0
        while index < len(self.spans):
            span = self.spans[index]
            payload = encode_tensor(hidden, span.codec.name)
            self._record(span.hop.start, hidden if span.codec.lossless else decode_tensor(payload), self.position)
            try:
                if not self.router.is_usable(span.hop.peer_id):
                    raise PeerError(span.hop.peer_id, "announced it is leaving or was banned")
                hidden = await self._checked_step(span, payload, seq_len)
                index += 1
            except PeerError as error:
                await self._replace(index, error)
        self.position += seq_len
        return hidden.to(dtype)

    async def _checked_step(self, span: SpanSession, payload: bytes, seq_len: int) -> torch.Tensor:
        """The span's outputs for this step; when the verifier draws it, another peer computes it at the same time
        from the span's input history, and a liar raises LieDetected (a PeerError: the span is replaced)."""
        check = None
        if self.verifier is not None and self.verifier.draw():
            inputs = self.history[span.hop.start][:, : self.position + seq_len]
            check = self.verifier.begin(span.hop, inputs, self.adapter, tail=seq_len)
        try:
            output = await span.step(payload, self.position, self.step_timeout, decode=seq_len == 1)
        except BaseException:
            if check is not None:
                check.cancel()
            raise
        if check is not None:
            await self.verifier.settle(check, output, span.codec.name)
        return output

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
        try:
            for hop in hops:
                spans.append(
                    await SpanSession.open(
                        self.p2p,
                        hop,
                        self.max_length,
                        self.batch_size,
                        hop.codec_for(self.codec),
                        self.step_timeout,
                        self.adapter,
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
