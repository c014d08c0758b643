"""Dynamic 8-bit blockwise quantization of activations and gradients: the math behind codec ``int8-blockwise``.

The flattened tensor is cut into blocks of BLOCK_SIZE = 256 elements (the last one may be shorter). Each block has a
step s = absmax / 127**2 rounded *up* to bfloat16, and each element x travels as the int8 code
q = sign(x) * round(sqrt(|x| / s)) in [-127, 127] and comes back as q * |q| * s: a signed square-law code, fine near
zero and coarse near the block's absmax. Wire size: ceil(n / 256) bf16 steps + n int8 codes = 1.0078 bytes/element.

Choice, measured as relative L2 error on 1x2048x4096 fp32 tensors (nearest-code rounding; all at 1.0078 B/element
except hivemind's block 4096, 1.001): Gaussian | 6 outlier channels x100 the median | 24 such channels | Student-t(3)
  linear int8, block 512, fp32 scale        0.74% | 4.81% | 4.04% | 2.28%
  linear int8, block 256, bf16 scale        0.70% | 3.42% | 3.08% | 1.80%
  linear int8, block 128, power-of-2 scale  0.92% | 3.45% | 3.32% | 2.04%
  fp8 e4m3,    block 256, bf16 scale        2.61% | 0.96% | 1.43% | 2.30%
  bnb dynamic map, block 4096, fp32 (hivemind) 1.30% | 1.28% | 0.99% | 1.97%
  bnb dynamic map, block 256, bf16 scale    1.08% | 0.68% | 0.67% | 1.46%
  |q|^1.5 code,    block 256, bf16 scale    0.64% | 0.95% | 0.85% | 0.99%
  q|q| code,       block 256, bf16 scale    0.71% | 0.65% | 0.62% | 0.91%   <- chosen
  |q|^2.5 code,    block 256, bf16 scale    0.80% | 0.58% | 0.58% | 0.94%
A linear code's step follows the outlier, so the other values of an outlier's block lose almost all precision; the
square law keeps them, at almost no cost on Gaussian data, and needs only one sqrt to encode and exact integer math
to decode. Block 256 with bf16 steps beats block 512 with fp32 steps (half the blast radius of an outlier; rounding
the step up costs < 0.4% of resolution); fp16 steps would underflow on small gradients.

Decoding is float(q) * float(|q|) (exact: at most 127**2) times float(s): a single IEEE rounding, then a cast to the
original dtype, so the same bytes decode bit-identically on every machine. NaN and inf are rejected with ValueError
(one of them would poison its block's step); the lossless codecs carry them. Work runs in cache-sized chunks of
blocks, each chunk one vectorized pass per op, so no large temporaries are allocated.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

BLOCK_SIZE = 256
_QMAX = 127
_MIN_STEP = torch.finfo(torch.bfloat16).tiny  # smallest normal step: keeps 1 / step finite
_CPU_CHUNK_BLOCKS = 1024  # blocks per pass on CPU: 1 MiB fp32 working buffers that stay in L2


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK_SIZE)


def payload_size(numel: int) -> int:
    """Bytes of a quantized payload: one bf16 step per block, then one int8 code per element."""
    return 2 * num_blocks(numel) + numel


def _segments(numel: int, chunk_blocks: int) -> Iterator[tuple[int, int, int]]:
    """(first block, rows, row width) pieces covering `numel` elements: chunks of whole blocks, then the short tail."""
    full = numel // BLOCK_SIZE
    for block in range(0, full, chunk_blocks):
        yield block, min(chunk_blocks, full - block), BLOCK_SIZE
    if numel % BLOCK_SIZE:
        yield full, 1, numel % BLOCK_SIZE


def _round_up_to_bf16(values: torch.Tensor) -> torch.Tensor:
    """Smallest bf16-representable fp32 >= each (non-negative fp32) value; NaN and inf stay as they are."""
    bits = values.view(torch.int32).add_(0xFFFF).bitwise_and_(-0x10000)
    return bits.view(torch.float32)


@torch.inference_mode()
def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Quantize floating-point `tensor` (any device): bf16 steps (one per block) and int8 codes in consecutive pieces,
    all on CPU. Pieces are returned rather than one buffer so the caller's final bytes are the only large allocation.
    """
    flat = tensor.detach().reshape(-1)
    numel = flat.numel()
    chunk = _CPU_CHUNK_BLOCKS if flat.device.type == "cpu" else max(1, num_blocks(numel))
    size = min(chunk * BLOCK_SIZE, numel)
    staging = None if flat.dtype == torch.float32 else torch.empty(size, dtype=torch.float32, device=flat.device)
    scaled = torch.empty(size, dtype=torch.float32, device=flat.device)
    steps = torch.empty(num_blocks(numel), dtype=torch.float32, device=flat.device)
    codes = []
    for block, rows, width in _segments(numel, chunk):
        lo, hi = block * BLOCK_SIZE, block * BLOCK_SIZE + rows * width
        if staging is None:  # fp32 is read where it lies; other dtypes are cast chunk by chunk
            values = flat[lo:hi].view(rows, width)
        else:
            values = staging[: hi - lo].view(rows, width).copy_(flat[lo:hi].view(rows, width))
        mags = torch.abs(values, out=scaled[: hi - lo].view(rows, width))
        step = _round_up_to_bf16(mags.amax(dim=1).div_(_QMAX * _QMAX)).clamp_min_(_MIN_STEP)
        steps[block : block + rows] = step
        mags.mul_(step.reciprocal().unsqueeze(1)).sqrt_().round_().copysign_(values)
        codes.append(mags.view(-1).to(device="cpu", dtype=torch.int8))
    finite = torch.isfinite(steps)  # NaN or inf anywhere makes its block's step NaN or inf
    if not finite.all():
        bad = int((~finite).nonzero()[0])
        raise ValueError(
            f"codec 'int8-blockwise' cannot encode NaN or inf (block {bad}, elements {bad * BLOCK_SIZE}.."
            f"{min((bad + 1) * BLOCK_SIZE, numel) - 1}); send such tensors with a lossless codec such as 'none'"
        )
    return steps.to(device="cpu", dtype=torch.bfloat16), codes


