"""Self-describing tensor payloads: every tensor on the wire carries its codec, dtype and shape.

Layout (little-endian): magic b"BT", codec id (u8), original dtype id (u8), ndim (u8), ndim x u32 dims,
then the codec's payload. A decoder checks that the payload is exactly as long as the header says, so a
truncated or lying payload is rejected before it reaches any math.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

MAGIC = b"BT"
MAX_NDIM = 8
_HEADER = struct.Struct("<2sBBB")

DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.float16,
    2: torch.bfloat16,
    3: torch.float64,
    4: torch.int64,
    5: torch.int32,
}
_DTYPE_IDS = {dtype: code for code, dtype in DTYPES.items()}


class WireFormatError(ValueError):
    """A payload that cannot be decoded: truncated, corrupt, or an unknown codec/dtype."""


@dataclass(frozen=True)
class Codec:
    """A lossless or lossy way to turn a tensor into bytes; `wire_dtype` is what travels."""

    name: str
    id: int
    wire_dtype: torch.dtype | None  # None: the tensor's own dtype travels unchanged

    @property
    def lossless(self) -> bool:
        return self.wire_dtype is None

    def payload_dtype(self, original: torch.dtype) -> torch.dtype:
        return self.wire_dtype if self.wire_dtype is not None and original.is_floating_point else original


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        Codec("none", 0, None),
        Codec("fp16", 1, torch.float16),
        Codec("bf16", 2, torch.bfloat16),
    )
}
_CODECS_BY_ID = {codec.id: codec for codec in CODECS.values()}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; available: {sorted(CODECS)}") from None


def encode_tensor(tensor: torch.Tensor, codec: str = "none") -> bytes:
    """Serialize `tensor` (any device) with `codec` into one self-describing bytes object."""
    spec = get_codec(codec)
    if tensor.dtype not in _DTYPE_IDS:
        raise ValueError(f"cannot send a tensor of dtype {tensor.dtype}; supported: {list(_DTYPE_IDS)}")
    if tensor.dim() > MAX_NDIM:
        raise ValueError(f"cannot send a tensor with {tensor.dim()} dims (at most {MAX_NDIM})")
    payload = tensor.detach().to(device="cpu", dtype=spec.payload_dtype(tensor.dtype)).contiguous()
    header = _HEADER.pack(MAGIC, spec.id, _DTYPE_IDS[tensor.dtype], tensor.dim())
    dims = struct.pack(f"<{tensor.dim()}I", *tensor.shape)
    return header + dims + _raw_bytes(payload)


def decode_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Inverse of `encode_tensor`; the result has the original dtype, on CPU. Raises WireFormatError."""
    data = memoryview(data)
    if len(data) < _HEADER.size:
        raise WireFormatError(f"tensor payload of {len(data)} bytes is shorter than its header")
    magic, codec_id, dtype_id, ndim = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireFormatError("not a blockswarm tensor payload (bad magic bytes)")
    if codec_id not in _CODECS_BY_ID:
        raise WireFormatError(f"unknown codec id {codec_id}")
    if dtype_id not in DTYPES:
        raise WireFormatError(f"unknown dtype id {dtype_id}")
    if ndim > MAX_NDIM:
        raise WireFormatError(f"tensor header claims {ndim} dims (at most {MAX_NDIM})")
    offset = _HEADER.size + 4 * ndim
    if len(data) < offset:
        raise WireFormatError("tensor payload is truncated inside its shape")
    shape = struct.unpack_from(f"<{ndim}I", data, _HEADER.size)
    dtype = DTYPES[dtype_id]
    payload_dtype = _CODECS_BY_ID[codec_id].payload_dtype(dtype)
    numel = math.prod(shape)
    expected = numel * payload_dtype.itemsize
    if len(data) - offset != expected:
        raise WireFormatError(
            f"tensor header claims shape {list(shape)} ({expected} payload bytes) "
            f"but {len(data) - offset} bytes were sent"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    payload = torch.frombuffer(bytearray(data[offset:]), dtype=payload_dtype)
    return payload.reshape(shape).to(dtype)


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.numel() == 0:
        return b""
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
