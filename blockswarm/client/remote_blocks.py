"""The model's transformer blocks as served by the swarm, behind a synchronous, autograd-aware facade."""

from __future__ import annotations

import asyncio
import sys
import time

import torch
from hivemind.p2p import PeerID

from blockswarm.client.event_loop import BackgroundLoop
from blockswarm.client.lie_reporting import LieReporter
from blockswarm.dht import NodeRole, start_dht
from blockswarm.models import ModelConfig
from blockswarm.pipeline.chain import Chain
from blockswarm.pipeline.hops import Hop
from blockswarm.pipeline.inference import InferenceSession
from blockswarm.pipeline.retry import RetryPolicy
from blockswarm.pipeline.verification import LieReport, Verifier, check_fraction
from blockswarm.routing.route import describe_route
from blockswarm.routing.router import SwarmRouter
from blockswarm.routing.swarm_view import SwarmView
from blockswarm.wire.adapters import AdapterTensors
from blockswarm.wire.messages import AdapterSpec
from blockswarm.wire.ping import request_status


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
        train_key: str | None = None,
        verify_fraction: float = 0.05,
        push: bool = True,
    ):
        check_fraction(verify_fraction)
        if swarm_training and not train_key:
            raise ValueError(
                "swarm_training=True needs train_key: the secret the run's peers were started with (--train-key); "
                "training peers refuse backward passes without proof of it"
            )
        self.model_name = model_name
        self.config = config
        self.codec = codec
        self.step_timeout = step_timeout
        self.retry_policy = retry_policy or RetryPolicy()
        self.node = start_dht(NodeRole.CLIENT, initial_peers)
        self.dht = self.node.dht
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
        self.push = push
        self.router = SwarmRouter(self.view, push=push)
        # training peers' weights move between a step and its check, so a SWARM trainer does not spot-check
        self.lie_reporter = LieReporter(self.node, model_name)
        self.verifier = Verifier(
            self.p2p,
            self.router,
            0.0 if swarm_training else verify_fraction,
            step_timeout,
            on_report=self.lie_reporter,
        )
        self.chain = Chain(
            self.p2p,
            self.router,
            codec,
            step_timeout,
            self.retry_policy,
            train_key=train_key if swarm_training else None,
            verifier=self.verifier,
        )
        self.show_route = show_route
        self._steps_before: dict[PeerID, int] | None = None  # training peers' steps when this batch began
        self._pinging = asyncio.run_coroutine_threadsafe(self._ping_forever(), self.loop.loop)

    @property
    def lie_reports(self) -> list[LieReport]:
        """Every peer spot checks caught returning wrong outputs, oldest first (a copy; `LieReport.as_dict()`)."""
        return list(self.verifier.reports)

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
        if self.chain.train and torch.is_grad_enabled():
            if not hidden.requires_grad:
                hidden = hidden.detach().requires_grad_(True)  # a trainer's backward must reach the peers' blocks
            self.open_stage_batch()
        return _RemoteBlocksFunction.apply(hidden, self, adapter_spec, *adapter_tensors)

    def open_stage_batch(self) -> None:
        """Note the training peers' steps as a batch begins (unless one is open): `wait_for_stage_steps` waits until
        each has stepped past them. A trainer's first training forward opens one."""
        if self._steps_before is None:
            self._steps_before = self.loop.run(self._training_steps())

    def wait_for_stage_steps(self, timeout: float = 120.0) -> None:
        """Block until every training peer has stepped since this batch began (when the previous call returned, or
        at this trainer's first training forward), so that the next micro-batch meets the updated blocks.

        SWARM trainers usually never wait: stages step on their own while micro-batches keep coming, computed on
        parameters up to a step old. A trainer that wants one step per batch, as in local training, sends each
        stage's target batch size of samples and then calls this. Raises TimeoutError naming the peers that did not
        step within `timeout` seconds.
        """
        if not self.chain.train:
            raise RuntimeError("wait_for_stage_steps is for SWARM trainers: load the model with swarm_training=True")
        self.loop.run(self._wait_for_stage_steps(timeout))

    def stage_steps(self) -> dict[str, int]:
        """Optimizer steps of each reachable training peer's stage, by peer id."""
        return {peer.to_base58(): step for peer, step in self.loop.run(self._training_steps()).items()}

    async def _wait_for_stage_steps(self, timeout: float) -> None:
        before, deadline = self._steps_before or {}, time.monotonic() + timeout
        while True:
            steps = await self._training_steps()
            behind = [peer for peer, step in before.items() if steps.get(peer, step + 1) <= step]
            if not behind:
                self._steps_before = steps
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"training peers {', '.join(peer.to_base58() for peer in behind)} made no optimizer step within "
                    f"{timeout} s; a stage steps once its peers together have processed its target batch size "
                    "(run-server --target-batch-size), so send that many samples before waiting"
                )
            await asyncio.sleep(0.1)

    async def _training_steps(self) -> dict[PeerID, int]:
        """Each reachable training peer's stage step count (a peer that does not answer is left out)."""
        peers = sorted({peer for block in self.view.usable_blocks() for peer in block}, key=str)
        replies = await asyncio.gather(*(request_status(self.p2p, peer) for peer in peers), return_exceptions=True)
        return {
            peer: reply.training_step
            for peer, reply in zip(peers, replies)
            if not isinstance(reply, BaseException) and reply.training_step is not None
        }

    def missing_blocks(self) -> list[int]:
        """Blocks no usable peer serves now, as the swarm view last saw it (a quick check before opening a session:
        opening one would wait up to the failover deadline for them)."""
        return [block for block, peers in enumerate(self.view.usable_blocks()) if not peers]

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
            verifier=self.verifier,
            push=self.push,
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
        self.loop.run(self.lie_reporter.flush(timeout=5.0))
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
