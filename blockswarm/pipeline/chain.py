"""Forward and backward passes through a route without KV caches (training, scoring, logits)."""

from __future__ import annotations

import asyncio

import torch
from hivemind.p2p import P2P

from blockswarm.pipeline.hops import Hop, Router
from blockswarm.pipeline.streams import call
from blockswarm.wire.messages import BACKWARD_RPC, FORWARD_RPC, ChainRequest


async def forward_chain(
    p2p: P2P, router: Router, hidden: torch.Tensor, num_blocks: int, codec: str, timeout: float
) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
    """Returns the outputs and, per hop, the inputs it received (backward recomputes from them)."""
    hops = await asyncio.to_thread(router.route, 0, num_blocks)
    dtype = hidden.dtype
    inputs = []
    for hop in hops:
        inputs.append((hop, hidden))
        request = ChainRequest(start=hop.start, end=hop.end, codec=codec)
        (hidden,) = await call(p2p, hop.peer_id, FORWARD_RPC, request, [hidden], codec, timeout)
    return hidden.to(dtype), inputs


async def backward_chain(
    p2p: P2P,
    hop_inputs: list[tuple[Hop, torch.Tensor]],
    grad_output: torch.Tensor,
    codec: str,
    timeout: float,
) -> torch.Tensor:
    """Gradients w.r.t. the chain's inputs, hop by hop in reverse order."""
    dtype = grad_output.dtype
    grad = grad_output
    for hop, hidden in reversed(hop_inputs):
        request = ChainRequest(start=hop.start, end=hop.end, codec=codec)
        (grad,) = await call(p2p, hop.peer_id, BACKWARD_RPC, request, [hidden, grad], codec, timeout)
    return grad.to(dtype)
