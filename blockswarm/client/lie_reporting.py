"""Publishing the lies a client's spot checks caught, so the swarm's monitor can show them."""

from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from blockswarm.dht import PeerReport, ReportReason, SwarmNode, report_peer
from blockswarm.pipeline.verification import LieReport

logger = logging.getLogger(__name__)

REPORT_TTL = 3600.0  # seconds a report stays in the DHT: the monitor shows the last hour's


class LieReporter:
    """A Verifier's `on_report`: stores confirmed lies in the DHT, off the event loop.

    An unconfirmed report (two peers disagreed and nobody could settle it) may accuse an honest peer, so it
    stays in this client.
    """

    def __init__(self, node: SwarmNode, model_name: str, timeout: float = 30.0):
        self.node = node
        self.model_name = model_name
        self.timeout = timeout
        self._pending: set[asyncio.Future] = set()

    def __call__(self, report: LieReport) -> None:
        if not report.confirmed:
            return
        future = asyncio.get_running_loop().run_in_executor(None, self.publish, report)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    async def flush(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the reports still being published (before the DHT node stops)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)

    def publish(self, report: LieReport) -> bool:
        """Store `report` in the DHT; False (logged) when the DHT did not take it."""
        record = PeerReport(
            reason=ReportReason.WRONG_OUTPUT, start=report.start, end=report.end, reported_at=report.detected_at
        )
        try:
            stored = report_peer(
                self.node.dht,
                self.model_name,
                PeerID.from_base58(report.peer_id),
                record,
                self.node.owner_marker,
                get_dht_time() + REPORT_TTL,
                timeout=self.timeout,
            )
        except Exception as e:  # a dead or hung DHT: reporting is best effort, generation goes on
            logger.warning("could not report peer %s to the swarm: %s", report.peer_id, str(e) or type(e).__name__)
            return False
        if not stored:
            logger.warning("the DHT did not take the report about peer %s", report.peer_id)
        return stored