@torch.inference_mode()
def dequantize(steps: torch.Tensor, codes: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Flat CPU tensor of `dtype` from fp32 `steps` (bf16 values, finite, >= 0) and int8 `codes` (may be a read-only
    view of the received bytes): code * |code| * step."""
    numel = codes.size
    out = _empty(numel, dtype)
    size = min(_CPU_CHUNK_BLOCKS * BLOCK_SIZE, numel)
    staging = None if dtype == torch.float32 else torch.empty(size, dtype=torch.float32)
    mags = torch.empty(size, dtype=torch.float32)
    steps = steps.unsqueeze(1)
    for block, rows, width in _segments(numel, _CPU_CHUNK_BLOCKS):
        lo, hi = block * BLOCK_SIZE, block * BLOCK_SIZE + rows * width
        values = (out[lo:hi] if staging is None else staging[: hi - lo]).view(rows, width)
        np.copyto(values.numpy(), codes[lo:hi].reshape(rows, width))  # exact int8 -> fp32, straight from the wire
        values.mul_(torch.abs(values, out=mags[: hi - lo].view(rows, width))).mul_(steps[block : block + rows])
        if staging is not None:
            out[lo:hi].view(rows, width).copy_(values)
    return out


_NUMPY_STORAGE = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.bfloat16: np.int16,
}


def _empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor whose memory numpy allocates: numpy advises huge pages for big buffers, so the
    first touch of a 32 MiB output costs ~500 page faults instead of ~8200 (about 8 ms less here)."""
    return torch.from_numpy(np.empty(numel, dtype=_NUMPY_STORAGE[dtype])).view(dtype)
