"""A stage's optimizer for SWARM training: the peers serving the same span average gradients and step together.

Each peer of a stage holds its own copy of the span's blocks and computes gradients from the micro-batches that
trainers send it. `StageOptimizer` hands those gradients to `hivemind.Optimizer`, which accumulates them until the
stage as a whole has processed `target_batch_size` samples, all-reduces them with the stage-mates and runs the same
Adam step on every copy, so the copies stay identical. A peer that falls behind, or joins late, downloads the current
parameters and optimizer state from a stage-mate.

This module uses hivemind's public API; what that cannot express is in `hivemind_internals`.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from hivemind.dht import DHT
from hivemind.utils.crypto import RSAPrivateKey

from blockswarm.peer.hivemind_internals import StageHivemindOptimizer

logger = logging.getLogger(__name__)

MAX_PENDING_MICRO_BATCHES = 64  # gradients of micro-batches received but not yet handed to hivemind
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
        signing_key: RSAPrivateKey | None = None,
    ):
        """`parameters_lock`: held by whoever computes with the parameters; the optimizer writes them under it.
        `signing_key`: the key `dht` signs records with (SwarmNode.signing_key); hivemind's process-wide key
        by default."""
        parameters = list(parameters)
        if not parameters:
            raise ValueError("a stage optimizer needs at least one parameter")
        self.options = options
        self._lock = threading.Lock()
        self._optimizer = StageHivemindOptimizer(
            parameters_lock=parameters_lock or threading.Lock(),
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
            # and publish progress signed with the key the DHT node signs with: it signs nothing else
            tracker_opts=dict(
                min_refresh_period=0.2, max_refresh_period=1.0, default_refresh_period=0.5, private_key=signing_key
            ),
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
        # bounded: a trainer faster than the stage's steps waits in `submit` (backpressure) instead of filling memory
        self._submitted: queue.Queue = queue.Queue(maxsize=MAX_PENDING_MICRO_BATCHES)
        self._worker = threading.Thread(target=self._step_submitted, name="blockswarm-stage-optimizer", daemon=True)
        self._shut_down = False
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
            self._optimizer.follow_stage_epoch()
            self._epoch = self._optimizer.local_epoch

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
            # also when the averager processes are gone (a signal to the peer's whole group kills them): the
            # progress tracker's threads would otherwise keep the peer's process from exiting
            if not self._shut_down:
                self._shut_down = True
                self._optimizer.shutdown()
