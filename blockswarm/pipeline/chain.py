"""Forward and backward passes through a route without KV caches (training, scoring, logits).

A stage that fails is retried on other peers holding its blocks. Backward may run on a different peer than
forward did: peers recompute from the inputs the client kept, and when the replacement route splits a
stage over several peers, the client first runs forward through them to get their inputs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P

from blockswarm.pipeline.hops import Hop, PeerError, Router
from blockswarm.pipeline.retry import RetryPolicy, retry
from blockswarm.pipeline.streams import call
from blockswarm.wire.messages import BACKWARD_RPC, FORWARD_RPC, ChainRequest


@dataclass
class Chain:
    p2p: P2P
    router: Router
    codec: str = "none"  # preferred; each hop uses it where its peer supports it
    timeout: float = 30.0
    retry_policy: RetryPolicy = RetryPolicy()

    async def forward(
        self, hidden: torch.Tensor, start: int, end: int
    ) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
        """Outputs of blocks [start, end) and, per hop, the inputs it received (backward recomputes from them)."""
        dtype = hidden.dtype
        inputs: list[tuple[Hop, torch.Tensor]] = []
        plan: list[Hop] = []  # the wired hops still ahead; re-wired from the failed block after a failure
        block = start
        while block < end:

            async def next_hop(block: int = block, hidden: torch.Tensor = hidden) -> tuple[Hop, torch.Tensor]:
                if not plan or plan[0].start != block:
                    plan[:] = await self._route(block, end)
                hop = plan.pop(0)
                try:
                    return hop, await self._call(hop, FORWARD_RPC, [hidden])
                except PeerError:
                    plan.clear()
                    raise

            hop, outputs = await retry(self.retry_policy, next_hop, f"running forward from block {block}")
            inputs.append((hop, hidden))
            hidden, block = outputs, hop.end
        return hidden.to(dtype), inputs

    async def backward(self, hop_inputs: list[tuple[Hop, torch.Tensor]], grad_output: torch.Tensor) -> torch.Tensor:
        """Gradients w.r.t. the chain's inputs, hop by hop in reverse order."""
        dtype = grad_output.dtype
        grad = grad_output
        for hop, hidden in reversed(hop_inputs):
            grad = await self._backward_span(hop, hidden, grad)
        return grad.to(dtype)

    async def _backward_span(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        try:
            return await self._call(hop, BACKWARD_RPC, [hidden, grad])
        except PeerError:
            pass  # _call banned it; find another way through these blocks

        async def on_replacement() -> torch.Tensor:
            hops = await self._route(hop.start, hop.end)
            if len(hops) == 1:
                return await self._call(hops[0], BACKWARD_RPC, [hidden, grad])
            _, inner_inputs = await self.forward(hidden, hop.start, hop.end)
            return await self.backward(inner_inputs, grad)

        return await retry(self.retry_policy, on_replacement, f"running backward of blocks {hop.start}:{hop.end}")

    async def _route(self, start: int, end: int) -> list[Hop]:
        return await asyncio.to_thread(self.router.wire, start, end)

    async def _call(self, hop: Hop, rpc: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        codec = hop.codec_for(self.codec)
        request = ChainRequest(start=hop.start, end=hop.end, codec=codec)
        try:
            (output,) = await call(self.p2p, hop.peer_id, rpc, request, tensors, codec, self.timeout)
        except PeerError as error:
            self.router.ban(error.peer_id)
            raise
        return output
