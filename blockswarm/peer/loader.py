"""Loading a span's weights onto the device, quantizing them, and measuring how fast one block computes."""

from __future__ import annotations

import torch

from blockswarm.models import ModelConfig, load_blocks
from blockswarm.models.quantization import QUANT_TYPES, quantize_block
from blockswarm.peer.backend import BlockBackend
from blockswarm.peer.throughput import Throughput, measure_throughput

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Values of `--dtype` besides "auto"."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


class SpanLoader:
    """Builds the backend for any span of the checkpoint; throughput is measured on the first span loaded."""

    def __init__(self, model: str, config: ModelConfig, device: str, dtype: str, quant: str):
        if quant not in QUANT_TYPES:
            raise ValueError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
        self.model = model
        self.config = config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.quant = quant
        self.throughput: Throughput | None = None

    def load(self, start: int, end: int) -> BlockBackend:
        """Blocks [start, end), loaded on the CPU when quantizing so that full-precision weights never occupy the
        GPU, then quantized."""
        blocks = load_blocks(
            self.model, start, end, dtype=self.dtype, device="cpu" if self.quant != "none" else self.device
        )
        blocks = [quantize_block(block, self.quant, self.device) for block in blocks]
        if self.throughput is None:
            self.throughput = measure_throughput(blocks[0], self.config, self.dtype, self.device, self.quant)
        return BlockBackend(self.config, blocks, start, self.dtype, self.device)
