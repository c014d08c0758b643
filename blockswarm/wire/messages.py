"""Schemas of the metadata that travels with every request and reply (msgpack on the wire)."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field, field_validator

from blockswarm.models.adapters import check_lora_targets, lora_scaling

INFO_RPC = "blockswarm.info"
INFERENCE_RPC = "blockswarm.inference"
FORWARD_RPC = "blockswarm.forward"
BACKWARD_RPC = "blockswarm.backward"
PUSH_RPC = "blockswarm.push"  # a peer's outputs of an inference step, sent straight to the next span's peer

MAX_LORA_RANK = 1024
MAX_PROMPT_LEN = 4096


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class AdapterSpec(Message):
    """Which adapter tensors follow: per block a deep prompt if `prompt_len`, LoRA (A, B) per target if `lora_rank`.

    The one definition of a valid adapter for clients and peers alike: a spec with an unknown LoRA target cannot be
    built, nor read off the wire.
    """

    prompt_len: int = Field(default=0, ge=0, le=MAX_PROMPT_LEN)
    lora_rank: int = Field(default=0, ge=0, le=MAX_LORA_RANK)
    lora_alpha: float = Field(default=1.0, allow_inf_nan=False)
    lora_targets: tuple[str, ...] = Field(default=(), max_length=16)

    @field_validator("lora_targets")
    @classmethod
    def _known_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        return check_lora_targets(targets)

    @property
    def lora_scale(self) -> float:
        return lora_scaling(self.lora_alpha, self.lora_rank)

    @property
    def lora_tensors_per_block(self) -> int:
        return 2 * len(self.lora_targets) if self.lora_rank else 0

    def num_tensors(self, num_blocks: int) -> int:
        return (1 if self.prompt_len else 0) + num_blocks * self.lora_tensors_per_block


class OpenSession(Message):
    """First message of an inference stream: reserves a KV cache for blocks [start, end)."""

    session_id: str = Field(min_length=1, max_length=64)
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    codec: str = "none"  # how the peer encodes its replies
    adapter: AdapterSpec | None = None  # the client's deep prompts / LoRA for this session, sent with this message
    # peer-to-peer push (docs/architecture.md, "Inference and failover"); all None: every step comes from the client
    push_to: str | None = Field(default=None, max_length=128)  # base58 id of the next span's peer
    push_session: str | None = Field(default=None, max_length=64)  # the next span's session id on that peer
    push_from: str | None = Field(default=None, max_length=128)  # base58 id of the only peer that may push here


class PushStep(Message):
    """A step's input pushed by the previous span's peer into `session_id` at `position`, instead of the client."""

    session_id: str = Field(min_length=1, max_length=64)
    position: int


class InferenceStep(Message):
    """New hidden states of `session_id` at absolute positions [position, position + seq_len)."""

    session_id: str
    position: int


class ChainRequest(Message):
    """A forward or backward pass of blocks [start, end) without a KV cache.

    With `adapter`, the adapter's tensors follow the activations and a backward reply carries their gradients
    after the inputs' gradient. With `train`, a peer started with --train also learns from this backward pass.
    """

    start: int
    end: int
    codec: str = "none"
    adapter: AdapterSpec | None = None
    train: bool = False
    train_proof: str = Field(default="", max_length=128)  # with `train`: see wire/trainer_auth.py


def payload_digest(payload: bytes) -> str:
    """`StepReply.input_digest` of a pushed input: what the receiving peer reports and the client checks."""
    return hashlib.sha256(payload).hexdigest()


class StepReply(Message):
    """The outputs of one step. `pushed`: whether they reached the next span's peer (None: this session does not
    push); `input_digest`: for a step whose input was pushed, the sha256 of that payload (the client checks it)."""

    position: int
    pushed: bool | None = None
    input_digest: str | None = Field(default=None, max_length=64)


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
    memory_per_block: int  # bytes resident per served block (their mean): weights (quantized or not) and their state
    max_batch_tokens: int
    max_session_length: int
    session_timeout: float
    training_step: int | None = None  # optimizer steps its SWARM stage has made; None for a frozen peer
