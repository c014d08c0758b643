"""A bounded pool of KV caches: a session that does not fit is refused at once instead of exhausting memory."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from blockswarm.models import KVCache
from blockswarm.peer.limits import PeerBusy

CACHE_RETRY_AFTER = 5.0  # seconds a client avoids a peer whose cache is full; short sessions end by then


class CacheFullError(RuntimeError):
    """A session's KV cache would not fit in this peer's whole cache."""


class CachePool:
    """Accounts cache in block-tokens: a session of batch x max_length over n blocks takes that product times n.

    `capacity_tokens` is the number of tokens the pool can hold for every block the peer serves.
    """

    def __init__(self, capacity_tokens: int, num_blocks: int, make_cache: Callable[[int, int], KVCache]):
        self.capacity = capacity_tokens * num_blocks
        self.num_blocks = num_blocks
        self._used = 0
        self.sessions = 0  # sessions holding caches now: the load a peer announces
        self._make_cache = make_cache

    @property
    def tokens_left(self) -> int:
        return (self.capacity - self._used) // self.num_blocks

    @contextlib.contextmanager
    def allocate(self, num_blocks: int, batch_size: int, max_length: int) -> Iterator[list[KVCache]]:
        """Caches for one session; PeerBusy at once when they do not fit now (the client goes to another peer
        rather than wait), CacheFullError when they never would."""
        size = num_blocks * batch_size * max_length
        if size > self.capacity:
            raise CacheFullError(
                f"a session of {batch_size} x {max_length} tokens over {num_blocks} blocks needs {size} "
                f"block-tokens of cache, more than this peer holds in total ({self.capacity})"
            )
        if self._used + size > self.capacity:
            raise PeerBusy(
                f"KV cache is full: {self.tokens_left} tokens left per block, the session needs "
                f"{batch_size * max_length}",
                CACHE_RETRY_AFTER,
            )
        self._used += size
        self.sessions += 1
        try:
            yield [self._make_cache(batch_size, max_length) for _ in range(num_blocks)]
        finally:
            self._used -= size
            self.sessions -= 1
