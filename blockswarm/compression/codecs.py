"""Self-describing tensor payloads: every tensor on the wire carries its codec, dtype and shape.

Layout (little-endian): magic b"BT", codec id (u8), original dtype id (u8), ndim (u8), ndim x u32 dims,
then the codec's payload. Each codec owns its payload layout and knows its exact size for (numel, dtype), so a
decoder checks that the payload is exactly as long as the header implies, and a truncated or lying payload is
rejected before it reaches any math. Codecs: `none` (lossless), `fp16`/`bf16` (cast), `int8-blockwise` (dynamic
8-bit blockwise quantization of floating-point tensors, ~1.008 bytes/element; see `int8_blockwise`).
"""

from __future__ import annotations

import math
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from blockswarm.compression import int8_blockwise

MAGIC = b"BT"
MAX_NDIM = 8
_HEADER = struct.Struct("<2sBBB")

WIRE_DTYPES: dict[int, torch.dtype] = {  # dtype id in a payload header -> dtype
    0: torch.float32,
    1: torch.float16,
    2: torch.bfloat16,
    3: torch.float64,
    4: torch.int64,
    5: torch.int32,
}
_DTYPE_IDS = {dtype: code for code, dtype in WIRE_DTYPES.items()}


class WireFormatError(ValueError):
    """A payload that cannot be decoded: truncated, corrupt, or an unknown codec/dtype."""


