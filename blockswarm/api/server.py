"""`blockswarm serve-api`: a swarm client behind the OpenAI-compatible HTTP API."""

from __future__ import annotations

from dataclasses import dataclass

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.web_serving import WebServer

from .app import create_app
from .engine import TextGenerator


@dataclass
class ApiServer:
    model: DistributedModelForCausalLM
    model_name: str
    web: WebServer

    @property
    def url(self) -> str:
        return self.web.url

    def close(self) -> None:
        """Stop serving (when serving from a thread) and leave the swarm."""
        self.web.stop()
        self.model.close()


def start_api_server(
    model_path: str,
    initial_peers: list[str],
    host: str = "0.0.0.0",
    port: int = 8000,
    model_name: str | None = None,
    codec: str = "int8-blockwise",
    concurrency: int = 64,
) -> ApiServer:
    """Join the swarm as a client of `model_path` (as announced under `model_name`, derived from the checkpoint by
    default) and bind, not yet serve, the API; `ApiServer.web` serves it."""
    model = DistributedModelForCausalLM.from_pretrained(model_path, initial_peers, model_name=model_name, codec=codec)
    try:
        name = model.remote.model_name
        app = create_app(TextGenerator(model), name, concurrency)
        return ApiServer(model, name, WebServer(app, host, port))
    except BaseException:
        model.close()
        raise


def run_api_server(model_path: str, initial_peers: list[str], host: str, port: int, **options) -> None:
    """Serve until SIGINT/SIGTERM."""
    server = start_api_server(model_path, initial_peers, host, port, **options)
    print(f"blockswarm api ready: model={server.model_name} url={server.url}", flush=True)
    try:
        server.web.serve_forever()
    finally:
        server.model.close()
