"""Swarm health monitor: crawls the DHT, pings peers, serves a page, a JSON API and Prometheus metrics.

Reads `dht`, `wire` and the shared `web_serving`; nothing imports it but `cli/`.
"""

from .app import Monitor, run_monitor, start_monitor

__all__ = ["Monitor", "run_monitor", "start_monitor"]
