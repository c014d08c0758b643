"""A stage's optimizer for SWARM training: the peers serving the same span average gradients and step together.

Each peer of a stage holds its own copy of the span's blocks and computes gradients from the micro-batches that
trainers send it. `StageOptimizer` accumulates them in place, in hivemind's gradient buffers, and counts samples;
once the stage as a whole has processed `target_batch_size` samples, `hivemind.Optimizer` all-reduces the stage's
gradients and runs the same Adam step on every copy, so the copies stay identical.

Nothing of that stalls the pipeline: the averaging round is booked ahead (pre-scheduled matchmaking, from the
stage's sample rate), and the all-reduce and the optimizer step run in the background while the peer keeps serving
forward and backward passes on the parameters it has (hivemind's delayed parameter updates). The staleness is
bounded by the averaging: a step's parameters are in place once its all-reduce (at most `averaging_timeout`) and
Adam step finish, normally long before the stage's next batch is full, so micro-batches meet parameters one step
old. Every `average_state_every` steps the parameters are averaged too, a safety net for a copy that missed a
round; such a step first waits for the previous one to be in place (hivemind does), the one point where a peer's
passes may wait for averaging. A peer that falls behind, or joins late, downloads the current parameters and
optimizer state from a stage-mate; a peer whose mates are gone steps alone.

This module uses hivemind's public API; what that cannot express is in `hivemind_internals`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from hivemind.dht import DHT
from hivemind.utils.crypto import RSAPrivateKey

from blockswarm.peer.hivemind_internals import StageHivemindOptimizer

logger = logging.getLogger(__name__)

_IDLE_CHECK_PERIOD = 0.2  # seconds without micro-batches after which the peer follows the stage on its own

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
    average_state_every: int = 5  # stage steps between averaging rounds of parameters and Adam's state

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")


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

    `accumulate` is called with each micro-batch's gradients from the thread that computes passes (the peer's
    compute thread); it adds them to the parameters' `.grad` in place and returns at once, also when the micro-batch
    completes the stage's batch: the averaging round and the optimizer step then run in the background. The new
    parameters are written into the served tensors under `parameters_lock`, between passes.

    While no micro-batch comes, a thread of its own follows the stage: it joins a step that its stage-mates'
    samples complete (with the gradients it has, possibly none), applies a finished step, and loads the stage's
    state when this peer fell behind, so the copies step together whichever peers the trainers picked.

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
            # the parameters' .grad are the accumulators: no copy of a micro-batch's gradients is kept
            reuse_grad_buffers=True,
            # average, step and average the state in the background, booking averaging rounds ahead
            delay_grad_averaging=True,
            delay_optimizer_step=True,
            delay_state_averaging=True,
            average_state_every=options.average_state_every,
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
            # Adam's moments are not averaged with the parameters: hivemind averages the moment tensors it found at
            # start, and a peer that loads the stage's state gets new ones, so its mates would average with stale
            # zeros (halving their moments). Copies that take every step on the same averaged gradients keep equal
            # moments anyway, and a peer that missed a step loads the whole state, moments included.
            verbose=False,
        )
        self._parameters = parameters
        self._epoch = 0  # steps whose parameters are in place (hivemind counts a step as soon as it begins)
        self._last_micro_batch = 0.0
        self.on_step: Callable[[int], None] | None = None  # called with the new epoch after each step is in place
        self._samples_here: dict[int, int] = {}  # this peer's samples in each begun step, by the epoch it makes
        self._stopping, self._shut_down = threading.Event(), False
        self._follower = threading.Thread(target=self._follow_while_idle, name="blockswarm-stage", daemon=True)
        self._follower.start()

    def load_state_from_peers(self) -> bool:
        """Download parameters, optimizer state and epoch from a stage-mate; False when there is none to ask.

        For a peer joining a stage late, before it serves. A peer that falls behind later catches up by itself:
        its next `accumulate` notices that the stage moved on and loads the state instead of using its gradients.
        """
        with self._lock:
            averager = self._optimizer.state_averager
            averager.received_epoch = None
            epoch_before = self.epoch
            self._optimizer.load_state_from_peers()
            self._note_epoch()
            # hivemind refuses (silently) a state from a stage-mate that is behind us
            return averager.received_epoch is not None and averager.received_epoch >= epoch_before

    def accumulate(self, grads: list[torch.Tensor], batch_size: int) -> None:
        """Add one micro-batch's gradients (one per parameter, in order) of `batch_size` samples to this step's.

        The step's gradient is the mean over its samples (each micro-batch's gradient weighted by its size). The
        gradients are dropped when this peer turns out to be behind the stage: it loads the stage's state instead.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(grads) != len(self._parameters):
            raise ValueError(f"expected {len(self._parameters)} gradients, got {len(grads)}")
        with self._lock, torch.no_grad():
            # hivemind hands the sum of the `.grad` buffers over the number of micro-batches (`times`) to the
            # all-reduce, weighted by samples: keeping `.grad` = times x (the sample-weighted mean so far) makes
            # that the mean over samples, whatever the micro-batches' sizes
            averager = self._optimizer.grad_averager
            times, samples = averager.local_times_accumulated, averager.local_samples_accumulated
            keep = (times + 1) * samples / (times * (samples + batch_size)) if times else 0.0
            add = batch_size * (times + 1) / (samples + batch_size)
            for parameter, grad in zip(self._parameters, grads):
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                parameter.grad.mul_(keep).add_(grad.to(parameter.grad.dtype), alpha=add)
            self._begin_step_if_due(partial(self._optimizer.step, batch_size=batch_size), batch_size)
            self._last_micro_batch = time.monotonic()

    def _follow_while_idle(self) -> None:
        while not self._stopping.wait(_IDLE_CHECK_PERIOD):
            if time.monotonic() - self._last_micro_batch < _IDLE_CHECK_PERIOD:
                continue
            try:
                self.follow_stage()
            except Exception:
                logger.exception("following the stage failed; the next micro-batch or check tries again")

    def follow_stage(self) -> None:
        """Without new gradients: put a finished step's parameters in place, take part in the stage's step once its
        stage-mates' samples complete the batch (contributing what this peer accumulated, possibly nothing), or load
        the stage's state if this peer fell behind. hivemind does these only inside `step`, which a peer that gets no
        micro-batch never calls."""
        with self._lock:
            self._begin_step_if_due(self._optimizer.follow_stage_epoch, 0)

    def _begin_step_if_due(self, call: Callable[[], object], batch_size: int) -> None:
        """`call` (hivemind's step or follow), noting the samples of a step it begins and any step it completes."""
        own = self._optimizer.grad_averager.local_samples_accumulated + batch_size
        began = self._optimizer.local_epoch
        call()
        if self._optimizer.local_epoch != began:
            self._samples_here[self._optimizer.local_epoch] = own
        self._note_epoch()

    def samples_here(self, epoch: int) -> int:
        """This peer's samples in the step that made `epoch` (0 for a step it did not take part in, e.g. one whose
        state it downloaded); asked once per step, when `on_step` reports it."""
        return self._samples_here.pop(epoch, 0)

    def _note_epoch(self) -> None:
        epoch = self._optimizer.applied_epoch
        if epoch != self._epoch:
            self._epoch = epoch
            if self.on_step is not None:
                self.on_step(epoch)

    @property
    def epoch(self) -> int:
        """How many optimizer steps the stage has made (as far as this peer knows), with their parameters in place."""
        return self._epoch

    def shutdown(self) -> None:
        """Finish and apply a step in progress, say goodbye to stage-mates, stop the averager processes
        (idempotent)."""
        self._stopping.set()
        if self._follower.is_alive():
            self._follower.join()
        with self._lock:
            # also when the averager processes are gone (a signal to the peer's whole group kills them): the
            # progress tracker's threads would otherwise keep the peer's process from exiting
            if not self._shut_down:
                self._shut_down = True
                if self._optimizer.state_averager.is_alive():
                    self._optimizer.finish_pending_step()
                    self._note_epoch()
                self._optimizer.shutdown()
