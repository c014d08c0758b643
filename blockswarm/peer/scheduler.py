"""One scheduler per peer: the one thread that runs the blocks' math, and the one place that decides what runs next.

The event loop only moves bytes and answers `info`; every decode step, prefill, forward and backward pass waits
here. Each tick takes every pending decode step (one token per session) and computes them together
(`BlockBackend.inference_steps`), then prefills up to `prefill_tokens_per_tick` tokens (a long prompt in chunks,
one tick after another), then one forward/backward job: decoding sessions get a token every tick while long
prompts and training passes arrive. A job waits while there are decode steps or prefills, but only for
`MAX_JOB_WAIT_TICKS` ticks, so nothing starves. The queue is bounded: over a cap, `admit` answers busy at once,
and the caller goes to another peer instead of waiting behind everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from blockswarm.peer.backend import BlockBackend, DecodeStep
from blockswarm.peer.limits import CallerCounts, PeerBusy, RequestError, ServingLimits

MAX_JOB_WAIT_TICKS = 4  # ticks a forward/backward job may be passed over for decode steps and prefills


@dataclass
class _Work:
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
class _Step(_Work):
    """A session's inference step; a prefill also records how far its chunks got."""

    backend: BlockBackend
    step: DecodeStep
    taken: int = 0  # tokens handed to ticks so far
    outputs: list[torch.Tensor] = field(default_factory=list)
    failed: bool = False


@dataclass(kw_only=True)
class _Job(_Work):
    fn: Callable
    args: tuple
    queued_at: int  # the tick count when it was queued


class Scheduler:
    def __init__(self, limits: ServingLimits):
        self.limits = limits
        self.ticks = 0
        self._admitted = CallerCounts()  # requests waiting for compute or computing
        self._decodes: list[_Step] = []
        self._prefills: deque[_Step] = deque()
        self._jobs: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def admit(self, remote: object) -> Iterator[None]:
        """Count a request of `remote` from when it waits for compute until it is done; PeerBusy at once when the
        queue is full (one thread computes: a longer queue only makes every caller wait)."""
        limits = self.limits
        if self._admitted.of(remote) >= limits.max_compute_queue_per_peer:
            raise PeerBusy(
                f"{self._admitted.of(remote)} requests from your peer id wait for compute here, the limit is "
                f"{limits.max_compute_queue_per_peer}",
                limits.busy_retry_after,
            )
        if self._admitted.total >= limits.max_compute_queue:
            raise PeerBusy(
                f"{self._admitted.total} requests wait for compute here, the limit is {limits.max_compute_queue}",
                limits.busy_retry_after,
            )
        with self._admitted.holding(remote):
            yield

    @property
    def active_requests(self) -> int:
        """Requests admitted: waiting for compute or computing."""
        return self._admitted.total

    async def submit_step(self, backend: BlockBackend, step: DecodeStep) -> torch.Tensor:
        """A session's step: one token (per row) is a decode step, batched with the tick's others; longer is a
        prefill, computed in chunks of the tick's token budget at increasing positions."""
        work = _Step(asyncio.get_running_loop().create_future(), backend=backend, step=step)
        self._queue(lambda: (self._decodes if step.hidden.shape[1] == 1 else self._prefills).append(work))
        return await work.future

    async def submit_job(self, fn: Callable, *args: Any) -> Any:
        """A forward or backward pass: `fn(*args)` on the compute thread, one per tick."""
        work = _Job(asyncio.get_running_loop().create_future(), fn=fn, args=args, queued_at=self.ticks)
        self._queue(lambda: self._jobs.append(work))
        return await work.future

    def _queue(self, append: Callable[[], None]) -> None:
        with self._ready:
            if self._stopped:
                raise RequestError("peer stopped: continue with another peer")
            append()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="blockswarm-compute", daemon=True)
                self._thread.start()
            self._ready.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail what waits, let the running tick finish (up to `timeout` seconds)."""
        with self._ready:
            self._stopped = True
            waiting = [*self._decodes, *self._prefills, *self._jobs]
            self._decodes, self._prefills, self._jobs = [], deque(), deque()
            self._ready.notify()
        for work in waiting:
            work.settle(error=RequestError("peer stopped: continue with another peer"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _work(self) -> None:
        while (tick := self._next_tick()) is not None:
            decodes, chunks, job = tick
            self._run_decodes(decodes)
            for work, chunk in chunks:
                self._run_chunk(work, chunk)
            if job is not None:
                _run(job, functools.partial(job.fn, *job.args))

    def _next_tick(self) -> tuple[list[_Step], list[tuple[_Step, DecodeStep]], _Job | None] | None:
        """What the next tick computes: every decode step, prefill chunks within the budget, maybe one job."""
        with self._ready:
            while not (self._stopped or self._decodes or self._prefills or self._jobs):
                self._ready.wait()
            if self._stopped:
                return None
            decodes, self._decodes = [w for w in self._decodes if not w.future.done()], []
            chunks = self._take_chunks()
            job = None
            if self._jobs and (not (decodes or chunks) or self.ticks - self._jobs[0].queued_at >= MAX_JOB_WAIT_TICKS):
                job = self._jobs.popleft()
            self.ticks += 1
            return decodes, chunks, job

    def _take_chunks(self) -> list[tuple[_Step, DecodeStep]]:
        """Prefill chunks of at most `prefill_tokens_per_tick` tokens (batch x length) in all, oldest first; a
        prefill not taken whole stays first in line. At least one token of the oldest, whatever its batch."""
        budget, chunks = self.limits.prefill_tokens_per_tick, []
        while self._prefills:
            work = self._prefills[0]
            if work.future.done():  # its caller is gone
                self._prefills.popleft()
                continue
            batch, length = work.step.hidden.shape[:2]
            size = min(length - work.taken, budget // batch if chunks else max(1, budget // batch))
            if size < 1:
                break
            hidden = work.step.hidden[:, work.taken : work.taken + size]
            chunks.append((work, replace(work.step, hidden=hidden, position=work.step.position + work.taken)))
            work.taken += size
            budget -= batch * size
            if work.taken == length:
                self._prefills.popleft()
        return chunks

    def _run_decodes(self, decodes: list[_Step]) -> None:
        """Each backend's decode steps together; when the batch fails, each alone, so an error stays its own."""
        for backend in {id(w.backend): w.backend for w in decodes}.values():
            mine = [w for w in decodes if w.backend is backend]
            if len(mine) == 1:  # nothing to batch with
                _run(mine[0], functools.partial(backend.inference_step, *_step_args(mine[0].step)))
                continue
            try:
                outputs = backend.inference_steps([w.step for w in mine])
            except Exception:
                for work in mine:
                    _run(work, lambda work=work: work.backend.inference_step(*_step_args(work.step)))
                continue
            for work, output in zip(mine, outputs):
                work.settle(output)

    def _run_chunk(self, work: _Step, chunk: DecodeStep) -> None:
        if work.failed or work.future.done():  # failed on an earlier chunk, or its caller is gone
            return
        try:
            work.outputs.append(work.backend.inference_step(*_step_args(chunk)))
        except Exception as e:
            work.failed = True
            work.settle(error=e)
            return
        if sum(output.shape[1] for output in work.outputs) == work.step.hidden.shape[1]:
            work.settle(torch.cat(work.outputs, dim=1) if len(work.outputs) > 1 else work.outputs[0])


def _step_args(step: DecodeStep) -> tuple:
    return step.start, step.caches, step.hidden, step.position, step.adapter


def _run(work: _Work, compute: Callable[[], Any]) -> None:
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
