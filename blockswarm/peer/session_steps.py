"""Where an inference session's next step comes from: its client's stream, or, for a session that accepts pushes,
the previous span's peer (peer/push.py), whichever arrives first. A read of the client's stream that loses the race
goes on into the next call: a frame is never read in part."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from blockswarm.wire.messages import InferenceStep, PushStep
from blockswarm.wire.transport import Frame


class SessionSteps:
    def __init__(
        self,
        read: Callable[[], Awaitable[Frame[InferenceStep] | None]],
        pushed: asyncio.Queue[Frame[PushStep]] | None,
        leaving: asyncio.Future,
        idle_timeout: float,
    ):
        self._read = read
        self._pushed = pushed
        self._leaving = leaving
        self._idle_timeout = idle_timeout
        self._reading: asyncio.Future | None = None
        self._taking: asyncio.Future | None = None

    async def next(self) -> Frame[InferenceStep | PushStep] | None:
        """The next step (the client's first when both are there); None when the client closed the stream. Raises
        TimeoutError after `idle_timeout` seconds without either, and returns at once when the peer starts leaving
        (the caller checks for that)."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        if self._pushed is not None and self._taking is None:
            self._taking = asyncio.ensure_future(self._pushed.get())
        waiting = {self._reading, self._leaving} | ({self._taking} if self._taking is not None else set())
        done, _ = await asyncio.wait(waiting, timeout=self._idle_timeout, return_when=asyncio.FIRST_COMPLETED)
        if self._reading in done:
            reading, self._reading = self._reading, None
            return reading.result()
        if self._taking is not None and self._taking in done:
            taking, self._taking = self._taking, None
            return taking.result()
        self.close()
        if self._leaving.done():
            return None
        raise TimeoutError

    def close(self) -> None:
        for task in (self._reading, self._taking):
            if task is not None:
                task.cancel()
        self._reading = self._taking = None
