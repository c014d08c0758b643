"""Which blocks this peer serves: its first span, and when it is the swarm's chosen mover, where to move.

The decisions themselves are pure functions of the DHT records (`block_selection`); this reads the records and
keeps the (randomized) schedule of rebalancing checks.
"""

from __future__ import annotations

import asyncio
import random
import time

from blockswarm.dht import SwarmNode, get_block_servers
from blockswarm.peer.block_selection import block_coverage, choose_mover, choose_span_start


def check_span_request(total_blocks: int, pinned_span: tuple[int, int] | None, num_blocks: int | None) -> None:
    """Raises ValueError when --blocks or --num-blocks does not fit a model of `total_blocks` blocks."""
    if pinned_span is not None:
        start, end = pinned_span
        if not 0 <= start < end <= total_blocks:
            raise ValueError(f"--blocks {start}:{end} is outside the model's blocks 0:{total_blocks}")
    elif num_blocks is not None and not 0 < num_blocks <= total_blocks:
        raise ValueError(f"--num-blocks {num_blocks} must be between 1 and {total_blocks}")


class Balancer:
    def __init__(
        self,
        node: SwarmNode,
        model_name: str,
        total_blocks: int,
        pinned_span: tuple[int, int] | None,
        num_blocks: int | None,
        balance_period: float,
        enabled: bool,
    ):
        """`pinned_span` (--blocks) fixes the span; otherwise the peer takes `num_blocks` (default: all) where the
        swarm is weakest. Only an `enabled` balancer (not pinned, not training) ever moves."""
        self.node = node
        self.model_name = model_name
        self.total_blocks = total_blocks
        self.pinned_span = pinned_span
        self.num_blocks = num_blocks or total_blocks
        self.balance_period = balance_period
        self.enabled = enabled
        self._next_check = float("inf")

    def reschedule(self) -> None:
        """The next check comes one randomized period from now (called each time the peer goes ONLINE)."""
        self._next_check = time.monotonic() + self._delay()

    def initial_span(self) -> tuple[int, int]:
        if self.pinned_span is not None:
            return self.pinned_span
        records = get_block_servers(self.node.dht, self.model_name, 0, self.total_blocks, latest=True)
        start = choose_span_start(block_coverage(records, exclude=[self.node.dht.peer_id]), self.num_blocks)
        return start, start + self.num_blocks

    async def move_target(self, span: tuple[int, int]) -> tuple[int, int] | None:
        """The span to move to when a check is due and this peer is the swarm's chosen mover (see `choose_mover`)."""
        if not self.enabled or time.monotonic() < self._next_check:
            return None
        self.reschedule()
        records = await asyncio.to_thread(
            get_block_servers, self.node.dht, self.model_name, 0, self.total_blocks, latest=True
        )
        mover = choose_mover(records)
        if mover is None or mover[0] != self.node.dht.peer_id:
            return None
        return mover[1], mover[1] + span[1] - span[0]

    def _delay(self) -> float:
        """Randomized so that peers do not all read the DHT in the same instant."""
        return self.balance_period * random.uniform(0.5, 1.5)
