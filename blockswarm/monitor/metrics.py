"""The latest snapshot as Prometheus gauges, for `/metrics`.

A custom collector rather than live `Gauge` objects: every value is recomputed from the latest snapshot at
scrape time, so a model that leaves the swarm leaves the metrics too, with no stale series to clear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from blockswarm.dht import ServerState

from .state import History, ModelState, PeerRecord, Snapshot

PER_MODEL: dict[str, tuple[str, Callable[[ModelState], float]]] = {  # name -> (help, value), labelled by model
    "blockswarm_blocks": ("Transformer blocks of a model.", lambda m: m.num_blocks),
    "blockswarm_blocks_covered": (
        "Blocks of a model served by at least one ONLINE, reachable peer.",
        lambda m: m.covered_blocks,
    ),
    "blockswarm_model_healthy": ("1 if every block of the model is covered, else 0.", lambda m: int(m.healthy)),
    "blockswarm_block_throughput_min": (
        "Throughput covering the weakest block of a model (sum over its serving peers): the bottleneck.",
        lambda m: m.min_throughput,
    ),
    "blockswarm_block_throughput_avg": (
        "Throughput covering a block of a model, averaged over its blocks.",
        lambda m: m.avg_throughput,
    ),
    "blockswarm_active_sessions": (
        "Inference sessions open on a model's ONLINE peers, as last announced.",
        lambda m: sum(p.active_sessions for p in m.peers if p.serving),
    ),
    "blockswarm_queued_requests": (
        "Requests waiting for compute on a model's ONLINE peers, as last announced.",
        lambda m: sum(p.queued_requests for p in m.peers if p.serving),
    ),
    "blockswarm_training_peers": (
        "Serving peers of a model that train their blocks (SWARM stages).",
        lambda m: sum(p.training for p in m.peers if p.serving),
    ),
    "blockswarm_peers_reported_lying": (
        "Peers of a model that at least one client's spot checks caught returning wrong outputs.",
        lambda m: sum(p.lie_reports > 0 for p in m.peers),
    ),
}

PER_CRAWL: dict[str, tuple[str, Callable[[Snapshot], float]]] = {  # name -> (help, value), unlabelled
    "blockswarm_monitor_crawl_duration_seconds": (
        "How long the latest crawl of the swarm took.",
        lambda s: s.crawl_seconds,
    ),
    "blockswarm_monitor_last_crawl_timestamp_seconds": ("Unix time when the latest crawl began.", lambda s: s.taken_at),
    "blockswarm_monitor_crawl_ok": (
        "1 if the latest crawl could read the DHT, else 0.",
        lambda s: int(s.error is None),
    ),
}


class SwarmCollector(Collector):
    """Gauges of the latest crawl in `history`: every family, without samples until the first crawl has finished."""

    def __init__(self, history: History):
        self.history = history

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.history.latest()
        models = snapshot.models if snapshot is not None else []
        peers = GaugeMetricFamily(
            "blockswarm_peers",
            "Peers of a model by announced state; ONLINE peers that did not answer `info` count as unreachable.",
            labels=["model", "state"],
        )
        for model in models:
            for state, count in _peer_states(model.peers).items():
                peers.add_metric([model.name, state], count)
        yield peers
        for name, (help_text, model_value) in PER_MODEL.items():
            family = GaugeMetricFamily(name, help_text, labels=["model"])
            for model in models:
                family.add_metric([model.name], model_value(model))
            yield family
        for name, (help_text, crawl_value) in PER_CRAWL.items():
            family = GaugeMetricFamily(name, help_text)
            if snapshot is not None:
                family.add_metric([], crawl_value(snapshot))
            yield family


def metrics_registry(history: History) -> CollectorRegistry:
    """A registry of its own, so the monitor's metrics never mix with whatever else registers globally."""
    registry = CollectorRegistry()
    registry.register(SwarmCollector(history))
    return registry


def _peer_states(peers: list[PeerRecord]) -> dict[str, int]:
    counts = {state.value: 0 for state in ServerState} | {"unreachable": 0}
    for peer in peers:
        counts["unreachable" if peer.reachable is False else peer.state.value] += 1
    return counts
