"""The monitor's web app: the page, the JSON API and the Prometheus metrics, all from the latest crawl.

Every answer is rendered from an in-memory snapshot, except `is_reachable` for a peer not checked lately: that
one waits seconds for an `info` call, so it is a plain `def` route, which FastAPI runs in its thread pool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from hivemind.p2p import PeerID
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from .crawler import Crawler
from .metrics import metrics_registry
from .page import render_page
from .state import History


def create_app(history: History, crawler: Crawler) -> FastAPI:
    """The monitor's routes over `history`, which `crawler` fills."""
    app = FastAPI(title="blockswarm monitor", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    registry = metrics_registry(history)

    @app.middleware("http")
    async def no_store(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"  # every answer is the state of now
        return response

    @app.exception_handler(HTTPException)
    async def as_json(request: Request, error: HTTPException) -> JSONResponse:
        """Errors of routing in the shape of the API's own: `{"error": ...}`."""
        message = f"no such page: {request.url.path}" if error.status_code == 404 else str(error.detail)
        return JSONResponse({"error": message}, status_code=error.status_code)

    @app.get("/", response_class=HTMLResponse)
    @app.get("/index.html", response_class=HTMLResponse)
    async def page() -> str:
        return render_page(history.latest(), history.series(), crawler.period)

    @app.get("/api/v1/state")
    async def state() -> dict:
        snapshot = history.latest()
        return {
            "period": crawler.period,
            "snapshot": snapshot.model_dump(mode="json") if snapshot is not None else None,
            "history": {name: [p.model_dump(mode="json") for p in points] for name, points in history.series().items()},
        }

    @app.get("/api/v1/is_reachable/{text:path}")
    def is_reachable(text: str) -> JSONResponse:
        try:
            peer_id = PeerID.from_base58(text)
        except Exception:  # whatever the base58/multihash decoders raise for garbage
            return JSONResponse({"error": f"not a base58 peer id: {text!r}"}, status_code=400)
        result = crawler.is_reachable(peer_id)
        return JSONResponse({"peer_id": peer_id.to_base58(), **result.model_dump(mode="json")})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
