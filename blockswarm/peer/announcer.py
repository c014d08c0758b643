"""A peer's DHT records: its state, span and capacity under each block key it serves, and the model's index entry.

Records expire unless refreshed: the server announces every `update_period` and on every change of state, and
a record lives long enough to survive one missed refresh.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from hivemind.utils import get_dht_time

from blockswarm.dht import (
    DHTUnavailableError,
    ModelInfo,
    ServerInfo,
    ServerState,
    SwarmNode,
    announce_model,
    announce_server,
)
from blockswarm.dht.records import MAX_BLOCKS, MAX_CACHE_TOKENS, MAX_LOAD, MAX_THROUGHPUT
from blockswarm.peer.throughput import Throughput

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerProfile:
    """What a peer's record says about it that does not change while it runs."""

    dtype: str
    quant: str
    codecs: list[str]
    version: str
    public_name: str | None
    training: bool  # learns from SWARM trainers' backward passes (--train)
    balancing: bool  # chose its own blocks and moves where the swarm needs it
    using_relay: bool  # reached through circuit relays: others cannot dial it directly


def check_record_bounds(num_blocks: int, throughput: float | None, cache_tokens: int) -> None:
    """Raises ValueError when this peer's figures would not fit the bounds every reader enforces on records."""
    if num_blocks > MAX_BLOCKS:
        raise ValueError(f"the model has {num_blocks} blocks; a swarm serves models of up to {MAX_BLOCKS}")
    if throughput is not None and not 0 <= throughput <= MAX_THROUGHPUT:
        raise ValueError(f"--throughput must be between 0 and {MAX_THROUGHPUT:g}, got {throughput:g}")
    if not 0 < cache_tokens <= MAX_CACHE_TOKENS:
        raise ValueError(f"--cache-tokens must be between 1 and {MAX_CACHE_TOKENS}, got {cache_tokens}")


class Announcer:
    def __init__(
        self,
        node: SwarmNode,
        model_name: str,
        model_info: ModelInfo,
        profile: PeerProfile,
        update_period: float,
        throughput_override: float | None = None,
    ):
        self.node = node
        self.model_name = model_name
        self.model_info = model_info
        self.profile = profile
        self.update_period = update_period
        self.throughput_override = throughput_override  # --throughput: replaces the measured forward figure

    @property
    def ttl(self) -> float:
        return max(2 * self.update_period, self.update_period + 10)

    def record(
        self,
        state: ServerState,
        span: tuple[int, int],
        throughput: Throughput | None,
        cache_tokens_left: int,
        next_pings: dict[str, float],
        active_sessions: int = 0,
        queued_requests: int = 0,
    ) -> ServerInfo:
        """The record announcing `state`; the load figures (capped like any record's) are those of this moment."""
        # measured figures are capped like any record's (no hardware comes near the cap)
        inference_rps = None if throughput is None else min(throughput.inference_rps, MAX_THROUGHPUT)
        forward_rps = None if throughput is None else min(throughput.forward_rps, MAX_THROUGHPUT)
        batched_tps = None if throughput is None else min(throughput.batched_inference_tps, MAX_THROUGHPUT)
        published = self.throughput_override
        if published is None:
            published = forward_rps if forward_rps is not None else 1.0
        return ServerInfo(
            state=state,
            start=span[0],
            end=span[1],
            throughput=published,
            inference_rps=inference_rps,
            forward_rps=forward_rps,
            batched_inference_tps=batched_tps,
            cache_tokens_left=cache_tokens_left,
            active_sessions=min(active_sessions, MAX_LOAD),
            queued_requests=min(queued_requests, MAX_LOAD),
            next_pings=next_pings,
            dtype=self.profile.dtype,
            quant=self.profile.quant,
            codecs=self.profile.codecs,
            version=self.profile.version,
            public_name=self.profile.public_name,
            training=self.profile.training,
            balancing=self.profile.balancing,
            using_relay=self.profile.using_relay,
        )

    def announce(self, record: ServerInfo, timeout: float) -> bool:
        """Store `record` and the model's index entry; False (logged) when the DHT did not take them in time."""
        expiration = get_dht_time() + self.ttl
        try:
            stored = announce_server(
                self.node.dht, self.model_name, record, self.node.owner_marker, expiration, timeout=timeout
            )
            announce_model(
                self.node.dht, self.model_name, self.model_info, self.node.owner_marker, expiration, timeout=timeout
            )
        except (TimeoutError, DHTUnavailableError) as e:  # the DHT process hangs or is gone
            logger.warning(
                "could not announce this peer's %s record: %s", record.state.value, str(e) or type(e).__name__
            )
            return False
        if not stored:
            logger.warning("could not store this peer's record on the DHT; will retry")
        return stored

    async def announce_async(self, record: ServerInfo, timeout: float) -> bool:
        return await asyncio.to_thread(self.announce, record, timeout)
