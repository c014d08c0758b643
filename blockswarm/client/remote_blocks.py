"""The model's transformer blocks as served by the swarm, behind a synchronous, autograd-aware facade."""

from __future__ import annotations

import torch
from hivemind.dht import DHT

from blockswarm.client.event_loop import BackgroundLoop
from blockswarm.dht import make_validators
from blockswarm.models import ModelConfig
from blockswarm.pipeline.chain import backward_chain, forward_chain
from blockswarm.pipeline.inference import InferenceSession
from blockswarm.routing.router import SwarmRouter
from blockswarm.routing.swarm_view import SwarmView


class RemoteBlocks:
    def __init__(
        self,
        model_name: str,
        config: ModelConfig,
        initial_peers: list[str],
        codec: str = "none",
        step_timeout: float = 30.0,
    ):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddr of at least one peer of the swarm")
        self.model_name = model_name
        self.config = config
        self.codec = codec
        self.step_timeout = step_timeout
        validators, _ = make_validators()
        self.dht = DHT(initial_peers=initial_peers, client_mode=True, start=True, record_validators=validators)
        self.loop = BackgroundLoop()
        self.p2p = self.loop.run(self.dht.replicate_p2p())
        self.view = SwarmView(self.dht, model_name, config.num_blocks)
        self.router = SwarmRouter(self.view)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states through every block; differentiable w.r.t. `hidden`."""
        return _RemoteBlocksFunction.apply(hidden, self)

    def open_session(self, max_length: int, batch_size: int) -> InferenceSession:
        session = InferenceSession(
            self.p2p,
            self.router,
            self.config.num_blocks,
            max_length,
            batch_size,
            self.codec,
            self.step_timeout,
        )
        self.loop.run(session.open())
        return session

    def step(self, session: InferenceSession, hidden: torch.Tensor) -> torch.Tensor:
        return self.loop.run(session.step(hidden))

    def close_session(self, session: InferenceSession) -> None:
        self.loop.run(session.close())

    def shutdown(self) -> None:
        self.loop.run(self.p2p.shutdown())
        self.loop.stop()
        self.dht.shutdown()


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, remote: RemoteBlocks) -> torch.Tensor:
        outputs, hop_inputs = remote.loop.run(
            forward_chain(
                remote.p2p,
                remote.router,
                hidden.detach(),
                remote.config.num_blocks,
                remote.codec,
                remote.step_timeout,
            )
        )
        ctx.remote = remote
        ctx.hop_inputs = hop_inputs
        return outputs

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        remote: RemoteBlocks = ctx.remote
        grad_input = remote.loop.run(
            backward_chain(remote.p2p, ctx.hop_inputs, grad_output.contiguous(), remote.codec, remote.step_timeout)
        )
        return grad_input, None
