"""An inference session: one open stream per hop, each holding a KV cache on its peer, one global position."""

from __future__ import annotations

import asyncio
import uuid

import torch
from hivemind.p2p import P2P

from blockswarm.compression.codecs import encode_tensor
from blockswarm.pipeline.hops import Hop, Router
from blockswarm.pipeline.streams import PeerStream
from blockswarm.wire.messages import INFERENCE_RPC, InferenceStep, OpenSession, StepReply


class SpanSession:
    """Blocks [hop.start, hop.end) of a session, computed by hop.peer_id."""

    def __init__(self, hop: Hop, stream: PeerStream, session_id: str, codec: str):
        self.hop = hop
        self.stream = stream
        self.session_id = session_id
        self.codec = codec

    @classmethod
    async def open(
        cls, p2p: P2P, hop: Hop, max_length: int, batch_size: int, codec: str, timeout: float
    ) -> SpanSession:
        session_id = uuid.uuid4().hex
        stream = await PeerStream.open(p2p, hop.peer_id, INFERENCE_RPC, timeout)
        opening = OpenSession(
            session_id=session_id,
            start=hop.start,
            end=hop.end,
            max_length=max_length,
            batch_size=batch_size,
            codec=codec,
        )
        stream.send(opening, [])
        return cls(hop, stream, session_id, codec)

    async def step(self, hidden: torch.Tensor, position: int, timeout: float) -> torch.Tensor:
        step = InferenceStep(session_id=self.session_id, position=position)
        self.stream.send(step, [encode_tensor(hidden, self.codec)])
        _, (output,) = await self.stream.receive(StepReply, timeout)
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
    ):
        self.p2p = p2p
        self.router = router
        self.num_blocks = num_blocks
        self.max_length = max_length
        self.batch_size = batch_size
        self.codec = codec
        self.step_timeout = step_timeout
        self.position = 0
        self.spans: list[SpanSession] = []

    async def open(self) -> None:
        hops = await asyncio.to_thread(self.router.route, 0, self.num_blocks)
        try:
            for hop in hops:
                span = await SpanSession.open(
                    self.p2p, hop, self.max_length, self.batch_size, self.codec, self.step_timeout
                )
                self.spans.append(span)
        except BaseException:
            await self.close()
            raise

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
        for span in self.spans:
            hidden = await span.step(hidden, self.position, self.step_timeout)
        self.position += seq_len
        return hidden.to(dtype)

    async def close(self) -> None:
        spans, self.spans = self.spans, []
        await asyncio.gather(*(span.close() for span in spans), return_exceptions=True)
