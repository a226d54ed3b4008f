"""``fastsae dashboard --serve``: the static site over HTTP, plus live encoding of text
typed in the prompt explorer.

A small threaded HTTP server (the standard library's), on the loopback address unless
told otherwise. It serves the files of the dashboard folder and two endpoints:

* ``GET /api/info`` -> ``{"live": true, "sae": ..., "top_n": ...}`` (the page asks this
  to know that it may send text);
* ``POST /api/encode`` with ``{"text": "..."}`` -> the explorer record of
  :func:`fastsae.dashboard.explorer.explore_text`; a bad request (not JSON, no text,
  text too long) is a 400 with ``{"error": "..."}``.

Encoding runs one request at a time (a lock around the model), so concurrent requests
queue rather than run the model on several threads.
"""

from __future__ import annotations

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fastsae.dashboard.explorer import MAX_PROMPT_CHARS, PromptEncoder

MAX_BODY_BYTES = 4 * MAX_PROMPT_CHARS + 1024


class DashboardRequestHandler(SimpleHTTPRequestHandler):
    """Files of the dashboard folder, ``/api/info`` and ``/api/encode``."""

    server: DashboardServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/api/info":
            self._send_json(200, self.server.info)
            return
        super().do_GET()

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/api/encode":
            self._send_json(404, {"error": f"no endpoint {self.path}; POST /api/encode"})
            return
        try:
            length = int(self.headers.get("content-length", "0"))
        except ValueError:
            self._send_json(400, {"error": "bad content-length"})
            return
        if length <= 0 or length > MAX_BODY_BYTES:
            self._send_json(400, {"error": f"the body must be 1 to {MAX_BODY_BYTES} bytes"})
            return
        try:
            request = json.loads(self.rfile.read(length))
        except ValueError as e:
            self._send_json(400, {"error": f"the body is not JSON: {e}"})
            return
        text = request.get("text") if isinstance(request, dict) else None
        if not isinstance(text, str):
            self._send_json(400, {"error": 'send {"text": "..."}'})
            return
        try:
            with self.server.lock:
                record = self.server.encoder(text)
        except ValueError as e:
            self._send_json(400, {"error": str(e)})
            return
        self._send_json(200, record)


class DashboardServer(ThreadingHTTPServer):
    """The dashboard folder ``root`` and its live encoder on ``(host, port)``; port 0
    takes a free one (:attr:`url` says which)."""

    daemon_threads = True

    def __init__(
        self,
        root: str | Path,
        encoder: PromptEncoder,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        verbose: bool = False,
    ):
        root = Path(root)
        if not (root / "index.html").is_file():
            raise FileNotFoundError(f"{root / 'index.html'} does not exist: build the site first")
        self.encoder = encoder
        self.lock = threading.Lock()
        self.verbose = verbose
        cfg = encoder.sae.cfg
        self.info = {
            "live": True,
            "sae": {"architecture": cfg.architecture(), "d_sae": cfg.d_sae},
            "top_n": encoder.top_n,
        }
        handler = partial(DashboardRequestHandler, directory=str(root))
        super().__init__((host, port), handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"


__all__ = ["DashboardRequestHandler", "DashboardServer"]
