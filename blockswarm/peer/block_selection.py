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
    move = _best_move(np.asarray(coverage_without_me, dtype=np.float64), span, my_throughput, min_gain)
    return None if move is None else move[0]


def _best_move(
    coverage: np.ndarray, span: tuple[int, int], throughput: float, min_gain: float
) -> tuple[int, list[float]] | None:
    """`choose_move`'s new start, with the swarm's coverage after the move sorted weakest first."""
    start, end = span
    length = end - start
    starts = np.arange(len(coverage) - length + 1)
    blocks = np.arange(len(coverage))
    in_window = (blocks >= starts[:, None]) & (blocks < starts[:, None] + length)
    options = coverage + throughput * in_window
    ranked = np.sort(options, axis=1)
    new_start = int(np.lexsort((-starts, *ranked.T[::-1]))[-1])  # lexicographic max, then the smallest start
    if new_start == start or np.any((options[start] > 0) & (options[new_start] == 0)):
        return None
    changed = ~np.isclose(ranked[new_start], ranked[start], rtol=1e-9, atol=0.0)
    if not changed.any():
        return None
    level = int(np.argmax(changed))
    if ranked[new_start, level] - ranked[start, level] <= min_gain * throughput:
        return None
    return new_start, ranked[new_start].tolist()


def choose_mover(records: Sequence[dict[object, ServerInfo]], min_gain: float = 0.2) -> tuple[object, int] | None:
    """The one balancing peer that should move now and its new span start, or None when no move helps enough.

    Every peer runs this on the same records and gets the same answer, so peers that see one gap do not all
    leave their shared blocks for it at once (which would open a new gap and send them back). The move that
    leaves the weakest blocks strongest wins; ties go to the smallest peer id.
    """
    covering = [{peer: info for peer, info in block.items() if info.state in COVERING_STATES} for block in records]
    infos = {peer: info for block in covering for peer, info in block.items()}
    peers = sorted(infos, key=str)
    row_of = {peer: row for row, peer in enumerate(peers)}
    contribution = np.zeros((len(peers), len(records)))
    for index, block in enumerate(covering):
        for peer, info in block.items():
            contribution[row_of[peer], index] = info.throughput
    total = contribution.sum(axis=0)
    best: tuple[list[float], object, int] | None = None
    for row, peer in enumerate(peers):
        info = infos[peer]
        if info.state != ServerState.ONLINE or not info.balancing:
            continue
        move = _best_move(total - contribution[row], (info.start, info.end), info.throughput, min_gain)
        if move is not None and (best is None or move[1] > best[0]):
            best = (move[1], peer, move[0])
    return None if best is None else (best[1], best[2])
