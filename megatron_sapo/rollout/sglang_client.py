"""A small HTTP client for SGLang's native API: JSON over keep-alive connections, retries, clear errors.

Standard library only (http.client + threads), so the trainer environment needs nothing extra. Concurrency is
bounded by the caller's thread pool; every thread keeps one keep-alive connection per server.

Errors, each naming the server and the endpoint:
    SGLangUnreachable    connection refused / reset / timed out (retried with backoff, then raised)
    SGLangRequestError   the server rejected the request (HTTP 4xx): bad input, not retried
    SGLangServerError    HTTP 5xx (retried, then raised)
    SGLangAborted        the client was told to abort
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
import urllib.parse
from typing import Any


class SGLangError(RuntimeError):
    """Base class of everything the SGLang engine raises."""


class SGLangUnreachable(SGLangError):
    """The server could not be reached (refused, reset, timed out)."""


class SGLangServerError(SGLangError):
    """HTTP 5xx from the server."""


class SGLangRequestError(SGLangError, ValueError):
    """The server rejected the request as invalid (HTTP 4xx); retrying would not help."""


class SGLangAborted(SGLangError):
    """The request was aborted by the client (SGLangClient.abort)."""


RETRYABLE = (SGLangUnreachable, SGLangServerError)


class _NoDelayHTTPConnection(http.client.HTTPConnection):
    """http.client sends the headers and the body in two writes; on a kept-alive connection Nagle's algorithm
    would hold the body back until the server's delayed ACK of the headers. TCP_NODELAY sends it at once."""

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _NoDelayHTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")[:500]
    if isinstance(data, dict):
        for key in ("error", "message", "detail"):
            if key in data:
                value = data[key]
                return value.get("message", json.dumps(value)) if isinstance(value, dict) else str(value)
    return json.dumps(data)[:500]


class SGLangClient:
    """POST/GET JSON to SGLang servers.

    timeout_s: per request (socket timeout of one attempt); retries: extra attempts after a retryable failure,
    waiting backoff_s * 2**attempt (+-25% jitter) in between.
    """

    def __init__(self, timeout_s: float = 300.0, retries: int = 2, backoff_s: float = 0.5):
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self._local = threading.local()
        self._aborted = threading.Event()

    # ------------------------------------------------------------------------------------------------------
    def abort(self) -> None:
        """Make every request in flight (after its current attempt) and every new one raise SGLangAborted."""
        self._aborted.set()

    def reset_abort(self) -> None:
        self._aborted.clear()

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    # ------------------------------------------------------------------------------------------------------
    def _connection(self, url: str, timeout: float) -> http.client.HTTPConnection:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise SGLangRequestError(f"not an http(s) URL: {url!r} (rollout.sglang.urls)")
        key = (parsed.scheme, parsed.hostname, parsed.port)
        conn = pool.get(key)
        if conn is None:
            cls = _NoDelayHTTPSConnection if parsed.scheme == "https" else _NoDelayHTTPConnection
            conn = pool[key] = cls(parsed.hostname, parsed.port, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self, url: str) -> None:
        pool = getattr(self._local, "pool", {})
        parsed = urllib.parse.urlsplit(url)
        conn = pool.pop((parsed.scheme, parsed.hostname, parsed.port), None)
        if conn is not None:
            conn.close()

    def request_once(self, method: str, url: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """One attempt; returns the decoded JSON (or text) body."""
        if self._aborted.is_set():
            raise SGLangAborted(f"{method} {url}{path}: aborted")
        timeout = timeout or self.timeout_s
        where = f"{method} {url.rstrip('/')}{path}"
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn = self._connection(url, timeout)
            try:
                reused = conn.sock is not None
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if not reused:
                    raise
                # a kept-alive connection the server closed (idle timeout, or a restarted server): reconnect once
                self._drop(url)
                conn = self._connection(url, timeout)
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
            data = resp.read()
        except (ConnectionError, TimeoutError, http.client.HTTPException, OSError) as e:
            self._drop(url)
            kind = "timed out" if isinstance(e, (socket.timeout, TimeoutError)) else "failed"
            raise SGLangUnreachable(f"SGLang server {where} {kind}: {type(e).__name__}: {e}") from None
        if resp.status >= 500:
            raise SGLangServerError(f"SGLang server {where} answered HTTP {resp.status}: {_error_message(data)}")
        if resp.status >= 400:
            raise SGLangRequestError(f"SGLang server {where} rejected the request (HTTP {resp.status}): "
                                     f"{_error_message(data)}")  # fmt: skip
        try:
            return json.loads(data) if data else None
        except ValueError:
            return data.decode("utf-8", "replace")

    def request(self, method: str, url: str, path: str, body: Any = None, *, timeout: float | None = None,
                retries: int | None = None) -> Any:  # fmt: skip
        """request_once with retries and exponential backoff on unreachable servers and HTTP 5xx."""
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return self.request_once(method, url, path, body, timeout)
            except RETRYABLE:
                if attempt == retries or self._aborted.is_set():
                    raise
                delay = self.backoff_s * 2**attempt * random.uniform(0.75, 1.25)
                if self._aborted.wait(delay):
                    raise SGLangAborted(f"{method} {url}{path}: aborted") from None
        raise AssertionError("unreachable")

    def post(self, url: str, path: str, body: Any = None, **kw) -> Any:
        return self.request("POST", url, path, {} if body is None else body, **kw)

    def get(self, url: str, path: str, **kw) -> Any:
        return self.request("GET", url, path, None, **kw)

    def healthy(self, url: str, timeout: float = 5.0) -> bool:
        try:
            self.request_once("GET", url, "/health", timeout=timeout)
            return True
        except SGLangError:
            return False

    def wait_until(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise SGLangUnreachable(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.5)
