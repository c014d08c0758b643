"""A stage's optimizer for SWARM training: the peers serving the same span average gradients and step together.

Each peer of a stage holds its own copy of the span's blocks and computes gradients from the micro-batches that
trainers send it. `StageOptimizer` hands those gradients to `hivemind.Optimizer`, which accumulates them until the
stage as a whole has processed `target_batch_size` samples, all-reduces them with the stage-mates and runs the same
Adam step on every copy, so the copies stay identical. A peer that falls behind, or joins late, downloads the current
parameters and optimizer state from a stage-mate.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import queue
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.dht import DHT
from hivemind.optim import Optimizer
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_IDLE_CHECK_PERIOD = 0.2  # seconds between checks, while no micro-batch comes, whether the stage is stepping

# hivemind forbids "." in averager prefixes and puts the run id into DHT keys and p2p handler names
_UNSAFE_RUN_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class StageTrainingOptions:
    """Training settings; all peers of a stage must use the same learning rate and target batch size."""

    learning_rate: float = 1e-3
    target_batch_size: int = 32  # samples per stage-wide optimizer step (summed over the stage's peers)
    matchmaking_time: float = 3.0  # how long a peer waits for stage-mates to join an averaging round
    averaging_timeout: float = 30.0  # an averaging round that takes longer is abandoned (local gradients are used)
    load_state_timeout: float = 60.0  # per download of the stage's state from a stage-mate

    def __post_init__(self):
        for name in ("learning_rate", "target_batch_size", "matchmaking_time", "averaging_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.load_state_timeout > 0:
            raise ValueError(f"load_state_timeout must be positive, got {self.load_state_timeout}")


def stage_run_id(model_name: str, start: int, end: int) -> str:
    """hivemind's run id for the stage serving blocks [start, end) of `model_name`: one run per model and span.

    Characters other than letters, digits, "_" and "-" become "_"; a short hash of the exact name is then appended
    so that two model names differing only in such characters ("org/m.1" and "org_m_1") still get different runs.
    """
    if not model_name:
        raise ValueError("model name must not be empty")
    if not 0 <= start < end:
        raise ValueError(f"block range [{start}, {end}) is empty or negative")
    safe = _UNSAFE_RUN_ID_CHARS.sub("_", model_name)
    if safe != model_name:
        safe += "_" + hashlib.sha256(model_name.encode()).hexdigest()[:8]
    return f"{safe}_stage_{start}-{end}"


class StageOptimizer:
    """Adam over a stage's parameters, with gradients averaged across the stage through `hivemind.Optimizer`.

    Parameters are updated in place, so the blocks that serve requests keep using the same tensors, under
    `parameters_lock`. Calls are serialized by a lock of their own.

    A peer uses `submit`: its reply to the trainer must not wait for an averaging round, which the trainer's later
    micro-batches may be needed to complete. While no micro-batch comes, the worker thread follows the stage: it
    joins a step that its stage-mates' samples complete (with its own gradients, or none), and loads the stage's
    state when it fell behind, so the copies step together whichever peers the trainers picked.

    hivemind publishes each peer's progress in DHT records signed with its process-wide RSA key: the DHT's
    RSASignatureValidator must use that key too (`make_validators()` without an identity does), or the records are
    rejected and every peer trains alone.
    """

    def __init__(
        self,
        dht: DHT,
        run_id: str,
        parameters: list[torch.nn.Parameter],
        options: StageTrainingOptions = StageTrainingOptions(),
        parameters_lock: threading.Lock | None = None,
    ):
        """`parameters_lock`: held by whoever computes with the parameters; the optimizer writes them under it."""
        parameters = list(parameters)
        if not parameters:
            raise ValueError("a stage optimizer needs at least one parameter")
        self.options = options
        self._lock = threading.Lock()
        self._optimizer = _HivemindOptimizer(
            parameters_lock=parameters_lock or threading.Lock(),
            grad_averager_factory=_GradientAverager,
            dht=dht,
            run_id=run_id,
            target_batch_size=options.target_batch_size,
            batch_size_per_step=None,  # each micro-batch says its own size
            optimizer=partial(torch.optim.Adam, lr=options.learning_rate),
            params=parameters,
            matchmaking_time=options.matchmaking_time,
            averaging_timeout=options.averaging_timeout,
            # hivemind drops a stage-mate from an all-reduce when its next chunk is late by this much (by default the
            # matchmaking time): the two copies then average different parts and drift apart. On busy CPUs chunks
            # are late often, so only a peer that is most likely gone is dropped.
            next_chunk_timeout=options.averaging_timeout / 2,
            load_state_timeout=options.load_state_timeout,
            # hivemind warns that matchmaking can deadlock unless requests time out sooner than matchmaking ends
            averager_opts=dict(request_timeout=min(3.0, options.matchmaking_time / 2)),
            # look for stage-mates' progress often: hivemind's default (every 3-10 s) leaves a peer blind to a mate
            # for several of our steps, and a peer that sees no mate steps alone
            tracker_opts=dict(min_refresh_period=0.2, max_refresh_period=1.0, default_refresh_period=0.5),
            # average parameters with the stage-mates right after each step, not in the background: a delayed
            # average is applied a step late and keeps the copies apart
            delay_state_averaging=False,
            # but not Adam's moments: hivemind averages the moment tensors it found at start, and a peer that loads
            # the stage's state gets new ones, so its mates would average with stale zeros (halving their moments).
            # Copies that take every step on the same averaged gradients keep equal moments anyway, and a peer that
            # missed a step loads the whole state, moments included.
            verbose=False,
        )
        self._parameters = parameters
        self._epoch = 0  # hivemind counts a step before its averaged parameters are written; this counts after
        self.on_step: Callable[[int], None] | None = None  # called with the new epoch after each `submit`ted step
        self._submitted: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._step_submitted, name="blockswarm-stage-optimizer", daemon=True)
        self._worker.start()

    def load_state_from_peers(self) -> bool:
        """Download parameters, optimizer state and epoch from a stage-mate; False when there is none to ask.

        For a peer joining a stage late, before it serves. A peer that falls behind later catches up by itself:
        its next `step` notices that the stage moved on and loads the state instead of using its gradients.
        """
        with self._lock:
            averager = self._optimizer.state_averager
            averager.received_epoch = None
            epoch_before = self.epoch
            self._optimizer.load_state_from_peers()
            self._epoch = self._optimizer.local_epoch
            # hivemind refuses (silently) a state from a stage-mate that is behind us
            return averager.received_epoch is not None and averager.received_epoch >= epoch_before

    def submit(self, grads: list[torch.Tensor], batch_size: int) -> None:
        """Queue one micro-batch's gradients (one per parameter, in order) for `step` on a background thread."""
        if len(grads) != len(self._parameters):
            raise ValueError(f"expected {len(self._parameters)} gradients, got {len(grads)}")
        self._submitted.put((grads, batch_size))

    def _step_submitted(self) -> None:
        while True:
            try:
                item = self._submitted.get(timeout=_IDLE_CHECK_PERIOD)
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                epoch = self.epoch
                if item:
                    grads, batch_size = item
                    self.step(batch_size, grads)
                else:
                    self.follow_stage()
                if self.epoch != epoch and self.on_step is not None:
                    self.on_step(self.epoch)
            except Exception:
                logger.exception("the stage optimizer failed; gradients accumulated for this step may be lost")

    def follow_stage(self) -> None:
        """Without new gradients: take part in the stage's step once its stage-mates' samples complete the batch
        (contributing what this peer accumulated, possibly nothing), or load the stage's state if this peer fell
        behind. hivemind does both only inside `step`, which a peer that gets no micro-batch never calls."""
        with self._lock:
            optimizer = self._optimizer
            # private to hivemind 1.1.12 (pinned): the two checks and the epoch update that its `step` runs
            if optimizer._should_load_state_from_peers():
                optimizer.load_state_from_peers()
            elif optimizer.tracker.ready_to_update_epoch:
                optimizer._update_global_epoch(grad_scaler=None)
            self._epoch = optimizer.local_epoch

    def step(self, batch_size: int, grads: list[torch.Tensor]) -> None:
        """Hand over the gradients of one micro-batch of `batch_size` samples (one per parameter, in order).

        hivemind accumulates them; once the stage has `target_batch_size` samples in all, this call averages
        gradients with the stage-mates (blocking for up to about matchmaking_time + averaging_timeout) and steps.
        The gradients are dropped when this peer turns out to be behind the stage: it loads the stage's state instead.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        with self._lock:
            try:
                for parameter, grad in zip(self._parameters, grads):
                    parameter.grad = grad
                self._optimizer.step(batch_size=batch_size)
            finally:
                # hivemind copies param.grad into its own accumulators and leaves it as is
                self._optimizer.zero_grad(set_to_none=True)
                self._epoch = self._optimizer.local_epoch

    @property
    def epoch(self) -> int:
        """How many optimizer steps the stage has made (as far as this peer knows), with their parameters in place."""
        return self._epoch

    def shutdown(self) -> None:
        """Finish the submitted micro-batches, say goodbye to stage-mates, stop the averager processes (idempotent)."""
        if self._worker.is_alive():
            self._submitted.put(None)
            self._worker.join()
        with self._lock:
            if self._optimizer.is_alive():
                self._optimizer.shutdown()


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


class _GradientAverager(GradientAverager, _DiesWithPeer):
    """hivemind's GradientAverager, tied to the peer's process."""


class _StateAverager(TrainingStateAverager, _ReceivedStateRecorder, _DiesWithPeer):
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


class _HivemindOptimizer(Optimizer):
    """hivemind.Optimizer with a `_StateAverager` and a `_SampleCountingTracker`; the arguments mirror hivemind
    1.1.12's `_make_state_averager` and `_make_progress_tracker`."""

    def __init__(self, *, parameters_lock: threading.Lock, **kwargs):
        self._parameters_lock = parameters_lock
        super().__init__(**kwargs)

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

    def _maybe_schedule_gradient_averaging(self) -> None:
        """Books no round ahead. hivemind books one at a time it extrapolates from the sample rate, while a
        stage-mate that follows the stage without micro-batches (`StageOptimizer.follow_stage`) starts looking when
        the batch is complete: the two would wait in different rounds until the averaging timeout. Every peer starts
        matchmaking when it steps instead."""

    def _maybe_schedule_state_averaging(self) -> None:
        """Books no round ahead, for the reason given in `_maybe_schedule_gradient_averaging`."""

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        # hivemind keeps the previous step's (spent) round in `scheduled_grads` until it books the next one; with no
        # booking, it would take that spent round as "used elsewhere" and skip averaging on every other step
        self.scheduled_grads = None
        return super()._begin_averaging_gradients(grad_scaler)
