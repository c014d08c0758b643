"""Which blocks a new peer should serve: the window the swarm covers worst."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from blockswarm.dht import ServerInfo, ServerState

COVERING_STATES = (ServerState.JOINING, ServerState.ONLINE)


def block_coverage(records: Sequence[dict[object, ServerInfo]], exclude: Iterable[object] = ()) -> list[float]:
    """Total announced throughput per block, counting only peers that serve or are about to."""
    excluded = set(exclude)
    return [
        sum(info.throughput for peer, info in block.items() if info.state in COVERING_STATES and peer not in excluded)
        for block in records
    ]


def choose_span_start(coverage: Sequence[float], num_blocks: int) -> int:
    """Start of the `num_blocks`-wide window whose weakest block is weakest (then the smallest total)."""
    if not 0 < num_blocks <= len(coverage):
        raise ValueError(f"cannot serve {num_blocks} blocks of a {len(coverage)}-block model")
    windows = range(len(coverage) - num_blocks + 1)
    return min(windows, key=lambda s: (min(coverage[s : s + num_blocks]), sum(coverage[s : s + num_blocks]), s))
