"""The parts of SWARM stage training that reach into hivemind 1.1.12 (pinned) beyond its public API.

`hivemind.Optimizer` has public options for what it builds (`grad_averager_factory`, `averager_opts`, `tracker_opts`,
timeouts), and `stage_training` uses those; what they cannot express is here, written against these private names
(tests/test_hivemind_internals.py fails when one of them changes shape):

- `Optimizer._make_state_averager`: there is a factory argument for the gradient averager but none for the state
  averager, which must be `_StateAverager` (below). Its arguments copy hivemind's own `_make_state_averager`.
- `TrainingStateAverager._apply_optimizer_parameters_`: the one place that writes the served parameters; hivemind
  offers no lock around it. Recording a received state relies on `TrainingStateAverager.load_state_from_peers`
  calling `DecentralizedAverager.load_state_from_peers`, as it returns None whether it loaded a state or not.
- `Optimizer._make_progress_tracker`: `tracker_opts` tunes hivemind's ProgressTracker but cannot replace it with
  `_SampleCountingTracker`, whose `_progress_reporter` stores its record like hivemind's does: under the tracker's
  `training_progress_key` and `_local_public_key`, stopping on `shutdown_triggered`.
- `Optimizer._should_load_state_from_peers`, `_maybe_schedule_gradient_averaging`, `_maybe_schedule_state_averaging`
  and `_update_global_epoch`: `step`, their only public caller, also accumulates and reports a micro-batch, and
  `is_synchronized_with_peers` is a looser check; a stage-mate without micro-batches runs them on its own.
- `TrainingStateAverager.pending_updates`, `finished_optimizer_step` and `finished_averaging_round` (public names,
  undocumented): whether a delayed step's parameters are in place yet.
- `DecentralizedAverager._running_groups`: the all-reduce groups a peer has begun; `_WaitsForLateGroupmates` waits
  for a group to appear there before hivemind's `rpc_aggregate_part` looks it up.

`_DiesWithPeer` overrides only the public `Process.run`, but the state averager that needs it is built here.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import threading
import time
from typing import AsyncIterator  # noqa: UP035 - hivemind recognises streaming handlers by typing's alias

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.optim import Optimizer
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import achain, as_aiter

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_GROUP_POLL_PERIOD = 0.05  # seconds between looks for a group that a groupmate already averages in
# the averaging weight of a peer that joins a gradient round without samples: its gradients are zeros, so its weight
# only matters where it ends up averaging alone (a groupmate failed): hivemind divides by the weights' sum, 0/0 there
_NO_SAMPLES_WEIGHT = 1e-6


class _ReceivedStateRecorder(DecentralizedAverager):
    """Remembers the epoch of the last state downloaded from a peer.

    hivemind's TrainingStateAverager.load_state_from_peers returns None whether it loaded a state or not; placed
    between it and DecentralizedAverager in the MRO, this class sees what the download returned.
    """

    received_epoch: int | None = None

    def load_state_from_peers(self, **kwargs):
        loaded = super().load_state_from_peers(**kwargs)
        if loaded is not None and isinstance(loaded[0].get("epoch"), int):
            self.received_epoch = loaded[0]["epoch"]
        return loaded


class _DiesWithPeer(DecentralizedAverager):
    """hivemind runs each averager in a forked process; a peer killed with SIGKILL would leave them running,
    holding its stage's DHT keys. The kernel kills them (PR_SET_PDEATHSIG) when the peer's process dies."""

    def run(self):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the peer died before the request took effect
            os._exit(0)
        super().run()


class _WaitsForLateGroupmates(DecentralizedAverager):
    """Accepts a groupmate's parts for a group this peer has matched but not begun averaging in yet.

    A stage-mate begins its all-reduce as soon as it sees the stage's batch complete; this peer may see it a moment
    later, and only then registers the group. hivemind then answers BAD_GROUP_ID (it waits for *a* group to be
    registered, and that wait is already over when the peer's previous round ended after this one was booked),
    the groupmates average different halves and their parameters drift apart. Here the request waits for the group
    itself, up to the averager's `next_chunk_timeout`.
    """

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:  # hivemind registers the handler by these types
        request = await anext(stream)
        deadline = time.monotonic() + (self.next_chunk_timeout or self.request_timeout)
        while request.group_id not in self._running_groups and time.monotonic() < deadline:
            await asyncio.sleep(_GROUP_POLL_PERIOD)
        async for reply in super().rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield reply


class _GradientAverager(GradientAverager, _WaitsForLateGroupmates, _DiesWithPeer):
    """hivemind's GradientAverager, tied to the peer's process, waiting for late groupmates, and averaging with a
    tiny weight instead of 0 when this peer has no samples."""

    def step(self, weight: float | None = None, **kwargs):
        if weight is None and self.local_samples_accumulated == 0:
            weight = _NO_SAMPLES_WEIGHT
        return super().step(weight=weight, **kwargs)


class _StateAverager(TrainingStateAverager, _ReceivedStateRecorder, _WaitsForLateGroupmates, _DiesWithPeer):
    """TrainingStateAverager that records whether load_state_from_peers received a state, and writes the served
    parameters only under `parameters_lock`.

    With the optimizer offloaded (hivemind's default when given parameters), every write to the model's parameters
    (optimizer steps, averaged state, downloaded state) goes through `_apply_optimizer_parameters_`: holding the
    peer's parameter lock there keeps them from changing under a forward or backward pass, while matchmaking and
    all-reduce still run unlocked.

    hivemind creates the optimizer's state with a step on zero gradients, which Adam counts: every real step then
    used the bias correction of the step after it (the first update was 0.74 of Adam's). The count starts at 0 here.
    """

    def __init__(self, *, parameters_lock: threading.Lock, **kwargs):
        self.parameters_lock = parameters_lock
        super().__init__(**kwargs)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0

    def _apply_optimizer_parameters_(self):
        with self.parameters_lock:
            super()._apply_optimizer_parameters_()


class _SampleCountingTracker(ProgressTracker):
    """hivemind's progress tracker, with two changes for stages whose peers get micro-batches unevenly.

    hivemind ends an epoch when the stage has `target_batch_size` samples *or* when a time it extrapolates from
    the stage's recent speed has passed. A trainer that waits for each step before its next batch makes that speed
    meaningless, and steps would then come with part of a batch. Here an epoch ends on samples alone; samples that a
    dead peer reported still count until its record expires.

    hivemind's reporter also stays silent until a peer has samples: a stage-mate that got no micro-batch is invisible,
    and a peer that sees no mate steps alone and skips the averaging. Here every peer publishes its progress.
    """

    @property
    def ready_to_update_epoch(self) -> bool:
        return (
            self.global_epoch > self.local_progress.epoch
            or self.global_progress.samples_accumulated >= self.target_batch_size
        )

    async def _progress_reporter(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.shutdown_triggered.is_set():  # `shutdown` removes the record
            self.should_report_progress.clear()
            stored_at = get_dht_time()
            try:
                await asyncio.wait_for(
                    self.dht.store(
                        key=self.training_progress_key,
                        subkey=self._local_public_key,
                        value=self.local_progress.dict(),
                        expiration_time=stored_at + self.metadata_expiration,
                        return_future=True,
                    ),
                    timeout=self.metadata_expiration,
                )
            except (TimeoutError, OSError) as error:  # the next report tries again
                logger.debug("could not publish the stage progress: %s", error)
            await loop.run_in_executor(None, self.should_report_progress.wait, self.metadata_expiration / 2)


class StageHivemindOptimizer(Optimizer):
    """hivemind.Optimizer with averagers that die with the peer, a `_StateAverager` and a `_SampleCountingTracker`;
    the arguments mirror hivemind 1.1.12's `_make_state_averager` and `_make_progress_tracker`."""

    def __init__(self, *, parameters_lock: threading.Lock, **kwargs):
        """`kwargs`: hivemind.Optimizer's, except `grad_averager_factory`."""
        self._parameters_lock = parameters_lock
        super().__init__(grad_averager_factory=_GradientAverager, **kwargs)

    def follow_stage_epoch(self) -> None:
        """What hivemind's `step` runs besides accumulating a micro-batch: apply a finished background step, load the
        stage's state if this peer fell behind, book the next averaging rounds, and take part in the step once the
        stage has its batch."""
        self.state_averager.step(apply_delayed_updates=True)
        if self._should_load_state_from_peers():
            self.load_state_from_peers()
            return
        self._maybe_schedule_gradient_averaging()
        self._maybe_schedule_state_averaging()
        if self.tracker.ready_to_update_epoch:
            self._update_global_epoch(grad_scaler=None)

    @property
    def applied_epoch(self) -> int:
        """Steps whose parameters are in the served tensors: hivemind counts a delayed step as soon as it begins."""
        averager = self.state_averager
        in_progress = any(not update.done() for update in averager.pending_updates)
        unapplied = averager.finished_optimizer_step.is_set() or averager.finished_averaging_round.is_set()
        return self.local_epoch - (in_progress or unapplied)

    def finish_pending_step(self) -> None:
        """Wait for a background step (bounded by the averaging timeout) and put its parameters in place."""
        self.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        return _StateAverager(
            parameters_lock=self._parameters_lock,
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return _SampleCountingTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            **kwargs,
        )
