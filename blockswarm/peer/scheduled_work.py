"""What waits for the peer's compute thread (peer/scheduler.py): sessions' steps, forward/backward jobs, and each
open session's rhythm; and how a result goes back to the asyncio loop of the request that waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from blockswarm.peer.backend import BlockBackend, DecodeStep


@dataclass(eq=False)
class DecodingSession:
    """An open inference session's rhythm as this peer sees it: when its last step was answered, and how long it
    stayed away before its latest decode step (its client's own work and the other peers of its route)."""

    answered_at: float | None = None
    away: float | None = None

    def arrived(self, now: float) -> None:
        if self.answered_at is not None:
            self.away = now - self.answered_at

    def due_by(self, deadline: float, now: float) -> bool:
        """Expected back, one `away` after its last answer, by `deadline`; not if already twice as long away (it
        paused, or its client is gone)."""
        if self.away is None or self.answered_at is None:
            return False
        return self.answered_at + self.away <= deadline and now <= self.answered_at + 2 * self.away


@dataclass
class Work:
    """A piece of queued work and the asyncio future, on its caller's loop, that gets its result."""

    future: asyncio.Future
    loop: asyncio.AbstractEventLoop = field(init=False)

    def __post_init__(self) -> None:
        self.loop = self.future.get_loop()

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Hand the result to the caller's loop (from the compute thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)


@dataclass(kw_only=True)
class QueuedStep(Work):
    """A session's inference step; a prefill also records how far its chunks got."""

    backend: BlockBackend
    step: DecodeStep
    session: DecodingSession | None = None
    taken: int = 0  # tokens handed to ticks so far
    outputs: list[torch.Tensor] = field(default_factory=list)
    failed: bool = False

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.session is not None:
            self.session.answered_at = time.monotonic()
        super().settle(result, error)

    def add_output(self, output: torch.Tensor) -> None:
        """The output of the step's next piece (a prefill's chunk, or the whole step); settles once all are in."""
        self.outputs.append(output)
        if sum(piece.shape[1] for piece in self.outputs) == self.step.hidden.shape[1]:
            self.settle(torch.cat(self.outputs, dim=1) if len(self.outputs) > 1 else self.outputs[0])

    def fail(self, error: BaseException) -> None:
        self.failed = True  # later chunks of a prefill are skipped
        self.settle(error=error)


@dataclass(kw_only=True)
class QueuedJob(Work):
    """A forward or backward pass: `fn(*args)`."""

    fn: Callable
    args: tuple
    queued_at: int  # the tick count when it was queued


def step_args(step: DecodeStep) -> tuple:
    """`BlockBackend.inference_step`'s arguments for `step`."""
    return step.start, step.caches, step.hidden, step.position, step.adapter


def settle_from(work: Work, compute: Callable[[], Any]) -> None:
    """Settle `work` with what `compute()` returns or raises."""
    try:
        result = compute()
    except Exception as e:
        work.settle(error=e)
    else:
        work.settle(result)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled: its caller is gone
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
