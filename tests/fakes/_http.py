"""A threaded HTTP server on 127.0.0.1 with an ephemeral port, shared by the fakes."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Request:
    """One request as the fake received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    """What a fake route returns."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
        all_headers = {"Content-Type": "application/json"}
        all_headers.update(headers or {})
        return cls(status, json.dumps(payload).encode("utf-8"), all_headers)


Handler = Callable[[Request], Response]


class DropConnection(Exception):
    """Raised by a route to close the connection without sending a response."""


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is expected in failure tests.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class LoopbackServer:
    """Run `handle` for every request in a daemon thread until `stop()`."""

    def __init__(self, handle: Handler) -> None:
        self._handle = handle
        self._server = _QuietServer(("127.0.0.1", 0), _make_handler_class(handle))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _make_handler_class(handle: Handler) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _dispatch(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            request = Request(
                method=self.command,
                path=parts.path,
                query=parts.query,
                headers={name.lower(): value for name, value in self.headers.items()},
                body=body,
            )
            try:
                response = handle(request)
            except DropConnection:
                self.close_connection = True
                return
            except Exception as exc:  # a bug in a fake must show up as a 500, not a hung client
                response = Response.json(500, {"message": f"fake server error: {exc!r}"})
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - name fixed by the base class
            return

    return _Handler
