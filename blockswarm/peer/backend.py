"""The blocks a peer serves and the one thread that runs their math.

All compute goes through a single worker thread so that concurrent sessions never race on the device and
the event loop stays free to move bytes while a step runs. Passes without gradients use no_grad, not
inference_mode: tensors cached by the blocks (rotary tables) must stay usable by a later backward.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

from blockswarm.compression.weights import block_memory_bytes
from blockswarm.models import KVCache, ModelConfig, TransformerBlock


class BlockBackend:
    def __init__(
        self,
        config: ModelConfig,
        blocks: list[TransformerBlock],
        start: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.config = config
        self.blocks = blocks
        self.start = start
        self.end = start + len(blocks)
        self.dtype = dtype
        self.device = device
        # bytes resident per served block (weights and quantization state), averaged over the span; fixed once loaded
        self.memory_per_block = sum(block_memory_bytes(block) for block in blocks) // len(blocks)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockswarm-compute")

    def make_cache(self, batch_size: int, max_length: int) -> KVCache:
        return KVCache.allocate(self.config, batch_size, max_length, self.dtype, self.device)

    async def run(self, fn, *args, inline: bool = False):
        """Run `fn(*args)` on the compute thread, or right here when `inline` (tiny steps, where the hand-off
        to another thread costs more than the math)."""
        if inline:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _span(self, start: int, end: int) -> list[TransformerBlock]:
        return self.blocks[start - self.start : end - self.start]

    def inference_step(self, start: int, caches: list[KVCache], hidden: torch.Tensor, position: int) -> torch.Tensor:
        with torch.no_grad():
            hidden = hidden.to(self.device, self.dtype)
            for block, cache in zip(self._span(start, start + len(caches)), caches):
                hidden = block(hidden, position=position, cache=cache)
            return hidden.cpu()

    def forward(self, start: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = hidden.to(self.device, self.dtype)
            for block in self._span(start, end):
                hidden = block(hidden)
            return hidden.cpu()

    def backward(self, start: int, end: int, hidden: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        """Recomputes the forward pass from the inputs the client kept, then returns d(loss)/d(inputs)."""
        with torch.enable_grad():
            inputs = hidden.to(self.device, self.dtype).requires_grad_(True)
            outputs = inputs
            for block in self._span(start, end):
                outputs = block(outputs)
            (grad_input,) = torch.autograd.grad(outputs, inputs, grad_output.to(self.device, self.dtype))
        return grad_input.cpu()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