class Codec(ABC):
    """A way to turn a tensor's values into a payload and back; each codec owns its payload layout and size."""

    name: str
    id: int  # travels in the header; never reuse one

    @property
    @abstractmethod
    def lossless(self) -> bool:
        """True when decoding gives back exactly the values that were encoded."""

    @abstractmethod
    def accepts(self, dtype: torch.dtype) -> bool:
        """Whether tensors of `dtype` (one of WIRE_DTYPES) can travel with this codec."""

    @abstractmethod
    def payload_size(self, numel: int, dtype: torch.dtype) -> int:
        """Exact payload length in bytes for `numel` elements of `dtype`."""

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> list[np.ndarray]:
        """The payload of `tensor` (any device and shape): uint8 CPU arrays that join to `payload_size` bytes."""

    @abstractmethod
    def decode(self, payload: memoryview, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat CPU tensor of `dtype` from a payload already checked to be `payload_size` bytes, numel > 0."""


@dataclass(frozen=True)
class CastCodec(Codec):
    """Raw values, floating-point ones cast to `wire_dtype` (None: the tensor's own dtype travels unchanged)."""

    name: str
    id: int
    wire_dtype: torch.dtype | None

    @property
    def lossless(self) -> bool:
        return self.wire_dtype is None

    def accepts(self, dtype: torch.dtype) -> bool:
        return True

    def payload_dtype(self, original: torch.dtype) -> torch.dtype:
        return self.wire_dtype if self.wire_dtype is not None and original.is_floating_point else original

    def payload_size(self, numel: int, dtype: torch.dtype) -> int:
        return numel * self.payload_dtype(dtype).itemsize

    def encode(self, tensor: torch.Tensor) -> list[np.ndarray]:
        payload = tensor.detach().to(device="cpu", dtype=self.payload_dtype(tensor.dtype))
        return [payload.contiguous().reshape(-1).view(torch.uint8).numpy()]

    def decode(self, payload: memoryview, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.frombuffer(bytearray(payload), dtype=self.payload_dtype(dtype)).to(dtype)


@dataclass(frozen=True)
class Int8BlockwiseCodec(Codec):
    """Dynamic 8-bit blockwise quantization of floating-point tensors; see `int8_blockwise` for the format."""

    name: str
    id: int

    @property
    def lossless(self) -> bool:
        return False

    def accepts(self, dtype: torch.dtype) -> bool:
        return dtype.is_floating_point

    def payload_size(self, numel: int, dtype: torch.dtype) -> int:
        return int8_blockwise.payload_size(numel)

    def encode(self, tensor: torch.Tensor) -> list[np.ndarray]:
        steps, codes = int8_blockwise.quantize(tensor)
        return [steps.view(torch.uint8).numpy(), codes.view(torch.uint8).numpy()]

    def decode(self, payload: memoryview, numel: int, dtype: torch.dtype) -> torch.Tensor:
        split = 2 * int8_blockwise.num_blocks(numel)
        steps = torch.frombuffer(bytearray(payload[:split]), dtype=torch.bfloat16).float()
        invalid = ~(torch.isfinite(steps) & (steps >= 0))
        if invalid.any():
            block = int(invalid.nonzero()[0])
            raise WireFormatError(
                f"{self.name} payload has scale {float(steps[block])} for block {block}; scales must be finite and >= 0"
            )
        return int8_blockwise.dequantize(steps, np.frombuffer(payload, dtype=np.int8, offset=split), dtype)


CODECS: dict[str, Codec] = {
    codec.name: codec
    for codec in (
        CastCodec("none", 0, None),
        CastCodec("fp16", 1, torch.float16),
        CastCodec("bf16", 2, torch.bfloat16),
        Int8BlockwiseCodec("int8-blockwise", 3),
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
    if not spec.accepts(tensor.dtype):
        raise ValueError(f"codec {spec.name!r} cannot encode {tensor.dtype} tensors; use 'none'")
    if tensor.dim() > MAX_NDIM:
        raise ValueError(f"cannot send a tensor with {tensor.dim()} dims (at most {MAX_NDIM})")
    header = _HEADER.pack(MAGIC, spec.id, _DTYPE_IDS[tensor.dtype], tensor.dim())
    dims = struct.pack(f"<{tensor.dim()}I", *tensor.shape)
    return b"".join((header, dims, *spec.encode(tensor)))


@dataclass(frozen=True)
class TensorHeader:
    """What an encoded tensor claims to be, read from its header alone (before any value is decoded)."""

    codec: Codec
    dtype: torch.dtype
    shape: tuple[int, ...]
    size: int  # header bytes: the values start here

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(data: bytes | bytearray | memoryview) -> TensorHeader:
    """The header of an `encode_tensor` payload; raises WireFormatError when it is unreadable or inconsistent.
    Whether the payload carries that many values is checked by `decode_tensor`."""
    if len(data) < _HEADER.size:
        raise WireFormatError(f"tensor payload of {len(data)} bytes is shorter than its header")
    magic, codec_id, dtype_id, ndim = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireFormatError("not a blockswarm tensor payload (bad magic bytes)")
    if codec_id not in _CODECS_BY_ID:
        raise WireFormatError(f"unknown codec id {codec_id}")
    if dtype_id not in WIRE_DTYPES:
        raise WireFormatError(f"unknown dtype id {dtype_id}")
    if ndim > MAX_NDIM:
        raise WireFormatError(f"tensor header claims {ndim} dims (at most {MAX_NDIM})")
    size = _HEADER.size + 4 * ndim
    if len(data) < size:
        raise WireFormatError("tensor payload is truncated inside its shape")
    shape = struct.unpack_from(f"<{ndim}I", data, _HEADER.size)
    spec, dtype = _CODECS_BY_ID[codec_id], WIRE_DTYPES[dtype_id]
    if not spec.accepts(dtype):
        raise WireFormatError(f"codec {spec.name!r} cannot carry {dtype} tensors")
    return TensorHeader(spec, dtype, shape, size)


def decode_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Inverse of `encode_tensor`; the result has the original dtype, on CPU. Raises WireFormatError."""
    data = memoryview(data)
    header = read_header(data)
    spec, dtype, shape, offset = header.codec, header.dtype, header.shape, header.size
    numel = math.prod(shape)
    expected = spec.payload_size(numel, dtype)
    if len(data) - offset != expected:
        raise WireFormatError(
            f"tensor header claims shape {list(shape)} ({expected} payload bytes) "
            f"but {len(data) - offset} bytes were sent"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return spec.decode(data[offset:], numel, dtype).reshape(shape)
