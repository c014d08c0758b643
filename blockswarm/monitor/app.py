"""Wires the monitor together: a client-mode DHT node, the crawler thread and the HTTP server."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

from hivemind.dht import DHT

from blockswarm.dht import NodeRole, start_dht

from .crawler import Crawler
from .state import History
from .web import MonitorHTTPServer


@dataclass
class Monitor:
    dht: DHT
    crawler: Crawler
    http: MonitorHTTPServer

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}/"

    def serve_forever(self) -> None:
        self.http.serve_forever()

    def stop(self) -> None:
        """Stop serve_forever running in another thread, then close."""
        self.http.shutdown()
        self.close()

    def close(self) -> None:
        self.http.server_close()
        self.crawler.stop()
        self.dht.shutdown()


def start_monitor(
    initial_peers: list[str],
    host: str = "0.0.0.0",
    port: int = 8080,
    period: float = 30.0,
    info_timeout: float = 5.0,
    history_seconds: float = 3600.0,
) -> Monitor:
    """Join the swarm as a DHT client, start crawling, and bind (not yet serve) the HTTP server."""
    # the DHT process is forked before any thread of ours starts
    dht = start_dht(NodeRole.MONITOR, initial_peers).dht
    history = History(history_seconds)
    crawler = Crawler(dht, history, period=period, info_timeout=info_timeout)
    crawler.start()
    return Monitor(dht, crawler, MonitorHTTPServer((host, port), history, crawler))


def run_monitor(initial_peers: list[str], host: str, port: int, period: float, info_timeout: float) -> None:
    """Serve until SIGINT/SIGTERM."""
    monitor = start_monitor(initial_peers, host, port, period, info_timeout)
    print(f"blockswarm monitor ready: url={monitor.url}", flush=True)

    def stop(*_) -> None:
        # shutdown() waits for serve_forever to return, so it cannot run in the serving thread itself
        threading.Thread(target=monitor.http.shutdown, daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        monitor.serve_forever()
    finally:
        monitor.close()
