"""A stage's optimizer for SWARM training: the peers serving the same span average gradients and step together.

Each peer of a stage holds its own copy of the span's blocks and computes gradients from the micro-batches that
trainers send it. `StageOptimizer` hands those gradients to `hivemind.Optimizer`, which accumulates them until the
stage as a whole has processed `target_batch_size` samples, all-reduces them with the stage-mates and runs the same
Adam step on every copy, so the copies stay identical. A peer that falls behind, or joins late, downloads the current
parameters and optimizer state from a stage-mate.
"""

from __future__ import annotations

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
from hivemind.optim.state_averager import TrainingStateAverager

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

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
    `parameters_lock`. Calls are serialized by a lock of their own, but `param.grad` is shared: a caller of `step`
    that fills it must not run the backward pass of one micro-batch while `step` is handling another.

    A peer uses `submit`: its reply to the trainer must not wait for an averaging round, because the stage-mate
    only joins the round once it gets a micro-batch of its own, which a trainer waiting for that reply never sends.

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
            load_state_timeout=options.load_state_timeout,
            # hivemind warns that matchmaking can deadlock unless requests time out sooner than matchmaking ends
            averager_opts=dict(request_timeout=min(3.0, options.matchmaking_time / 2)),
            # look for stage-mates' progress often: hivemind's default (every 3-10 s) leaves a peer blind to a mate
            # for several of our steps, and a peer that sees no mate steps alone
            tracker_opts=dict(min_refresh_period=0.2, max_refresh_period=1.0, default_refresh_period=0.5),
            # average parameters with the stage-mates right after each step, not in the background: a delayed
            # average is applied a step late and keeps the copies apart
            delay_state_averaging=False,
            # and Adam's moments with them: copies that once stepped apart (a missed round) would otherwise keep
            # taking different steps from the same averaged gradients
            average_opt_statistics=("exp_avg", "exp_avg_sq"),
            verbose=False,
        )
        self._parameters = parameters
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
            # hivemind refuses (silently) a state from a stage-mate that is behind us
            return averager.received_epoch is not None and averager.received_epoch >= epoch_before

    def submit(self, grads: list[torch.Tensor], batch_size: int) -> None:
        """Queue one micro-batch's gradients (one per parameter, in order) for `step` on a background thread."""
        if len(grads) != len(self._parameters):
            raise ValueError(f"expected {len(self._parameters)} gradients, got {len(grads)}")
        self._submitted.put((grads, batch_size))

    def _step_submitted(self) -> None:
        while (item := self._submitted.get()) is not None:
            grads, batch_size = item
            try:
                epoch = self.epoch
                self.step(batch_size, grads)
                if self.epoch != epoch and self.on_step is not None:
                    self.on_step(self.epoch)
            except Exception:
                logger.exception("the stage optimizer failed on a micro-batch; its gradients are lost")

    def step(self, batch_size: int, grads: list[torch.Tensor] | None = None) -> None:
        """Hand over the gradients of one micro-batch of `batch_size` samples (`grads`, or else those in
        `param.grad`), then zero them.

        hivemind accumulates them; once the stage has `target_batch_size` samples in all, this call averages
        gradients with the stage-mates (blocking for up to about matchmaking_time + averaging_timeout) and steps.
        The gradients are dropped when this peer turns out to be behind the stage: it loads the stage's state instead.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        with self._lock:
            try:
                if grads is not None:
                    for parameter, grad in zip(self._parameters, grads):
                        parameter.grad = grad
                self._optimizer.step(batch_size=batch_size)
            finally:
                # hivemind copies param.grad into its own accumulators and leaves it as is
                self._optimizer.zero_grad(set_to_none=True)

    @property
    def epoch(self) -> int:
        """How many optimizer steps the stage has made (as far as this peer knows)."""
        return self._optimizer.local_epoch

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
    """

    def __init__(self, *, parameters_lock: threading.Lock, **kwargs):
        self.parameters_lock = parameters_lock
        super().__init__(**kwargs)

    def _apply_optimizer_parameters_(self):
        with self.parameters_lock:
            super()._apply_optimizer_parameters_()


class _HivemindOptimizer(Optimizer):
    """hivemind.Optimizer with a `_StateAverager`; the arguments mirror hivemind 1.1.12's `_make_state_averager`."""

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
