"""How fast this peer computes one block, measured once per model/device/dtype/quant and cached on disk."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from blockswarm.models import KVCache, ModelConfig, SessionRows, TransformerBlock, step_block

CACHE_FILE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blockswarm" / "throughput.json"


BATCH_SESSIONS = 8  # sessions decoding together when the batched figure is measured: a busy peer's typical tick
_MEASUREMENT_VERSION = 2  # part of the cache key: entries measured by older versions lack figures


@dataclass(frozen=True)
class Throughput:
    inference_rps: float  # single-token decoding steps per second through one block (one session's latency)
    forward_rps: float  # tokens per second of a forward pass through one block
    batched_inference_tps: float  # decoded tokens per second through one block, BATCH_SESSIONS sessions at once


def measure_throughput(
    block: TransformerBlock, config: ModelConfig, dtype: torch.dtype, device: torch.device, quant: str
) -> Throughput:
    key = f"v{_MEASUREMENT_VERSION}|{config.fingerprint()}|{device}|{dtype}|{quant}|{torch.get_num_threads()}"
    cached = _read_cache().get(key)
    if cached is not None:
        return Throughput(**cached)
    result = Throughput(
        _inference_rps(block, config, dtype, device),
        _forward_rps(block, config, dtype, device),
        _batched_inference_tps(block, config, dtype, device),
    )
    _write_cache(key, result)
    return result


def _inference_rps(block: TransformerBlock, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> float:
    steps = 24
    cache = KVCache.allocate(config, 1, steps + 8, dtype, device)
    hidden = torch.randn(1, 1, config.hidden_size, dtype=dtype, device=device)
    with torch.no_grad():
        for position in range(4):
            block(hidden, position=position, cache=cache)
        _synchronize(device)
        began = time.perf_counter()
        for position in range(4, 4 + steps):
            block(hidden, position=position, cache=cache)
        _synchronize(device)
    return steps / (time.perf_counter() - began)


def _batched_inference_tps(
    block: TransformerBlock, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> float:
    """Continuous batching's rate: every tick steps BATCH_SESSIONS sessions (at different positions) together."""
    ticks = 12
    sessions = [
        SessionRows(
            torch.randn(1, 1, config.hidden_size, dtype=dtype, device=device),
            position=4 + index,
            cache=KVCache.allocate(config, 1, ticks + BATCH_SESSIONS + 8, dtype, device),
        )
        for index in range(BATCH_SESSIONS)
    ]
    with torch.no_grad():
        step_block(block, sessions)
        _synchronize(device)
        began = time.perf_counter()
        for tick in range(1, ticks + 1):
            step_block(block, [SessionRows(s.hidden, s.position + tick, s.cache) for s in sessions])
        _synchronize(device)
    return ticks * BATCH_SESSIONS / (time.perf_counter() - began)


def _forward_rps(block: TransformerBlock, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> float:
    tokens, repeats = 256, 3
    hidden = torch.randn(1, tokens, config.hidden_size, dtype=dtype, device=device)
    with torch.no_grad():
        block(hidden)
        _synchronize(device)
        began = time.perf_counter()
        for _ in range(repeats):
            block(hidden)
        _synchronize(device)
    return tokens * repeats / (time.perf_counter() - began)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_cache() -> dict:
    try:
        return json.loads(CACHE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, result: Throughput) -> None:
    try:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        CACHE_FILE.write_text(json.dumps({**_read_cache(), key: asdict(result)}, indent=1))
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
