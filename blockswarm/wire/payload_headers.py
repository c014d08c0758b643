"""What an encoded tensor claims to be (dtype and shape), read from its header alone: a receiver checks how large
a tensor will be once decoded before it decodes any (a small int8 payload can claim a large float32 tensor)."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from blockswarm.compression.codecs import MAGIC, MAX_NDIM, WIRE_DTYPES
from blockswarm.wire.transport import Frame, UndecodableTensor

# the fixed part of a payload's header (compression/codecs.py): magic, codec id, dtype id, ndim; then ndim x u32
_FIXED = struct.Struct("<2sBBB")


@dataclass(frozen=True)
class PayloadHeader:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_payload_header(payload: bytes) -> PayloadHeader:
    """The dtype and shape a payload claims; raises UndecodableTensor when its header is not even readable.
    Whether the payload really carries that many values is checked when it is decoded."""
    if len(payload) < _FIXED.size:
        raise UndecodableTensor(f"tensor payload of {len(payload)} bytes is shorter than its header")
    magic, _, dtype_id, ndim = _FIXED.unpack_from(payload)
    if magic != MAGIC:
        raise UndecodableTensor("not a blockswarm tensor payload (bad magic bytes)")
    if dtype_id not in WIRE_DTYPES:
        raise UndecodableTensor(f"unknown dtype id {dtype_id}")
    if ndim > MAX_NDIM:
        raise UndecodableTensor(f"tensor header claims {ndim} dims (at most {MAX_NDIM})")
    if len(payload) < _FIXED.size + 4 * ndim:
        raise UndecodableTensor("tensor payload is truncated inside its shape")
    return PayloadHeader(WIRE_DTYPES[dtype_id], struct.unpack_from(f"<{ndim}I", payload, _FIXED.size))


def payload_headers(frame: Frame, begin: int = 0, end: int | None = None) -> list[PayloadHeader]:
    """The headers of the frame's payloads [begin, end)."""
    return [read_payload_header(payload) for payload in frame.payloads[begin:end]]
