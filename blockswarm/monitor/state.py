"""What one crawl saw, as the JSON records the page, the API and the metrics are all made from.

A block counts as covered only by peers that announce it ONLINE *and* answered the monitor's `info` call:
a peer that died without saying so still has an ONLINE record until it expires, but serves nobody.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from hivemind.p2p import PeerID
from pydantic import BaseModel

from blockswarm.dht import ModelInfo, PeerReport, ReportReason, ServerInfo, ServerState


class Reachability(BaseModel):
    """Result of one `info` call to a peer."""

    reachable: bool
    checked_at: float
    rtt_ms: float | None = None
    error: str | None = None
    training_step: int | None = None  # the optimizer steps of its SWARM stage, as it replied; None when frozen
    memory_per_block: int | None = None  # bytes it keeps resident per served block, as it replied


class PeerRecord(BaseModel):
    """A peer of one model: its DHT record plus whether the monitor could reach it."""

    peer_id: str
    short_id: str
    public_name: str | None
    state: ServerState
    start: int
    end: int
    throughput: float
    inference_rps: float | None
    forward_rps: float | None
    dtype: str
    quant: str
    codecs: list[str]
    version: str
    cache_tokens_left: int
    active_sessions: int  # inference sessions open when the peer last announced itself
    queued_requests: int  # requests waiting for its compute then
    next_pings: dict[str, float]
    using_relay: bool  # announced: others cannot dial it directly, so it is reached through a circuit relay
    reachable: bool | None  # None: not asked, because the peer does not announce itself ONLINE
    rtt_ms: float | None
    error: str | None
    lie_reports: int = 0  # distinct clients whose spot checks caught it returning wrong outputs (unverified claims)
    training: bool = False  # a SWARM training peer (--train): its stage is its span [start, end)
    training_step: int | None = None  # its stage's optimizer steps, from its `info` reply
    memory_per_block: int | None = None  # resident bytes per served block, from its `info` reply

    @property
    def serving(self) -> bool:
        return self.state == ServerState.ONLINE and bool(self.reachable)


class BlockCoverage(BaseModel):
    index: int
    peers: int  # serving peers (ONLINE and reachable)
    throughput: float  # sum of their throughputs


class ModelState(BaseModel):
    name: str
    num_blocks: int
    family: str
    config_hash: str
    weights_hash: str
    healthy: bool  # every block is covered by at least one serving peer
    covered_blocks: int
    min_throughput: float  # of the weakest block: the swarm's bottleneck for this model
    avg_throughput: float  # over blocks
    total_throughput: float  # of all serving peers
    blocks: list[BlockCoverage]
    peers: list[PeerRecord]


class Snapshot(BaseModel):
    taken_at: float  # unix time when the crawl began
    crawl_seconds: float
    models: list[ModelState]
    error: str | None = None  # why the crawl failed, when it did


class HistoryPoint(BaseModel):
    """One model at one crawl, for the chart of the last hour."""

    taken_at: float
    covered_blocks: int
    total_throughput: float


def short_id(peer_id: str) -> str:
    """The tail of a base58 peer id: all peer ids share their first characters."""
    return "…" + peer_id[-6:]


def peer_record(
    peer_id: PeerID, info: ServerInfo, reachability: Reachability | None, lie_reports: int = 0
) -> PeerRecord:
    text = peer_id.to_base58()
    return PeerRecord(
        peer_id=text,
        short_id=short_id(text),
        lie_reports=lie_reports,
        reachable=reachability.reachable if reachability else None,
        rtt_ms=reachability.rtt_ms if reachability else None,
        error=reachability.error if reachability else None,
        training_step=reachability.training_step if reachability else None,
        memory_per_block=reachability.memory_per_block if reachability else None,
        **info.model_dump(
            include={
                "public_name",
                "state",
                "start",
                "end",
                "throughput",
                "inference_rps",
                "forward_rps",
                "dtype",
                "quant",
                "codecs",
                "version",
                "cache_tokens_left",
                "active_sessions",
                "queued_requests",
                "next_pings",
                "using_relay",
                "training",
            }
        ),
    )


def model_state(
    name: str,
    info: ModelInfo,
    blocks: list[dict[PeerID, ServerInfo]],
    reachability: dict[PeerID, Reachability],
    reports: dict[PeerID, list[PeerReport]] | None = None,
) -> ModelState:
    """Coverage and peers of a model from its block records (one dict per block), the `info` results and the
    clients' reports of wrong outputs."""
    reports = reports or {}
    peers: dict[PeerID, PeerRecord] = {}
    coverage = []
    for index, block in enumerate(blocks):
        serving = []
        for peer_id, server in block.items():
            # a result of an earlier crawl does not apply to a peer that has announced itself gone since
            checked = reachability.get(peer_id) if server.state == ServerState.ONLINE else None
            lies = sum(report.reason == ReportReason.WRONG_OUTPUT for report in reports.get(peer_id, []))
            record = peers.setdefault(peer_id, peer_record(peer_id, server, checked, lies))
            if record.serving:
                serving.append(record)
        coverage.append(
            BlockCoverage(index=index, peers=len(serving), throughput=sum(peer.throughput for peer in serving))
        )
    throughputs = [block.throughput for block in coverage] or [0.0]
    covered = sum(block.peers > 0 for block in coverage)
    return ModelState(
        name=name,
        num_blocks=info.num_blocks,
        family=info.family,
        config_hash=info.config_hash,
        weights_hash=info.weights_hash,
        healthy=covered == info.num_blocks,
        covered_blocks=covered,
        min_throughput=min(throughputs),
        avg_throughput=sum(throughputs) / len(throughputs),
        total_throughput=sum(peer.throughput for peer in peers.values() if peer.serving),
        blocks=coverage,
        peers=sorted(peers.values(), key=lambda peer: (peer.start, peer.end, peer.peer_id)),
    )


class History:
    """The snapshots of the last `seconds`, shared between the crawler thread and the HTTP threads."""

    def __init__(self, seconds: float = 3600.0):
        self.seconds = seconds
        self._snapshots: deque[Snapshot] = deque()
        self._lock = threading.Lock()

    def add(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshots.append(snapshot)
            while self._snapshots and self._snapshots[0].taken_at < time.time() - self.seconds:
                self._snapshots.popleft()

    def latest(self) -> Snapshot | None:
        with self._lock:
            return self._snapshots[-1] if self._snapshots else None

    def series(self) -> dict[str, list[HistoryPoint]]:
        """Model name -> its points over the kept snapshots, oldest first."""
        with self._lock:
            snapshots = list(self._snapshots)
        series: dict[str, list[HistoryPoint]] = {}
        for snapshot in snapshots:
            for model in snapshot.models:
                series.setdefault(model.name, []).append(
                    HistoryPoint(
                        taken_at=snapshot.taken_at,
                        covered_blocks=model.covered_blocks,
                        total_throughput=model.total_throughput,
                    )
                )
        return series
