"""Which blocks a peer should serve: the window the swarm covers worst, and which one peer moves when a gap opens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

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


def choose_move(
    coverage_without_me: Sequence[float],
    span: tuple[int, int],
    my_throughput: float,
    min_gain: float = 0.2,
) -> int | None:
    """Where to move this peer's span, or None to stay.

    The target is the window that leaves the swarm's weakest blocks strongest: the one whose coverage, sorted
    weakest first, is lexicographically largest. Move only when, in that sorted order, the first level that
    changes rises by more than `min_gain` times this peer's throughput. The hysteresis is scaled to what one
    peer can add, so it means the same in a swarm of 3 peers as of 3000, and every move raises the sorted
    order, so moves cannot cycle. Moving never uncovers a block.
    """
    start, end = span
    length = end - start
    coverage = np.asarray(coverage_without_me, dtype=np.float64)
    starts = np.arange(len(coverage) - length + 1)
    blocks = np.arange(len(coverage))
    in_window = (blocks >= starts[:, None]) & (blocks < starts[:, None] + length)
    options = coverage + my_throughput * in_window
    ranked = np.sort(options, axis=1)
    new_start = int(np.lexsort((-starts, *ranked.T[::-1]))[-1])  # lexicographic max, then the smallest start
    if new_start == start:
        return None
    if np.any((options[start] > 0) & (options[new_start] == 0)):
        return None
    changed = ~np.isclose(ranked[new_start], ranked[start], rtol=1e-9, atol=0.0)
    if not changed.any():
        return None
    level = int(np.argmax(changed))
    return new_start if ranked[new_start, level] - ranked[start, level] > min_gain * my_throughput else None


def choose_mover(records: Sequence[dict[object, ServerInfo]], min_gain: float = 0.2) -> tuple[object, int] | None:
    """The one balancing peer that should move now and its new span start, or None when no move helps enough.

    Every peer runs this on the same records and gets the same answer, so peers that see one gap do not all
    leave their shared blocks for it at once (which would open a new gap and send them back). The move that
    leaves the weakest blocks strongest wins; ties go to the smallest peer id.
    """
    peers = sorted(
        {peer for block in records for peer, info in block.items() if info.state in COVERING_STATES}, key=str
    )
    contribution = np.zeros((len(peers), len(records)))
    for row, peer in enumerate(peers):
        for index, block in enumerate(records):
            info = block.get(peer)
            if info is not None and info.state in COVERING_STATES:
                contribution[row, index] = info.throughput
    total = contribution.sum(axis=0)
    best: tuple[list[float], object, int] | None = None
    for row, peer in enumerate(peers):
        info = next(block[peer] for block in records if peer in block and block[peer].state in COVERING_STATES)
        if info.state != ServerState.ONLINE or not info.balancing:
            continue
        coverage = total - contribution[row]
        new_start = choose_move(coverage, (info.start, info.end), info.throughput, min_gain)
        if new_start is None:
            continue
        moved = coverage.copy()
        moved[new_start : new_start + info.end - info.start] += info.throughput
        ranked = sorted(moved.tolist())
        if best is None or ranked > best[0]:
            best = (ranked, peer, new_start)
    return None if best is None else (best[1], best[2])
