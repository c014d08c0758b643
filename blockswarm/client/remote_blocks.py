"""The model's transformer blocks as served by the swarm, behind a synchronous, autograd-aware facade."""

from __future__ import annotations

import asyncio
import sys

import torch
from hivemind.dht import DHT
from hivemind.p2p import PeerID

from blockswarm.client.event_loop import BackgroundLoop
from blockswarm.dht import exit_with_parent, make_validators
from blockswarm.models import ModelConfig
from blockswarm.pipeline.chain import Chain
from blockswarm.pipeline.hops import Hop
from blockswarm.pipeline.inference import InferenceSession
from blockswarm.pipeline.retry import RetryPolicy
from blockswarm.routing.route import describe_route
from blockswarm.routing.router import SwarmRouter
from blockswarm.routing.swarm_view import SwarmView
from blockswarm.wire.adapters import AdapterTensors
from blockswarm.wire.messages import AdapterSpec


class RemoteBlocks:
    def __init__(
        self,
        model_name: str,
        config: ModelConfig,
        initial_peers: list[str],
        codec: str = "int8-blockwise",
        step_timeout: float = 30.0,
        retry_policy: RetryPolicy | None = None,
        allowed_peers: list[str] | None = None,
        blocked_peers: list[str] = (),
        show_route: bool = False,
        swarm_training: bool = False,
    ):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddr of at least one peer of the swarm")
        self.model_name = model_name
        self.config = config
        self.codec = codec
        self.step_timeout = step_timeout
        self.retry_policy = retry_policy or RetryPolicy()
        validators, _ = make_validators()
        self.dht = DHT(initial_peers=initial_peers, client_mode=True, start=True, record_validators=validators)
        exit_with_parent(self.dht)
        self.loop = BackgroundLoop()
        self.p2p = self.loop.run(self.dht.replicate_p2p())
        self.view = SwarmView(
            self.dht,
            model_name,
            config.num_blocks,
            allowed_peers=None if allowed_peers is None else [PeerID.from_base58(p) for p in allowed_peers],
            blocked_peers=[PeerID.from_base58(p) for p in blocked_peers],
            training=swarm_training,
        )
        self.router = SwarmRouter(self.view)
        self.chain = Chain(self.p2p, self.router, codec, step_timeout, self.retry_policy, train=swarm_training)
        self.show_route = show_route
        self._pinging = asyncio.run_coroutine_threadsafe(self._ping_forever(), self.loop.loop)

    async def _ping_forever(self) -> None:
        """Keep client-to-peer RTTs fresh for routing."""
        while True:
            await self.router.ping_peers(self.p2p)
            await asyncio.sleep(self.view.refresh_period)

    def forward(
        self, hidden: torch.Tensor, adapter_spec: AdapterSpec | None = None, adapter_tensors: list[torch.Tensor] = ()
    ) -> torch.Tensor:
        """Hidden states through every block; differentiable w.r.t. `hidden` and the adapter's tensors (wire order,
        covering every block)."""
        if self.chain.train and torch.is_grad_enabled() and not hidden.requires_grad:
            hidden = hidden.detach().requires_grad_(True)  # a trainer's backward must reach the peers' blocks
        return _RemoteBlocksFunction.apply(hidden, self, adapter_spec, *adapter_tensors)

    def open_session(self, max_length: int, batch_size: int, adapter: AdapterTensors | None = None) -> InferenceSession:
        session = InferenceSession(
            self.p2p,
            self.router,
            self.config.num_blocks,
            max_length,
            batch_size,
            self.codec,
            self.step_timeout,
            self.retry_policy,
            on_route=self._print_route if self.show_route else None,
            adapter=adapter,
        )
        self.loop.run(session.open())
        return session

    def step(self, session: InferenceSession, hidden: torch.Tensor) -> torch.Tensor:
        return self.loop.run(session.step(hidden))

    def close_session(self, session: InferenceSession) -> None:
        self.loop.run(session.close())

    def _print_route(self, hops: list[Hop]) -> None:
        print(f"blockswarm route for {self.model_name}: {describe_route(hops)}", file=sys.stderr, flush=True)

    def shutdown(self) -> None:
        self._pinging.cancel()
        self.view.close()
        self.loop.run(self.p2p.shutdown())
        self.loop.stop()
        self.dht.shutdown()


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, remote: RemoteBlocks, spec: AdapterSpec | None, *adapter_tensors: torch.Tensor
    ) -> torch.Tensor:
        adapter = None if spec is None else AdapterTensors.from_flat(spec, remote.config.num_blocks, adapter_tensors)
        outputs, hop_inputs = remote.loop.run(
            remote.chain.forward(hidden.detach(), 0, remote.config.num_blocks, adapter)
        )
        ctx.remote, ctx.hop_inputs, ctx.adapter = remote, hop_inputs, adapter
        return outputs

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        remote: RemoteBlocks = ctx.remote
        grad_input, adapter_grads = remote.loop.run(
            remote.chain.backward(ctx.hop_inputs, grad_output.contiguous(), ctx.adapter)
        )
        return grad_input, None, None, *([] if adapter_grads is None else adapter_grads.flat())
