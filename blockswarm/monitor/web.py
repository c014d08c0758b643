"""The monitor's HTTP server: the page, the JSON API and the Prometheus metrics, all from the latest crawl.

A threaded stdlib server is enough: every answer is rendered from an in-memory snapshot, and the only slow
route (`is_reachable` for a peer not checked lately) blocks just its own thread.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from hivemind.p2p import PeerID

from .crawler import Crawler
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import render_metrics
from .page import render_page
from .state import History

REACHABLE_PREFIX = "/api/v1/is_reachable/"


class MonitorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], history: History, crawler: Crawler):
        super().__init__(address, MonitorRequestHandler)
        self.history = history
        self.crawler = crawler


class MonitorRequestHandler(BaseHTTPRequestHandler):
    server: MonitorHTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        path = urlsplit(self.path).path
        history = self.server.history
        if path in ("/", "/index.html"):
            page = render_page(history.latest(), history.series(), self.server.crawler.period)
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", page)
        elif path == "/api/v1/state":
            self._send_json(HTTPStatus.OK, self._state())
        elif path.startswith(REACHABLE_PREFIX):
            self._is_reachable(unquote(path.removeprefix(REACHABLE_PREFIX)))
        elif path == "/metrics":
            self._send(HTTPStatus.OK, METRICS_CONTENT_TYPE, render_metrics(history.latest()))
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def _state(self) -> dict:
        snapshot = self.server.history.latest()
        series = self.server.history.series()
        return {
            "period": self.server.crawler.period,
            "snapshot": snapshot.model_dump(mode="json") if snapshot is not None else None,
            "history": {name: [point.model_dump(mode="json") for point in points] for name, points in series.items()},
        }

    def _is_reachable(self, text: str) -> None:
        try:
            peer_id = PeerID.from_base58(text)
        except Exception:  # whatever the base58/multihash decoders raise for garbage
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"not a base58 peer id: {text!r}"})
            return
        result = self.server.crawler.is_reachable(peer_id)
        self._send_json(HTTPStatus.OK, {"peer_id": peer_id.to_base58(), **result.model_dump(mode="json")})

    def _send_json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, "application/json", json.dumps(payload))

    def _send(self, status: HTTPStatus, content_type: str, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the signature http.server calls
        logging.getLogger(__name__).debug("%s " + format, self.address_string(), *args)
