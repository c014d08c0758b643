"""Resident memory per block for --quant none / int8 / nf4 on the small preset (hidden 512, 16 blocks), on CPU.

Each quant type is measured in a fresh subprocess: import everything, quantize and run one warm-up block (so that
libraries, kernels and the shared rotary tables are in place before the baseline), then read the process RSS,
load all blocks, quantize them one by one, run each once, drop the fp32 leftovers (gc + glibc `malloc_trim`, so
memory freed after loading does not count), and read RSS again. `*_bytes_per_block` is that RSS growth divided
by the number of blocks: what the peer really keeps resident for them. `*_accounted_bytes_per_block` is
`block_memory_bytes` (parameters, buffers, bitsandbytes state) next to it; the ratios come from the RSS figures,
and `rss_vs_accounted_max_deviation` says how far the two agree. `*_output_rel_error` is the relative L2 error of
block 0's output vs fp32, on the embeddings of random tokens.

Usage: python bench/weights.py [--preset small] [--repeat 2]   (last stdout line: one JSON object)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from blockswarm.models import load_blocks, load_config, load_ends
from blockswarm.models.quantization import QUANT_TYPES, block_memory_bytes, quantize_block
from blockswarm.models.random_init import init_random_model


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS may then include freed heap pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(model: str, quant: str, repeat: int) -> dict:
    """In this (fresh) process: RSS growth and accounted bytes for `repeat` copies of all blocks, quantized."""
    import bitsandbytes  # noqa: F401  (in the baseline for every quant type, "none" included)

    config = load_config(model)
    hidden = load_ends(model).embed(torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0)))
    hidden = hidden.detach()
    with torch.no_grad():
        (reference,) = load_blocks(model, 0, 1, progress=False)
        expected = reference(hidden)
        (warmup,) = load_blocks(model, 0, 1, progress=False)
        output = quantize_block(warmup, quant)(hidden)
    error = ((output - expected).norm() / expected.norm()).item()
    del reference, warmup
    release_freed_memory()

    before = rss_bytes()
    blocks = []
    for _ in range(repeat):
        for i in range(config.num_blocks):
            (block,) = load_blocks(model, i, i + 1, progress=False)
            blocks.append(quantize_block(block, quant))
    with torch.no_grad():
        for block in blocks:
            block(hidden)
    release_freed_memory()
    grown = rss_bytes() - before
    return dict(
        blocks=len(blocks),
        rss_bytes_per_block=grown / len(blocks),
        accounted_bytes_per_block=sum(block_memory_bytes(b) for b in blocks) / len(blocks),
        output_rel_error=error,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeat", type=int, default=2, help="load every block this many times (more signal)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "QUANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.repeat)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = str(init_random_model(Path(tmp) / args.preset, preset=args.preset, family="llama"))
        results = {}
        for quant in QUANT_TYPES:
            child = [sys.executable, __file__, "--repeat", str(args.repeat), "--child", model, quant]
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            results[quant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{quant}: {results[quant]}", file=sys.stderr)

    names = {"none": "fp32", "int8": "int8", "nf4": "nf4"}
    report: dict = {"preset": args.preset, "blocks_measured": results["none"]["blocks"]}
    for quant, name in names.items():
        report[f"{name}_bytes_per_block"] = round(results[quant]["rss_bytes_per_block"])
        report[f"{name}_accounted_bytes_per_block"] = round(results[quant]["accounted_bytes_per_block"])
    fp32 = results["none"]["rss_bytes_per_block"]
    for quant in ("int8", "nf4"):
        report[f"{quant}_ratio"] = round(results[quant]["rss_bytes_per_block"] / fp32, 4)
        accounted = results[quant]["accounted_bytes_per_block"] / results["none"]["accounted_bytes_per_block"]
        report[f"{quant}_accounted_ratio"] = round(accounted, 4)
        report[f"{quant}_output_rel_error"] = round(results[quant]["output_rel_error"], 4)
    report["rss_vs_accounted_max_deviation"] = round(
        max(abs(r["rss_bytes_per_block"] / r["accounted_bytes_per_block"] - 1) for r in results.values()), 4
    )
    report["targets_met"] = report["int8_ratio"] <= 0.35 and report["nf4_ratio"] <= 0.2
    print(json.dumps(report))


if __name__ == "__main__":
    main()
