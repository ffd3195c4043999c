"""Talking to the tracking server so that a dead or flaky server costs seconds, not minutes.

Every call that reaches the server goes through :func:`retry` (3 attempts, 1 s and 2 s back-off) with
MLflow's own HTTP retries lowered (:data:`HTTP_ENV_DEFAULTS`), then fails with :class:`TrackingError`
naming the URI and the fixes. API errors (bad request, not found) are not retried: retrying cannot help.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from components.tracking.identity import tracking_uri

log = logging.getLogger(__name__)

RETRY_ATTEMPTS = 3
RETRY_BACKOFF_S = 1.0
# Lowered MLflow HTTP defaults (7 retries with exponential back-off and a 120 s timeout would make a step
# hang for minutes on a dead server). setdefault: values the user exported win.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

T = TypeVar("T")


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be reached (or keeps failing); the message says how to fix it."""


def redact_uri(uri: str) -> str:
    """The URI without its credentials, so it can go into logs and error messages."""
    parts = urlsplit(uri)
    if parts.password or parts.username:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    return uri


def _configure_http() -> None:
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


_TRANSIENT_NAMES = (
    "ConnectionError",
    "ConnectTimeout",
    "ConnectTimeoutError",
    "NewConnectionError",
    "MaxRetryError",
    "RetryError",
    "ReadTimeout",
    "Timeout",
    "TimeoutError",
    "EndpointConnectionError",
    "ConnectionRefusedError",
    "RemoteDisconnected",
    "ProtocolError",
)
_TRANSIENT_TEXT = (
    "connection refused",
    "failed to establish a new connection",
    "max retries exceeded",
    "connection aborted",
    "connection reset",
    "remote end closed connection",
    "timed out",
    "database is locked",
    "temporarily unavailable",
    "502 bad gateway",
    "503 service unavailable",
    "504 gateway",
)


def is_transient(err: BaseException) -> bool:
    """Connection-level / server-overload failures (worth retrying), as opposed to API errors.

    Matched by class name and message along the cause chain, because MLflow, requests, urllib3 and boto
    wrap each other's errors and need not be importable here.
    """
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        code = getattr(e, "error_code", None)
        if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        status = getattr(e, "get_http_status_code", None)
        if callable(status):
            try:
                if int(status()) in (502, 503, 504):
                    return True
            except Exception:
                pass
        text = str(e).lower()
        if any(t in text for t in _TRANSIENT_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _fix_hint(uri: str) -> str:
    return (
        f"MLflow tracking at {redact_uri(uri)} is unreachable. Fix: start the tracking server "
        "(e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000`), point "
        "MLFLOW_TRACKING_URI at a running one (unset it to use sqlite:///<repo>/mlflow.db), or set "
        "`pipeline.tracking: false` in params.yaml to run without tracking."
    )


def retry(uri: str, what: str, fn: Callable[[], T]) -> T:
    """Call `fn`; retry transient failures (bounded), then raise TrackingError. API errors pass through."""
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return fn()
        except TrackingError:
            raise
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == RETRY_ATTEMPTS:
                raise TrackingError(
                    f"{_fix_hint(uri)} ({what} failed {RETRY_ATTEMPTS} times; last error: "
                    f"{type(err).__name__}: {str(err)[:500]})"
                ) from err
            delay = RETRY_BACKOFF_S * 2 ** (attempt - 1)
            log.warning(
                "MLflow %s failed (%s); retry %d/%d in %.0f s", what, err, attempt, RETRY_ATTEMPTS - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def mlflow_client(uri: str) -> Any:
    """An MlflowClient for `uri` with the lowered HTTP retries; mlflow is imported only when needed."""
    from mlflow.tracking import MlflowClient

    _configure_http()
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def check_reachable(uri: str | None = None) -> None:
    """One cheap request (bounded retry) so a step fails fast, before its expensive work."""
    uri = uri or tracking_uri()
    client = mlflow_client(uri)
    retry(uri, "connect", lambda: client.search_experiments(max_results=1))
