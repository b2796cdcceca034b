"""Webhook receiver for ``soup watch --webhook HOST:PORT``: registry events trigger a tick at once.

Two senders are understood, on any path, by POST:

- **Hugging Face Hub** webhooks: the secret configured on the webhook arrives in the
  ``X-Webhook-Secret`` header and is compared in constant time (``hmac.compare_digest``). Events of
  scope ``repo.content`` on a model repo (a push) become an ``Event("hub", "owner/name")``.
- **MLflow** registry webhooks (MLflow 3): the body is signed, ``X-MLflow-Signature: v1,<base64
  HMAC-SHA256 of "<delivery id>.<timestamp>.<body>">``; the signature is checked in constant time
  and the timestamp must be within 5 minutes. ``model_version.created`` (and an alias or tag set on
  a version) become an ``Event("mlflow", NAME)``.

A missing or wrong secret is answered 401 (nothing else happens); a well-signed event is handed to
``on_event``, which says whether it concerns the recipe: 202 ``{"status": "queued"}`` or 200
``{"status": "ignored"}``. Any other well-signed event is acknowledged and ignored. The server is
the standard library's ``http.server`` in a daemon thread; the tick itself runs in the watcher's
main thread. The secret is never printed or logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from soup.errors import RecipeError, SoupError
from soup.registry import Event

__all__ = ["WebhookServer", "parse_address", "mlflow_signature"]

MAX_BODY = 1 << 20  # webhook payloads are small
MAX_SKEW = 300  # seconds an MLflow delivery's timestamp may be off
MLFLOW_EVENTS = {("model_version", "created"), ("model_version_alias", "created"), ("model_version_tag", "set")}


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0: any free port)."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise RecipeError(f"--webhook: {text!r} must be HOST:PORT, e.g. 127.0.0.1:8765")
    return host, int(port)


def mlflow_signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` MLflow sends for this delivery (``v1,<base64>``)."""
    mac = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class WebhookServer:
    """Receive registry webhooks on ``address`` and pass matching events to ``on_event``.

    Args:
        address: ``HOST:PORT``.
        secret: the shared secret (the hub's webhook secret; the MLflow webhook's signing secret).
        on_event: called in a server thread with each authenticated event; returns whether a tick
            was queued for it.
    """

    def __init__(self, address: str, secret: str, on_event: Callable[[Event], bool]) -> None:
        if not secret:
            raise RecipeError("--webhook: a secret is required (--webhook-secret or SOUP_WEBHOOK_SECRET)")
        host, port = parse_address(address)
        handler = type("Handler", (_Handler,), {"secret": secret.encode(), "on_event": staticmethod(on_event)})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise SoupError(f"--webhook: cannot listen on {address} ({e.strerror or e})") from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="soup-webhooks", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    secret: bytes
    on_event: Callable[[Event], bool]
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a connection may stay silent (a sender that never finishes its request is dropped)

    def log_message(self, format: str, *args: Any) -> None:  # the watcher logs ticks, not requests
        pass

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # a liveness probe
        self._reply(200, {"status": "ok"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            self._reply(413, {"error": "payload too large"})
            return
        body = self.rfile.read(length)
        if not self._authentic(body):
            self._reply(401, {"error": "unauthorized"})
            return
        try:
            payload = json.loads(body)
        except ValueError:
            self._reply(400, {"error": "not JSON"})
            return
        event = _event(payload, mlflow=self.headers.get("X-MLflow-Signature") is not None)
        if event is None:
            self._reply(200, {"status": "ignored"})
            return
        queued = self.on_event(event)
        self._reply(202 if queued else 200, {"status": "queued" if queued else "ignored"})

    def _authentic(self, body: bytes) -> bool:
        signature = self.headers.get("X-MLflow-Signature")
        if signature is not None:
            delivery = self.headers.get("X-MLflow-Delivery-Id", "")
            stamp = self.headers.get("X-MLflow-Timestamp", "")
            fresh = stamp.isdigit() and abs(time.time() - int(stamp)) <= MAX_SKEW
            expected = mlflow_signature(self.secret.decode(), delivery, stamp, body)
            return hmac.compare_digest(signature.encode(), expected.encode()) and fresh
        given = self.headers.get("X-Webhook-Secret")
        return given is not None and hmac.compare_digest(given.encode(), self.secret)


def _event(payload: Any, *, mlflow: bool) -> Event | None:
    """The event a payload describes, if it is one that can change an ingredient query."""
    if not isinstance(payload, dict):
        return None
    if mlflow:
        data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
        if (payload.get("entity"), payload.get("action")) in MLFLOW_EVENTS and isinstance(data.get("name"), str):
            return Event("mlflow", data["name"], f"{payload['entity']}.{payload['action']}")
        return None
    event, repo = payload.get("event"), payload.get("repo")
    if not isinstance(event, dict) or not isinstance(repo, dict):
        return None
    if event.get("scope") == "repo.content" and repo.get("type") == "model" and isinstance(repo.get("name"), str):
        return Event("hub", repo["name"], "repo.content")
    return None
