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


def bottleneck(coverage: Sequence[float], extra: float = 0.0, start: int = 0, end: int = 0) -> float:
    """The swarm's throughput limit: its weakest block, with `extra` added over blocks [start, end)."""
    return min(value + (extra if start <= i < end else 0.0) for i, value in enumerate(coverage))


def choose_move(
    coverage_without_me: Sequence[float],
    span: tuple[int, int],
    my_throughput: float,
    min_improvement: float = 0.2,
) -> int | None:
    """Where to move this peer's span, or None to stay.

    Move only when the bottleneck improves by more than `min_improvement` (hysteresis against thrashing).
    Moving never uncovers a block: a move that would leaves the bottleneck at 0, which is no improvement.
    """
    start, end = span
    new_start = choose_span_start(coverage_without_me, end - start)
    if new_start == start:
        return None
    now = bottleneck(coverage_without_me, my_throughput, start, end)
    moved = bottleneck(coverage_without_me, my_throughput, new_start, new_start + end - start)
    return new_start if moved > now * (1 + min_improvement) else None
