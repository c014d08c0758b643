"""Schemas of the metadata that travels with every request and reply (msgpack on the wire)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

INFO_RPC = "blockswarm.info"
INFERENCE_RPC = "blockswarm.inference"
FORWARD_RPC = "blockswarm.forward"
BACKWARD_RPC = "blockswarm.backward"


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class OpenSession(Message):
    """First message of an inference stream: reserves a KV cache for blocks [start, end)."""

    session_id: str = Field(min_length=1, max_length=64)
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    codec: str = "none"  # how the peer encodes its replies


class InferenceStep(Message):
    """New hidden states of `session_id` at absolute positions [position, position + seq_len)."""

    session_id: str
    position: int


class ChainRequest(Message):
    """A forward or backward pass of blocks [start, end) without a KV cache."""

    start: int
    end: int
    codec: str = "none"


class StepReply(Message):
    position: int


class PeerStatus(Message):
    """Reply to `info`: what a client needs to decide whether and how to use this peer."""

    model: str
    start: int
    end: int
    state: str
    version: str
    dtype: str
    quant: str
    codecs: list[str]
    cache_tokens_left: int
    memory_per_block: int  # bytes resident per served block: weights (quantized or not) and their state
    max_batch_tokens: int
    max_session_length: int
    session_timeout: float
