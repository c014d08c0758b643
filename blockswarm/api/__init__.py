"""The OpenAI-compatible API server: `blockswarm serve-api` (see docs/architecture.md, "API server")."""

from .server import ApiServer, run_api_server, start_api_server

__all__ = ["ApiServer", "run_api_server", "start_api_server"]
