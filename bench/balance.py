"""Block selection and rebalancing at swarm scale, simulated with the code the peers run.

An 80-block model; 300 peers with heavy-tailed throughputs (Pareto, alpha 1.5) and spans of 4-40 blocks join in
random order, each taking the window `choose_span_start` picks from the records of the peers before it. The
peers then rebalance as they do periodically: the one peer `choose_mover` names moves, until it names nobody.
Then 30% leave at random and the survivors rebalance the same way.

The bottleneck is the weakest block's total throughput. Its ratio is taken against an upper bound from an LP
relaxation: each peer may split itself fractionally over all windows of its span length, maximizing the
weakest block (scipy's HiGHS). No real placement can beat it, so the ratios are conservative.
route_ms_1000_peers: median time of one `min_latency_route` over a view of 1000 peers.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import dataclass

import numpy as np
from hivemind.p2p import PeerID
from scipy.optimize import linprog
from scipy.sparse import lil_matrix

from blockswarm.dht import ServerInfo, ServerState
from blockswarm.peer.block_selection import block_coverage, choose_mover, choose_span_start
from blockswarm.routing.route import min_latency_route

NUM_BLOCKS = 80


@dataclass
class SimPeer:
    peer_id: PeerID
    throughput: float
    span_length: int
    start: int = 0

    def record(self) -> ServerInfo:
        return ServerInfo(
            state=ServerState.ONLINE,
            start=self.start,
            end=self.start + self.span_length,
            throughput=self.throughput,
            balancing=True,
        )


def records(peers: list[SimPeer]) -> list[dict[PeerID, ServerInfo]]:
    blocks: list[dict[PeerID, ServerInfo]] = [{} for _ in range(NUM_BLOCKS)]
    for peer in peers:
        info = peer.record()
        for block in range(info.start, info.end):
            blocks[block][peer.peer_id] = info
    return blocks


def rebalance(peers: list[SimPeer], max_moves: int = 1000) -> int:
    """Moves made until the chosen mover is nobody, as the peers' periodic checks would make them."""
    by_id = {peer.peer_id: peer for peer in peers}
    for moves in range(max_moves):
        mover = choose_mover(records(peers))
        if mover is None:
            return moves
        by_id[mover[0]].start = mover[1]
    raise RuntimeError(f"rebalancing did not settle within {max_moves} moves")


def lp_bound(peers: list[SimPeer]) -> float:
    """Max over fractional placements of the weakest block's throughput."""
    windows = [(i, s) for i, peer in enumerate(peers) for s in range(NUM_BLOCKS - peer.span_length + 1)]
    n = len(windows)  # variables: one weight per (peer, window), then t
    coverage = lil_matrix((NUM_BLOCKS, n + 1))
    for column, (i, s) in enumerate(windows):
        for block in range(s, s + peers[i].span_length):
            coverage[block, column] = -peers[i].throughput
    coverage[:, n] = 1.0  # t - covered(block) <= 0
    assignment = lil_matrix((len(peers), n + 1))
    for column, (i, _) in enumerate(windows):
        assignment[i, column] = 1.0
    objective = np.zeros(n + 1)
    objective[n] = -1.0
    result = linprog(
        objective,
        A_ub=coverage.tocsr(),
        b_ub=np.zeros(NUM_BLOCKS),
        A_eq=assignment.tocsr(),
        b_eq=np.ones(len(peers)),
        bounds=[(0, None)] * (n + 1),
        method="highs",
    )
    assert result.status == 0, result.message
    return -result.fun


def route_time_ms(rng: random.Random, num_peers: int = 1000, repeats: int = 15) -> float:
    blocks: list[dict[PeerID, ServerInfo]] = [{} for _ in range(NUM_BLOCKS)]
    rtts = {}
    for n in range(num_peers):
        length = rng.randint(4, 40)
        start = rng.randrange(NUM_BLOCKS - length + 1)
        peer = PeerID(f"route-peer-{n}".encode())
        info = ServerInfo(
            state=ServerState.ONLINE,
            start=start,
            end=start + length,
            inference_rps=rng.uniform(10, 1000),
            cache_tokens_left=rng.choice([0, 100_000]),
        )
        if rng.random() < 0.7:
            rtts[peer] = rng.uniform(0.001, 0.3)
        for block in range(start, start + length):
            blocks[block][peer] = info
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        min_latency_route(blocks, 0, NUM_BLOCKS, "bench", rtts, cache_tokens_needed=4096)
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, default=300)
    parser.add_argument("--leave", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    peers: list[SimPeer] = []
    for n in range(args.peers):
        peer = SimPeer(PeerID(f"peer-{n}".encode()), 100 * rng.paretovariate(1.5), rng.randint(4, 40))
        peer.start = choose_span_start(block_coverage(records(peers)), peer.span_length)
        peers.append(peer)
    join_moves = rebalance(peers)
    after_join = min(block_coverage(records(peers))) / lp_bound(peers)

    survivors = rng.sample(peers, round(len(peers) * (1 - args.leave)))
    churn_moves = rebalance(survivors)
    after_churn = min(block_coverage(records(survivors))) / lp_bound(survivors)

    result = {
        "bottleneck_ratio_after_join": round(after_join, 4),
        "bottleneck_ratio_after_churn": round(after_churn, 4),
        "moves_per_peer": round((join_moves + churn_moves) / len(peers), 3),
        "route_ms_1000_peers": round(route_time_ms(rng), 2),
        "bound": "LP relaxation (fractional windows per peer), an upper bound",
        "join_moves": join_moves,
        "churn_moves": churn_moves,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
