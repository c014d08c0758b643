"""One scheduler per peer: the one thread that runs the blocks' math, and the one place that decides what runs next.

The event loop only moves bytes and answers `info`; every decode step, prefill, forward and backward pass waits
here. Each tick computes, in one batch (`BlockBackend.inference_steps`: one matmul per projection for all sessions'
rows), every pending decode step and prefill chunks of up to `prefill_tokens_per_tick` tokens (a long prompt in
chunks, one tick after another), then one forward/backward job: decoding sessions get a token every tick while long
prompts and training passes arrive. A job waits while there are decode steps or prefills, but only for
`MAX_JOB_WAIT_TICKS` ticks, so nothing starves.

A tick of many sessions costs little more than a tick of one (decoding reads every weight for a few rows), but
sessions come back at their own pace, each after its client and the other peers of its route; a peer that starts a
tick at each arrival ends up computing one session at a time. So a tick of decode steps waits for the sessions this
peer expects back within one tick's duration (`DecodingSession`, `_gather_deadline`), and for no others.

The queue is bounded: over a cap, `admit` answers busy at once, and the caller goes to another peer instead of
waiting behind everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from blockswarm.peer.backend import BlockBackend, DecodeStep
from blockswarm.peer.limits import CallerCounts, RequestError, ServingLimits
from blockswarm.peer.scheduled_work import DecodingSession, QueuedJob, QueuedStep, settle_from, step_args

MAX_JOB_WAIT_TICKS = 4  # ticks a forward/backward job may be passed over for decode steps and prefills
MAX_GATHER_S = 0.25  # the longest a tick waits for due sessions, however long ticks take
TICK_AVERAGING = 0.2  # weight of the latest decode tick in the running mean of their duration


class Scheduler:
    def __init__(self, limits: ServingLimits):
        self.limits = limits
        self.ticks = 0
        self._admitted = CallerCounts(  # requests waiting for compute or computing
            limits.max_compute_queue_per_peer,
            limits.max_compute_queue,
            "{count} requests from your peer id wait for compute here, the limit is {limit}",
            "{count} requests wait for compute here, the limit is {limit}",
            limits.busy_retry_after,
        )
        self._decodes: list[QueuedStep] = []
        self._prefills: deque[QueuedStep] = deque()
        self._jobs: deque[QueuedJob] = deque()
        self._sessions: set[DecodingSession] = set()
        self._decodes_since = 0.0  # when the oldest pending decode step arrived
        self._decode_tick_s = 0.0  # running mean of the decode ticks' duration
        self._ready = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def admit(self, remote: object) -> Iterator[None]:
        """Count a request of `remote` from when it waits for compute until it is done; PeerBusy at once when the
        queue is full (one thread computes: a longer queue only makes every caller wait)."""
        with self._admitted.holding(remote):
            yield

    @property
    def active_requests(self) -> int:
        """Requests admitted: waiting for compute or computing."""
        return self._admitted.total

    @contextlib.contextmanager
    def session(self) -> Iterator[DecodingSession]:
        """An inference session, open for as long as the block lasts, whose steps ticks may wait for."""
        session = DecodingSession()
        with self._ready:
            self._sessions.add(session)
        try:
            yield session
        finally:
            with self._ready:
                self._sessions.discard(session)
                self._ready.notify()  # a tick may be waiting for it

    async def submit_step(
        self, backend: BlockBackend, step: DecodeStep, session: DecodingSession | None = None
    ) -> torch.Tensor:
        """A session's step: one token (per row) is a decode step, batched with the tick's others; longer is a
        prefill, computed in chunks of the tick's token budget at increasing positions."""
        work = QueuedStep(asyncio.get_running_loop().create_future(), backend=backend, step=step, session=session)
        self._queue(lambda: self._add_step(work))
        return await work.future

    def _add_step(self, work: QueuedStep) -> None:
        if work.step.hidden.shape[1] > 1:
            self._prefills.append(work)
            return
        now = time.monotonic()
        if not self._decodes:
            self._decodes_since = now
        self._decodes.append(work)
        if work.session is not None:
            work.session.arrived(now)

    async def submit_job(self, fn: Callable, *args: Any) -> Any:
        """A forward or backward pass: `fn(*args)` on the compute thread, one per tick."""
        work = QueuedJob(asyncio.get_running_loop().create_future(), fn=fn, args=args, queued_at=self.ticks)
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
            steps, job = tick
            began = time.monotonic()
            self._run_steps(steps)
            if steps and all(work.step is step for work, step in steps):  # decode steps only: no prefill chunk
                self._decode_tick_s += TICK_AVERAGING * (time.monotonic() - began - self._decode_tick_s)
            if job is not None:
                settle_from(job, functools.partial(job.fn, *job.args))

    def _next_tick(self) -> tuple[list[tuple[QueuedStep, DecodeStep]], QueuedJob | None] | None:
        """What the next tick computes: every decode step and prefill chunks within the budget (each with the piece
        of its step it computes now), maybe one job."""
        with self._ready:
            while not (self._stopped or self._decodes or self._prefills or self._jobs):
                self._ready.wait()
            while (deadline := self._gather_deadline()) is not None and (left := deadline - time.monotonic()) > 0:
                self._ready.wait(left)
            if self._stopped:
                return None
            steps = [(work, work.step) for work in self._decodes if not work.future.done()]
            self._decodes = []
            steps += self._take_chunks()
            job = None
            if self._jobs and (not steps or self.ticks - self._jobs[0].queued_at >= MAX_JOB_WAIT_TICKS):
                job = self._jobs.popleft()
            self.ticks += 1
            return steps, job

    def _gather_deadline(self) -> float | None:
        """Until when the next tick waits for due sessions' decode steps, or None to start now: only pending decode
        steps wait (a prefill or job starts the tick), and at most one tick's duration after the first arrived."""
        if self._stopped or self._prefills or self._jobs or not self._decodes:
            return None
        now, deadline = time.monotonic(), self._decodes_since + min(self._decode_tick_s, MAX_GATHER_S)
        pending = {work.session for work in self._decodes}
        if not any(session.due_by(deadline, now) for session in self._sessions - pending):
            return None
        return deadline

    def _take_chunks(self) -> list[tuple[QueuedStep, DecodeStep]]:
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

    def _run_steps(self, steps: list[tuple[QueuedStep, DecodeStep]]) -> None:
        """Each backend's steps of the tick together (decode steps and prefill chunks alike: sessions share each
        matmul); when a batch fails, each step alone, so that an error stays its own session's."""
        steps = [(work, step) for work, step in steps if not (work.failed or work.future.done())]
        for backend in {id(work.backend): work.backend for work, _ in steps}.values():
            mine = [(work, step) for work, step in steps if work.backend is backend]
            try:
                outputs = backend.inference_steps([step for _, step in mine])
            except Exception as e:
                if len(mine) == 1:
                    mine[0][0].fail(e)
                    continue
                outputs = [None] * len(mine)
            for (work, step), output in zip(mine, outputs):
                if output is None:
                    try:
                        output = backend.inference_step(*step_args(step))
                    except Exception as e:
                        work.fail(e)
                        continue
                work.add_output(output)
