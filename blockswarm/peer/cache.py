"""A bounded pool of KV caches: sessions wait for room (up to a timeout) instead of exhausting memory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from blockswarm.models import KVCache


class CacheFullError(RuntimeError):
    """No room for a session's KV cache within the allocation timeout."""


class CachePool:
    """Accounts cache in block-tokens: a session of batch x max_length over n blocks takes that product times n.

    `capacity_tokens` is the number of tokens the pool can hold for every block the peer serves.
    """

    def __init__(self, capacity_tokens: int, num_blocks: int, make_cache: Callable[[int, int], KVCache]):
        self.capacity = capacity_tokens * num_blocks
        self.num_blocks = num_blocks
        self._used = 0
        self._make_cache = make_cache
        self._freed = asyncio.Condition()

    @property
    def tokens_left(self) -> int:
        return (self.capacity - self._used) // self.num_blocks

    @contextlib.asynccontextmanager
    async def allocate(
        self, num_blocks: int, batch_size: int, max_length: int, timeout: float
    ) -> AsyncIterator[list[KVCache]]:
        size = num_blocks * batch_size * max_length
        if size > self.capacity:
            raise CacheFullError(
                f"a session of {batch_size} x {max_length} tokens over {num_blocks} blocks needs {size} "
                f"block-tokens of cache, more than this peer holds in total ({self.capacity})"
            )
        async with self._freed:
            try:
                await asyncio.wait_for(self._freed.wait_for(lambda: self._used + size <= self.capacity), timeout)
            except TimeoutError:
                raise CacheFullError(
                    f"KV cache is full: {self.tokens_left} tokens left, waited {timeout:.0f} s for room"
                ) from None
            self._used += size
        try:
            yield [self._make_cache(batch_size, max_length) for _ in range(num_blocks)]
        finally:
            async with self._freed:
                self._used -= size
                self._freed.notify_all()
