"""Crawls the swarm every `period`: the model index, every block record, and an `info` call to each ONLINE peer.

The crawl runs on its own asyncio loop in a background thread: the `info` calls go through a P2P replica
bound to that loop, and the blocking DHT reads run in worker threads so a slow DHT never stalls the pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID

from blockswarm.dht import ServerInfo, ServerState, get_block_servers, get_models, get_reports
from blockswarm.wire.ping import request_status

from .state import History, Reachability, Snapshot, model_state

logger = logging.getLogger(__name__)

MAX_CONCURRENT_PINGS = 64


class Crawler:
    """Fills `history` with a Snapshot every `period` seconds until stopped.

    The last `info` result of every peer is kept, so `is_reachable` can answer without a call when the
    result is younger than one period.
    """

    def __init__(self, dht: DHT, history: History, period: float = 30.0, info_timeout: float = 5.0):
        self.dht = dht
        self.history = history
        self.period = period
        self.info_timeout = info_timeout
        self._reachability: dict[PeerID, Reachability] = {}
        self._loop = asyncio.new_event_loop()
        self._p2p: P2P | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="blockswarm-monitor-crawler", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._p2p is None:
            raise RuntimeError("the monitor could not attach to its DHT node's p2p daemon (see the log above)")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=self.period + self.info_timeout + 10)

    def is_reachable(self, peer_id: PeerID) -> Reachability:
        """The cached result when fresh, else a new `info` call (from any thread)."""
        cached = self._reachability.get(peer_id)
        if cached is not None and time.time() - cached.checked_at < self.period:
            return cached
        future = asyncio.run_coroutine_threadsafe(self._check(peer_id), self._loop)
        return future.result(timeout=self.info_timeout + 10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._crawl_forever())
        finally:
            self._ready.set()  # also when it failed to start: start() must not wait forever
            self._loop.close()

    async def _crawl_forever(self) -> None:
        self._stop = asyncio.Event()
        self._p2p = await self.dht.replicate_p2p()
        self._ready.set()
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                self.history.add(await self.crawl())
                delay = max(0.0, self.period - (time.monotonic() - began))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            await self._p2p.shutdown()

    async def crawl(self) -> Snapshot:
        """One pass over the swarm; a failed DHT read gives a snapshot with the error and no models."""
        taken_at, began = time.time(), time.perf_counter()
        try:
            # a name anyone disputes shows the claim made by most writers (see get_models)
            claims = await asyncio.to_thread(get_models, self.dht, latest=True)
            models = {name: named[0] for name, named in claims.items()}
            blocks = {
                name: await asyncio.to_thread(get_block_servers, self.dht, name, 0, info.num_blocks, latest=True)
                for name, info in sorted(models.items())
            }
            reports = {name: await asyncio.to_thread(get_reports, self.dht, name) for name in models}
        except Exception as e:
            logger.warning("crawl failed: %s", e, exc_info=True)
            return Snapshot(taken_at=taken_at, crawl_seconds=time.perf_counter() - began, models=[], error=str(e))
        await self._check_all(list(blocks.values()))
        self._forget_older_than(taken_at - self.history.seconds)
        states = [model_state(name, models[name], blocks[name], self._reachability, reports[name]) for name in blocks]
        return Snapshot(taken_at=taken_at, crawl_seconds=time.perf_counter() - began, models=states)

    async def _check_all(self, models: list[list[dict[PeerID, ServerInfo]]]) -> None:
        online = {
            peer_id
            for blocks in models
            for block in blocks
            for peer_id, info in block.items()
            if info.state == ServerState.ONLINE
        }
        limit = asyncio.Semaphore(MAX_CONCURRENT_PINGS)

        async def check(peer_id: PeerID) -> None:
            async with limit:
                await self._check(peer_id)

        await asyncio.gather(*(check(peer_id) for peer_id in online))

    def _forget_older_than(self, cutoff: float) -> None:
        """Drop results of peers not seen for a while, so peers that come and go do not pile up."""
        for peer_id, result in list(self._reachability.items()):
            if result.checked_at < cutoff:
                del self._reachability[peer_id]

    async def _check(self, peer_id: PeerID) -> Reachability:
        """Call the peer's `info` RPC; any failure or a malformed reply means unreachable."""
        began = time.perf_counter()
        try:
            status = await request_status(self._p2p, peer_id, self.info_timeout)
            result = Reachability(
                reachable=True,
                checked_at=time.time(),
                rtt_ms=(time.perf_counter() - began) * 1000,
                training_step=status.training_step,
                memory_per_block=status.memory_per_block,
            )
        except TimeoutError:
            result = Reachability(
                reachable=False, checked_at=time.time(), error=f"no reply within {self.info_timeout:g} s"
            )
        except Exception as e:
            result = Reachability(reachable=False, checked_at=time.time(), error=f"{type(e).__name__}: {e}"[:300])
        self._reachability[peer_id] = result
        return result
