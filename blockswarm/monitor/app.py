"""Wires the monitor together: a client-mode DHT node, the crawler thread and the web server."""

from __future__ import annotations

from dataclasses import dataclass

from hivemind.dht import DHT

from blockswarm.dht import NodeRole, start_dht
from blockswarm.web_serving import WebServer

from .crawler import Crawler
from .state import History
from .web import create_app


@dataclass
class Monitor:
    dht: DHT
    crawler: Crawler
    web: WebServer

    @property
    def url(self) -> str:
        return self.web.url

    def serve_forever(self) -> None:
        """Serve in this thread; in the main thread, until SIGINT/SIGTERM."""
        self.web.serve_forever()

    def stop(self) -> None:
        """Stop serving (if it serves, in this thread or another) and release the socket, the crawler and the DHT."""
        self.web.stop()
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
    """Join the swarm as a DHT client, start crawling, and bind (not yet serve) the web server."""
    # the DHT process is forked before any thread of ours starts
    dht = start_dht(NodeRole.MONITOR, initial_peers).dht
    history = History(history_seconds)
    crawler = Crawler(dht, history, period=period, info_timeout=info_timeout)
    crawler.start()
    return Monitor(dht, crawler, WebServer(create_app(history, crawler), host, port))


def run_monitor(initial_peers: list[str], host: str, port: int, period: float, info_timeout: float) -> None:
    """Serve until SIGINT/SIGTERM."""
    monitor = start_monitor(initial_peers, host, port, period, info_timeout)
    print(f"blockswarm monitor ready: url={monitor.url}", flush=True)
    try:
        monitor.serve_forever()
    finally:
        monitor.stop()
