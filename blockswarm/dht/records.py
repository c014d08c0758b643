"""Versioned records stored in the DHT.

Every record goes on the wire as a msgpack map tagged with `"_bs": <kind>` ("server" or "model"), so that
BlockswarmRecordValidator can tell our records from other applications' values sharing the DHT. Parsing is
strict (no "2" -> 2 coercion: a peer sending the wrong types is broken or hostile) but ignores unknown fields,
so peers running a newer version that adds fields stay readable.
"""

from __future__ import annotations

import hashlib
import json
import math
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RECORD_TAG = "_bs"
"""Field that marks a DHT value as a blockswarm record; its value is the record kind."""

# Bounds on every number a record carries: anyone can write a record, and readers size loops and routes by them
# (a model index entry claiming 10**9 blocks would make a monitor build 10**9 keys).
MAX_BLOCKS = 4096  # blocks of one model; the largest open models have ~10**2
MAX_THROUGHPUT = 1e9  # tokens/s through one block; far above any hardware
MAX_CACHE_TOKENS = 2**31
MAX_RTT = 600.0  # seconds
MAX_LOAD = 2**20  # sessions or queued requests of one peer


def content_digest(wire: dict[str, Any]) -> str:
    """Hash of a record as it travels (unknown fields included, so newer versions' entries keep their digest).

    "" for a map no JSON can order (keys of mixed types): no well-formed record has one.
    """
    try:
        canonical = json.dumps(wire, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        return ""
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class ServerState(StrEnum):
    """Life cycle of a peer: announced while loading, serving, finishing sessions before leaving, gone."""

    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


class _WireRecord(BaseModel):
    """Common wire encoding: a tagged plain dict that hivemind's msgpack serializer can carry."""

    model_config = ConfigDict(extra="ignore", strict=True)
    KIND: ClassVar[str]

    record_version: int = 1

    def to_wire(self) -> dict[str, Any]:
        return {RECORD_TAG: self.KIND, **self.model_dump(mode="json")}

    @classmethod
    def from_wire(cls, raw: Any) -> Any:
        """Parse a value read from the DHT; None when it is not a valid record of this kind."""
        if not isinstance(raw, dict) or raw.get(RECORD_TAG) != cls.KIND:
            return None
        try:
            return cls.model_validate(raw)
        except ValidationError:
            return None


class ServerInfo(_WireRecord):
    """What a peer announces under each block key it serves."""

    KIND: ClassVar[str] = "server"

    state: ServerState = Field(strict=False)  # arrives as its string value
    start: int = Field(ge=0, lt=MAX_BLOCKS)
    end: int = Field(gt=0, le=MAX_BLOCKS)
    throughput: float = Field(default=1.0, ge=0, le=MAX_THROUGHPUT, allow_inf_nan=False)
    inference_rps: float | None = Field(default=None, ge=0, le=MAX_THROUGHPUT, allow_inf_nan=False)
    forward_rps: float | None = Field(default=None, ge=0, le=MAX_THROUGHPUT, allow_inf_nan=False)
    # decoded tokens/s through one block with 8 sessions batched (continuous batching): capacity under load
    batched_inference_tps: float | None = Field(default=None, ge=0, le=MAX_THROUGHPUT, allow_inf_nan=False)
    cache_tokens_left: int = Field(default=0, ge=0, le=MAX_CACHE_TOKENS)
    active_sessions: int = Field(default=0, ge=0, le=MAX_LOAD)  # inference sessions open when announced
    queued_requests: int = Field(default=0, ge=0, le=MAX_LOAD)  # requests waiting for compute when announced
    dtype: str = Field(default="float32", max_length=32)
    quant: str = Field(default="none", max_length=32)
    codecs: list[str] = Field(default_factory=lambda: ["none"], max_length=16)
    version: str = Field(default="", max_length=64)
    public_name: str | None = Field(default=None, max_length=64)
    next_pings: dict[str, float] = Field(default_factory=dict, max_length=256)
    training: bool = False  # started with --train: its blocks learn from SWARM trainers' backward passes
    balancing: bool = False  # chose its own blocks and moves them where the swarm needs it (not --blocks, not --train)
    using_relay: bool = False  # others cannot dial it directly: reached through a circuit relay (an extra hop)

    @model_validator(mode="after")
    def _check(self) -> ServerInfo:
        if self.start >= self.end:
            raise ValueError(f"empty span: start={self.start} >= end={self.end}")
        if any(not math.isfinite(rtt) or not 0 <= rtt <= MAX_RTT for rtt in self.next_pings.values()):
            raise ValueError(f"next_pings must hold round-trip times between 0 and {MAX_RTT:g} s")
        return self

    @classmethod
    def from_wire(cls, raw: Any) -> ServerInfo | None:
        return super().from_wire(raw)


class ModelInfo(_WireRecord):
    """Entry of the model index: lets clients and peers check they mean the same model.

    Entries are content-addressed: each sits under the subkey "{model}@{content_digest}" followed by its writer's
    "[owner:...]" marker, so a writer can add a claim about a model but never change or remove another's.
    """

    KIND: ClassVar[str] = "model"

    num_blocks: int = Field(gt=0, le=MAX_BLOCKS)
    family: str = Field(max_length=64)
    config_hash: str = Field(max_length=128)
    weights_hash: str = Field(max_length=128)

    @classmethod
    def from_wire(cls, raw: Any) -> ModelInfo | None:
        return super().from_wire(raw)


class ReportReason(StrEnum):
    WRONG_OUTPUT = "wrong_output"  # a spot check found its outputs differ from other peers' for the same blocks


class PeerReport(_WireRecord):
    """A client's report that a peer misbehaved, published for the monitor (one per reporter and peer).

    Anyone can publish reports, so they are evidence to weigh (how many distinct reporters), not a verdict.
    """

    KIND: ClassVar[str] = "report"

    reason: ReportReason = Field(strict=False)  # arrives as its string value
    start: int = Field(ge=0, lt=MAX_BLOCKS)
    end: int = Field(gt=0, le=MAX_BLOCKS)
    reported_at: float = Field(ge=0, allow_inf_nan=False)

    @classmethod
    def from_wire(cls, raw: Any) -> PeerReport | None:
        return super().from_wire(raw)
