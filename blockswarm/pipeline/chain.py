"""Forward and backward passes through a route without KV caches (training, scoring, logits).

A stage that fails is retried on other peers holding its blocks. Backward may run on a different peer than
forward did: peers recompute from the inputs the client kept, and when the replacement route splits a
stage over several peers, the client first runs forward through them to get their inputs.

A client's adapter (deep prompts, LoRA; see wire/adapters.py) goes with every request, each hop getting its blocks'
part, and backward returns the gradients w.r.t. it. With `train`, peers started with --train learn from every
backward pass: that is a SWARM training step, each stage's peer picked by stochastic wiring.

With a `Verifier`, a random share of forward hops is also computed by another peer (pipeline/verification.py); a
peer caught lying is distrusted and the hop is retried elsewhere, like a failed one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, PeerID

from blockswarm.compression.codecs import decode_tensor, encode_tensor
from blockswarm.pipeline.hops import Hop, PeerError, Router
from blockswarm.pipeline.liveness import Liveness
from blockswarm.pipeline.retry import RetryPolicy, retry
from blockswarm.pipeline.streams import call
from blockswarm.pipeline.verification import Verifier
from blockswarm.wire.adapters import AdapterTensors, adapter_payloads
from blockswarm.wire.messages import BACKWARD_RPC, FORWARD_RPC, ChainRequest
from blockswarm.wire.trainer_auth import train_proof
from blockswarm.wire.transport import encode


@dataclass
class Chain:
    p2p: P2P
    router: Router
    codec: str = "none"  # preferred; each hop uses it where its peer supports it
    timeout: float = 30.0
    retry_policy: RetryPolicy = RetryPolicy()
    train_key: str | None = None  # a SWARM trainer's run key: its backward passes make --train peers learn
    verifier: Verifier | None = None  # spot-checks a share of forward hops on other peers
    # per peer, the durations of its recent passes: a peer is suspected (and probed) only when a pass takes several
    # times longer than they did, not whenever a pass waits in its queue behind other micro-batches
    _liveness: dict[PeerID, Liveness] = field(default_factory=dict, init=False, repr=False)

    @property
    def train(self) -> bool:
        return self.train_key is not None

    async def forward(
        self, hidden: torch.Tensor, start: int, end: int, adapter: AdapterTensors | None = None
    ) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
        """Outputs of blocks [start, end) and, per hop, the inputs it received (backward recomputes from them).
        `adapter` covers all of the model's blocks."""
        dtype = hidden.dtype
        inputs: list[tuple[Hop, torch.Tensor]] = []
        plan: list[Hop] = []  # the wired hops still ahead; re-wired from the failed block after a failure
        block = start
        while block < end:

            async def next_hop(block: int = block, hidden: torch.Tensor = hidden) -> tuple[Hop, torch.Tensor]:
                if not plan or plan[0].start != block or not self.router.is_usable(plan[0].peer_id):
                    plan[:] = await self._route(block, end)
                hop = plan.pop(0)
                try:
                    return hop, await self._checked_forward(hop, hidden, adapter)
                except PeerError:
                    plan.clear()
                    raise

            hop, outputs = await retry(self.retry_policy, next_hop, f"running forward from block {block}")
            inputs.append((hop, hidden))
            hidden, block = outputs, hop.end
        return hidden.to(dtype), inputs

    async def backward(
        self,
        hop_inputs: list[tuple[Hop, torch.Tensor]],
        grad_output: torch.Tensor,
        adapter: AdapterTensors | None = None,
    ) -> tuple[torch.Tensor, AdapterTensors | None]:
        """Gradients w.r.t. the chain's inputs and w.r.t. the adapter, hop by hop in reverse order."""
        dtype = grad_output.dtype
        grad = grad_output
        adapter_grads = None if adapter is None else adapter.zeros_like()
        for hop, hidden in reversed(hop_inputs):
            grad = await self._backward_span(hop, hidden, grad, adapter, adapter_grads)
        return grad.to(dtype), adapter_grads

    async def _backward_span(
        self,
        hop: Hop,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        adapter: AdapterTensors | None,
        adapter_grads: AdapterTensors | None,
    ) -> torch.Tensor:
        """d(loss)/d(hidden) of one hop's blocks; adds the gradients w.r.t. its part of the adapter to
        `adapter_grads`."""

        async def run_on(target: Hop) -> torch.Tensor:
            grad_input, *grads_of_span = await self._call(target, BACKWARD_RPC, [hidden, grad], adapter)
            if adapter_grads is not None:
                adapter_grads.add_(
                    target.start, AdapterTensors.from_flat(adapter.spec, target.end - target.start, grads_of_span)
                )
            return grad_input

        try:
            return await run_on(hop)
        except PeerError:
            pass  # _call banned it; find another way through these blocks

        async def on_replacement() -> torch.Tensor:
            hops = await self._route(hop.start, hop.end)
            if len(hops) == 1:
                return await run_on(hops[0])
            _, inner_inputs = await self.forward(hidden, hop.start, hop.end, adapter)
            grad_input, inner_grads = await self.backward(inner_inputs, grad, adapter)
            if adapter_grads is not None:
                adapter_grads.add_(0, inner_grads)
            return grad_input

        return await retry(self.retry_policy, on_replacement, f"running backward of blocks {hop.start}:{hop.end}")

    async def _checked_forward(self, hop: Hop, hidden: torch.Tensor, adapter: AdapterTensors | None) -> torch.Tensor:
        """The hop's outputs; when the verifier draws it, another peer computes the same inputs at the same time
        (the values the hop's peer decodes), and a liar raises LieDetected."""
        check = None
        if self.verifier is not None and self.verifier.draw():
            codec = hop.codec_for(self.codec)
            seen = hidden if codec == "none" else decode_tensor(encode_tensor(hidden, codec))
            check = self.verifier.begin(hop, seen, adapter)
        try:
            (outputs,) = await self._call(hop, FORWARD_RPC, [hidden], adapter)
        except BaseException:
            if check is not None:
                check.cancel()
            raise
        if check is not None:
            await self.verifier.settle(check, outputs, hop.codec_for(self.codec))
        return outputs

    async def _route(self, start: int, end: int) -> list[Hop]:
        return await asyncio.to_thread(self.router.wire, start, end)

    async def _call(
        self, hop: Hop, rpc: str, activations: list[torch.Tensor], adapter: AdapterTensors | None
    ) -> list[torch.Tensor]:
        """Activations travel with the hop's codec; adapter tensors always exactly: they are parameters."""
        codec = hop.codec_for(self.codec)
        request = ChainRequest(
            start=hop.start,
            end=hop.end,
            codec=codec,
            adapter=None if adapter is None else adapter.spec,
            train=self.train and rpc == BACKWARD_RPC,
            train_proof=train_proof(self.train_key, hop.peer_id, self.p2p.peer_id)
            if self.train and rpc == BACKWARD_RPC
            else "",
        )
        payloads = encode(activations, codec) + adapter_payloads(adapter, hop.start, hop.end)
        try:
            reply = call(self.p2p, hop.peer_id, rpc, request, payloads, self.timeout)
            liveness = self._liveness.setdefault(hop.peer_id, Liveness(self.p2p, hop.peer_id))
            return await liveness.wait(reply, decode=False)  # a hung peer fails in about a second
        except PeerError as error:
            self.router.ban(error.peer_id, error.retry_after)
            raise
