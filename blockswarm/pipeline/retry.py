"""Bounded retries: exponential backoff with a cap, and a deadline after which the caller gets the last error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from blockswarm.pipeline.hops import NoRouteError, PeerError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    deadline: float = 60.0  # seconds to keep trying to find and use a replacement before giving up
    initial_backoff: float = 0.05
    max_backoff: float = 5.0


async def retry(policy: RetryPolicy, attempt: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `attempt` until it succeeds; PeerError/NoRouteError are retried with backoff until the deadline.

    On giving up, raises NoRouteError (when blocks are missing) or PeerError, with every failure seen.
    """
    started = time.monotonic()
    backoff = policy.initial_backoff
    failures: list[str] = []
    while True:
        try:
            return await attempt()
        except (PeerError, NoRouteError) as e:
            failures.append(str(e))
            elapsed = time.monotonic() - started
            if elapsed + backoff > policy.deadline:
                tried = "; ".join(dict.fromkeys(failures))
                detail = f"gave up {what} after {elapsed:.1f} s and {len(failures)} attempts ({tried})"
                if isinstance(e, NoRouteError):
                    raise NoRouteError(e.model, e.missing_blocks, detail) from e
                raise PeerError(e.peer_id, detail) from e
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, policy.max_backoff)
