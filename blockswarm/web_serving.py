"""Serving an ASGI app with uvicorn on a socket bound up front: the one web stack of the monitor and the API server.

Binding before serving makes a busy port fail at once with a clear error, and lets `port=0` report the port the
system picked (tests and `LocalSwarm` use that).
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import uvicorn


class WebServer:
    def __init__(self, app, host: str = "0.0.0.0", port: int = 0, log_level: str = "warning"):
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as e:
            self.socket.close()
            raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
        self.socket.listen(2048)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        shown = "127.0.0.1" if host == "0.0.0.0" else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (when this is the main thread) or `stop()`, then return."""
        if threading.current_thread() is threading.main_thread():
            # uvicorn stops on these signals, then re-raises them to the handlers it found: Python's defaults would
            # kill the process (SIGTERM) or raise KeyboardInterrupt (SIGINT) before the caller could clean up.
            # Installed before serving, they also cover a signal that comes before uvicorn's own handlers are in.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._stop_serving)
        self.server.run(sockets=[self.socket])

    def _stop_serving(self, *_) -> None:
        self.server.should_exit = True

    def start_in_thread(self, timeout: float = 30.0) -> None:
        """Serve from a daemon thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="blockswarm-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the web server at {self.url} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving (from another thread than `serve_forever`'s) and close the socket."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()
