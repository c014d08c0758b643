"""One span of an inference session: the open stream to its peer, which holds the span's KV cache.

With peer-to-peer push (docs/architecture.md, "Inference and failover") the peer of the span before this one may
send this span its step's input directly; the reply then names the digest of that input, so the client can check
it is what the previous span returned. A step the client sends itself (relayed) supersedes a pushed one: replies to
pushes are skipped while waiting for the reply to a relayed step. A pushed step whose reply is overdue while the
peer answers `info` is relayed too (its push may have been lost after the previous peer reported it sent).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, PeerID

from blockswarm.compression.codecs import get_codec
from blockswarm.pipeline.hops import Hop, PeerError
from blockswarm.pipeline.liveness import Liveness
from blockswarm.pipeline.streams import PeerStream
from blockswarm.wire.adapters import AdapterTensors, adapter_payloads
from blockswarm.wire.messages import INFERENCE_RPC, InferenceStep, OpenSession, StepReply


@dataclass(frozen=True)
class Push:
    """Where a span's peer pushes its outputs (the next span's peer and session) and from whom it takes them."""

    to_peer: PeerID | None = None
    to_session: str | None = None
    from_peer: PeerID | None = None


@dataclass(frozen=True)
class SpanReply:
    output: torch.Tensor
    payload: bytes  # the output as it came, encoded with the span's codec (as it was pushed, when it was)
    pushed: bool  # the output reached the next span's peer
    input_digest: str | None  # for a step whose input was pushed: the digest of that payload


class SpanSession:
    """Blocks [hop.start, hop.end) of a session, computed by hop.peer_id."""

    def __init__(
        self, hop: Hop, stream: PeerStream, session_id: str, codec: str, liveness: Liveness, push: Push = Push()
    ):
        self.hop = hop
        self.stream = stream
        self.session_id = session_id
        self.codec = get_codec(codec)
        self.liveness = liveness
        self.push = push

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
        session_id: str | None = None,
        push: Push = Push(),
    ) -> SpanSession:
        """Open the stream; the peer holds `adapter`'s part for these blocks (deep prompts, LoRA) for the session."""
        session_id = session_id or uuid.uuid4().hex
        stream = await PeerStream.open(p2p, hop.peer_id, INFERENCE_RPC, timeout)
        opening = OpenSession(
            session_id=session_id,
            start=hop.start,
            end=hop.end,
            max_length=max_length,
            batch_size=batch_size,
            codec=codec,
            adapter=None if adapter is None else adapter.spec,
            push_to=None if push.to_peer is None else push.to_peer.to_base58(),
            push_session=push.to_session,
            push_from=None if push.from_peer is None else push.from_peer.to_base58(),
        )
        stream.send(opening, adapter_payloads(adapter, hop.start, hop.end))
        return cls(hop, stream, session_id, codec, Liveness(p2p, hop.peer_id), push)

    def pushes_to(self, other: SpanSession) -> bool:
        return self.push.to_session is not None and self.push.to_session == other.session_id

    def send(self, payload: bytes, position: int) -> None:
        """Relay one encoded tensor of hidden states at `position` to the peer."""
        self.stream.send(InferenceStep(session_id=self.session_id, position=position), [payload])

    async def receive(self, position: int, timeout: float, decode: bool, pushed: bytes | None = None) -> SpanReply:
        """The reply to the step at `position` (`decode`: one token per row). Without `pushed`, the client sent this
        step, so a reply to a push of it is stale. With it (the payload pushed here), if the reply is overdue while
        the peer is alive (the push was lost), the client relays that payload and waits for the reply to it. A hung
        peer fails in about a second (pipeline/liveness.py)."""
        relayed = pushed is None

        def relay_now() -> None:
            nonlocal relayed
            self.send(pushed, position)
            relayed = True

        while True:
            reading = self.stream.receive_frame(StepReply, timeout)
            frame, tensors = await self.liveness.wait(reading, decode, None if relayed else relay_now)
            reply: StepReply = frame.meta
            if relayed and reply.input_digest is not None:
                continue  # computed from a push that the client's relay of the same step superseded
            if reply.position != position or len(tensors) != 1:
                raise PeerError(self.hop.peer_id, f"a reply for position {reply.position} (expected {position})")
            if not relayed and reply.input_digest is None:
                raise PeerError(self.hop.peer_id, "a reply without the digest of the input pushed to it")
            return SpanReply(tensors[0], frame.payloads[0], bool(reply.pushed), reply.input_digest)

    async def step(self, payload: bytes, position: int, timeout: float, decode: bool) -> torch.Tensor:
        """Relay one step and return this span's outputs."""
        self.send(payload, position)
        return (await self.receive(position, timeout, decode)).output

    async def close(self) -> None:
        await self.stream.close()
