"""int8-blockwise vs hivemind's BlockwiseQuantization on one activation, measured in one run on this machine.

Data: a 1x2048x4096 fp32 activation, Gaussian with 6 outlier channels at 100x the median (fixed seed).
ours_ms: median of `encode_tensor(x, "int8-blockwise")` + `decode_tensor(bytes)` (full wire bytes, header included),
through the fused C kernels when this install has them (`native_kernels` in the JSON says which ran).
hivemind_blockwise_ms: median of `BlockwiseQuantization().compress(x, info)` + `.extract(message)`.
Rounds alternate ours / hivemind after warm-up; the last stdout line is one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as `blockswarm` commands do

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from hivemind.compression import BlockwiseQuantization, CompressionInfo  # noqa: E402

from blockswarm.compression import int8_blockwise  # noqa: E402
from blockswarm.compression.codecs import decode_tensor, encode_tensor  # noqa: E402

SHAPE = (1, 2048, 4096)
OUTLIER_CHANNELS = 6


def activation(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SHAPE, generator=generator)
    channels = torch.randperm(SHAPE[-1], generator=generator)[:OUTLIER_CHANNELS]
    hidden[..., channels] *= 100.0
    return hidden


def rel_l2(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return ((approx.double() - reference.double()).norm() / reference.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    hidden = activation()
    hivemind_codec = BlockwiseQuantization()
    info = CompressionInfo.from_tensor(hidden)

    def ours() -> tuple[float, torch.Tensor, bytes]:
        began = time.perf_counter()
        wire = encode_tensor(hidden, "int8-blockwise")
        decoded = decode_tensor(wire)
        return time.perf_counter() - began, decoded, wire

    def theirs() -> tuple[float, torch.Tensor]:
        began = time.perf_counter()
        message = hivemind_codec.compress(hidden, info)
        decoded = hivemind_codec.extract(message)
        return time.perf_counter() - began, decoded

    for _ in range(args.warmup):
        ours(), theirs()
    our_times, their_times = [], []
    for _ in range(args.repeats):
        seconds, our_decoded, wire = ours()
        our_times.append(seconds)
        seconds, their_decoded = theirs()
        their_times.append(seconds)

    ours_ms = statistics.median(our_times) * 1e3
    theirs_ms = statistics.median(their_times) * 1e3
    print(f"ours: {ours_ms:.1f} ms (min {min(our_times) * 1e3:.1f}), hivemind: {theirs_ms:.1f} ms", flush=True)
    result = {
        "ours_ms": round(ours_ms, 2),
        "hivemind_blockwise_ms": round(theirs_ms, 2),
        "speedup": round(theirs_ms / ours_ms, 2),
        "bytes_per_element": round(len(wire) / hidden.numel(), 5),
        "rel_l2_error": round(rel_l2(hidden, our_decoded), 5),
        "hivemind_rel_l2_error": round(rel_l2(hidden, their_decoded), 5),
        "native_kernels": int8_blockwise.native_kernels(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
