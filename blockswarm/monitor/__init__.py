"""Swarm health monitor: crawls the DHT, pings peers, serves a page, a JSON API and Prometheus metrics.

Reads `dht` and `wire`; nothing imports it but `cli/`.
"""

from .app import Monitor, run_monitor, start_monitor

__all__ = ["Monitor", "run_monitor", "start_monitor"]
