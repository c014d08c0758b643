"""The latest snapshot in the Prometheus text exposition format (version 0.0.4), for `/metrics`.

Written by hand rather than through prometheus_client: the values are recomputed from each snapshot,
which a registry of live gauges would only duplicate.
"""

from __future__ import annotations

from blockswarm.dht import ServerState

from .state import PeerRecord, Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {float(value)!r}" for labels, value in samples]


def render_metrics(snapshot: Snapshot | None) -> str:
    """Gauges of the latest crawl; only the crawl gauges when the first crawl has not finished yet."""
    out = _Exposition()
    models = snapshot.models if snapshot is not None else []
    out.family(
        "blockswarm_peers",
        "gauge",
        "Peers of a model by announced state; ONLINE peers that did not answer `info` count as unreachable.",
        [
            ({"model": model.name, "state": state}, count)
            for model in models
            for state, count in _peer_states(model.peers).items()
        ],
    )
    out.family(
        "blockswarm_blocks",
        "gauge",
        "Transformer blocks of a model.",
        [({"model": model.name}, model.num_blocks) for model in models],
    )
    out.family(
        "blockswarm_blocks_covered",
        "gauge",
        "Blocks of a model served by at least one ONLINE, reachable peer.",
        [({"model": model.name}, model.covered_blocks) for model in models],
    )
    out.family(
        "blockswarm_model_healthy",
        "gauge",
        "1 if every block of the model is covered, else 0.",
        [({"model": model.name}, int(model.healthy)) for model in models],
    )
    out.family(
        "blockswarm_block_throughput_min",
        "gauge",
        "Throughput covering the weakest block of a model (sum over its serving peers): the bottleneck.",
        [({"model": model.name}, model.min_throughput) for model in models],
    )
    out.family(
        "blockswarm_block_throughput_avg",
        "gauge",
        "Throughput covering a block of a model, averaged over its blocks.",
        [({"model": model.name}, model.avg_throughput) for model in models],
    )
    out.family(
        "blockswarm_active_sessions",
        "gauge",
        "Inference sessions open on a model's ONLINE peers, as last announced.",
        [({"model": model.name}, sum(p.active_sessions for p in model.peers if p.serving)) for model in models],
    )
    out.family(
        "blockswarm_queued_requests",
        "gauge",
        "Requests waiting for compute on a model's ONLINE peers, as last announced.",
        [({"model": model.name}, sum(p.queued_requests for p in model.peers if p.serving)) for model in models],
    )
    out.family(
        "blockswarm_peers_reported_lying",
        "gauge",
        "Peers of a model that at least one client's spot checks caught returning wrong outputs.",
        [({"model": model.name}, sum(peer.lie_reports > 0 for peer in model.peers)) for model in models],
    )
    crawled = snapshot is not None
    out.family(
        "blockswarm_monitor_crawl_duration_seconds",
        "gauge",
        "How long the latest crawl of the swarm took.",
        [({}, snapshot.crawl_seconds)] if crawled else [],
    )
    out.family(
        "blockswarm_monitor_last_crawl_timestamp_seconds",
        "gauge",
        "Unix time when the latest crawl began.",
        [({}, snapshot.taken_at)] if crawled else [],
    )
    out.family(
        "blockswarm_monitor_crawl_ok",
        "gauge",
        "1 if the latest crawl could read the DHT, else 0.",
        [({}, int(snapshot.error is None))] if crawled else [],
    )
    return "\n".join(out.lines) + "\n"


def _peer_states(peers: list[PeerRecord]) -> dict[str, int]:
    counts = {state.value: 0 for state in ServerState} | {"unreachable": 0}
    for peer in peers:
        counts["unreachable" if peer.reachable is False else peer.state.value] += 1
    return counts
