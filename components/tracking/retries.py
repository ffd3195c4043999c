"""Talking to the tracking server so that a dead, silent, foreign or contended server costs seconds, not
minutes, and never a lost write.

Every call that reaches the server goes through :func:`retry`:

* **A total deadline.** One call (its attempts, MLflow's own HTTP retries and the back-off between them)
  takes at most ``DAFT_TRACKING_TIMEOUT_S`` seconds (default 30; :func:`tracking_timeout_s`). Each attempt
  runs with MLflow's HTTP timeout cut to what is left (``MLFLOW_HTTP_REQUEST_TIMEOUT``, also honoured as
  a cap when exported) and MLflow's own retries off (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` during the
  call: this loop retries instead, within the deadline). A server that accepts connections and never
  answers therefore fails the step within the budget, with :class:`TrackingError` naming the URI and the
  fixes.
* **Transient failures** (refused / reset connections, timeouts, 502/503/504, a locked sqlite database)
  are retried up to :data:`RETRY_ATTEMPTS` times with jittered exponential back-off.
* **Write conflicts** (a unique constraint violated because another process wrote the same row first:
  ``sqlite3.IntegrityError UNIQUE constraint failed`` on datasets, model versions, ...) are retried up to
  :data:`CONFLICT_ATTEMPTS` times with full-jitter back-off, so N processes registering versions of one
  model all land.
* **Not an MLflow server** (HTML, 404 for the REST API, a non-JSON body) and **refused credentials**
  (401/403) fail at once with a TrackingError saying what to fix.
* Other API errors (bad request, not found, already exists) pass through unchanged: retrying cannot help
  and callers handle some of them.

URIs and error texts in messages and logs go through :func:`~components.tracking.redaction.redact`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from components.tracking.identity import (
    ALLOW_LOCAL_ENV,
    in_pod,
    is_local_store,
    local_store_allowed,
    tracking_uri,
)
from components.tracking.redaction import install_log_redaction, redact

log = logging.getLogger(__name__)

TIMEOUT_ENV = "DAFT_TRACKING_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0
RETRY_ATTEMPTS = 3
RETRY_BACKOFF_S = 1.0
CONFLICT_ATTEMPTS = 8
CONFLICT_BACKOFF_S = 0.2  # first conflict back-off; doubles, full jitter, capped at CONFLICT_MAX_BACKOFF_S
CONFLICT_MAX_BACKOFF_S = 2.0
MIN_ATTEMPT_S = 1.0  # the shortest attempt worth making (MLflow's HTTP timeout is whole seconds)
MAX_DETAIL = 150  # characters of an underlying error quoted in a TrackingError
# MLflow's HTTP retry settings for calls outside retry() (its default, 7 retries with exponential back-off,
# would make a stray call hang for minutes on a dead server). setdefault: values the user exported win.
# Inside retry() they are overridden per attempt (see the module docstring).
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
HTTP_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"

T = TypeVar("T")


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be reached (or keeps failing); the message says how to fix it.

    ``unreachable`` is True when the server did not answer at all (connection refused / reset / timed
    out): nothing more should be sent to it (a failed step does not try to mark its run FAILED)."""

    unreachable: bool = False


def tracking_timeout_s() -> float:
    """The time budget of one tracking call, from ``DAFT_TRACKING_TIMEOUT_S`` (default 30 s)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise TrackingError(
            f"{TIMEOUT_ENV}={raw[:40]!r} is not a positive number of seconds; set it to e.g. 30 "
            "(the most one tracking call may take before the step fails) or unset it"
        )
    return value


def redact_uri(uri: str) -> str:
    """The URI without its credentials (user/password, query tokens), for logs and error messages."""
    parts = urlsplit(uri)
    if parts.password or parts.username:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        uri = urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    return redact(uri)


def _configure_http() -> None:
    install_log_redaction()
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def bounded_http(seconds: float) -> Iterator[None]:
    """MLflow HTTP requests made inside take at most ~`seconds` each (timeout cut, MLflow retries off).

    MLflow reads these variables on every request, so setting them around a call bounds it. An exported
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` lower than `seconds` still applies.
    """
    timeout = max(1, int(seconds))
    exported = os.environ.get(HTTP_TIMEOUT_ENV, "").strip()
    with contextlib.suppress(ValueError):
        if exported and int(exported) > 0:
            timeout = min(timeout, int(exported))
    saved = {k: os.environ.get(k) for k in (HTTP_TIMEOUT_ENV, "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}
    os.environ[HTTP_TIMEOUT_ENV] = str(timeout)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_TRANSIENT_NAMES = (
    "ConnectionError",
    "ConnectTimeout",
    "ConnectTimeoutError",
    "NewConnectionError",
    "MaxRetryError",
    "RetryError",
    "ReadTimeout",
    "ReadTimeoutError",
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
    "database table is locked",
    "temporarily unavailable",
    "502 bad gateway",
    "503 service unavailable",
    "504 gateway",
    "error code 502",
    "error code 503",
    "error code 504",
    "too many 502 error responses",
    "too many 503 error responses",
    "too many 504 error responses",
    "too many 429 error responses",
)
# Another writer got there first: the transaction was rolled back and the same call succeeds when repeated
# (it then sees the row the other process wrote, or takes the next version number).
_CONFLICT_TEXT = (
    "unique constraint failed",  # sqlite
    "integrityerror",  # sqlalchemy, any backend
    "duplicate key value violates unique constraint",  # postgres
    "duplicate entry",  # mysql
    "model version creation error",  # MLflow's own 3 version-number retries exhausted
    "deadlock detected",
    "deadlock found",
    "could not serialize access",
)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _http_status(e: BaseException) -> int | None:
    status = getattr(e, "get_http_status_code", None)
    if callable(status):
        try:
            return int(status())
        except Exception:
            return None
    return None


def is_transient(err: BaseException) -> bool:
    """Connection-level / server-overload failures (worth retrying), as opposed to API errors.

    Matched by class name and message along the cause chain, because MLflow, requests, urllib3 and boto
    wrap each other's errors and need not be importable here.
    """
    for e in _chain(err):
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        if getattr(e, "error_code", None) in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        if _http_status(e) in (502, 503, 504):
            return True
        text = str(e).lower()
        if any(t in text for t in _TRANSIENT_TEXT):
            return True
    return False


# API answers that quote the constraint but are final: the caller handles them (e.g. an experiment created
# by a concurrent step: ensure_experiment then reads it), and repeating the call would fail the same way.
_FINAL_CODES = ("RESOURCE_ALREADY_EXISTS", "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def is_conflict(err: BaseException) -> bool:
    """A concurrent writer violated a unique constraint first (retrying the call succeeds)."""
    if getattr(err, "error_code", None) in _FINAL_CODES:
        return False
    return any(any(t in str(e).lower() for t in _CONFLICT_TEXT) for e in _chain(err))


_NON_JSON_STATUS = re.compile(r"failed with error code (\d{3}) != \d{3}\. Response body: '(.*)", re.S)
_NOT_JSON = "response body was not in a valid json format"


def _foreign_server(err: BaseException) -> tuple[str, int | None] | None:
    """('auth'|'foreign', HTTP status) when the answer did not come from an MLflow REST API."""
    for e in _chain(err):
        text = str(e)
        if _NOT_JSON in text.lower():
            return "foreign", 200
        m = _NON_JSON_STATUS.search(text)
        if m:
            status = int(m.group(1))
            if status in (401, 403):
                return "auth", status
            if status in (404, 405, 400) or m.group(2).lstrip().startswith("<"):
                return "foreign", status
    return None


def _detail(err: BaseException) -> str:
    """`Type: message`, credentials masked, one line, cut in the middle to about MAX_DETAIL characters
    (the end of a wrapped HTTP error, e.g. "Read timed out", is the informative part)."""
    text = " ".join(redact(str(err)).split())
    if len(text) > MAX_DETAIL:
        head = MAX_DETAIL // 3
        text = f"{text[:head]} … {text[-(MAX_DETAIL - head - 3) :]}"
    return f"{type(err).__name__}: {text}"


def _unreachable(uri: str, detail: str) -> str:
    return (
        f"MLflow tracking at {redact_uri(uri)} is unreachable ({detail}). Fix: start the tracking server or "
        "point MLFLOW_TRACKING_URI at a running one (unset it for sqlite:///<repo>/mlflow.db), raise "
        f"{TIMEOUT_ENV} for a slow one, or set `pipeline.tracking: false` in params.yaml."
    )


def _answer(err: BaseException) -> str:
    """What the server answered, without echoing its body: the request line and the kind of body."""
    for e in _chain(err):
        text = str(e)
        head, sep, body = text.partition("Response body: ")
        if sep:
            body = body.strip().strip("'\"").lstrip()
            kind = (
                "an HTML page" if body.startswith("<") else "an empty body" if not body else "a non-JSON body"
            )
            request = " ".join(redact(head).split()).rstrip(". ")
            if len(request) > MAX_DETAIL:
                request = request[: MAX_DETAIL - 1] + "…"
            return f"{request}; the server sent {kind}"
    return _detail(err)


def _foreign_error(uri: str, what: str, kind: str, status: int | None, err: BaseException) -> TrackingError:
    if kind == "auth":
        return TrackingError(
            f"MLflow tracking at {redact_uri(uri)} refused the credentials (HTTP {status}, {what}: "
            f"{_answer(err)}). Fix: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN) for that server, or set `pipeline.tracking: false`."
        )
    return TrackingError(
        f"{redact_uri(uri)} does not answer like an MLflow tracking server (HTTP {status}, {what}: "
        f"{_answer(err)}). Fix: point MLFLOW_TRACKING_URI at the MLflow server's base URL (e.g. "
        "http://host:5000, no UI or /api path), unset it for sqlite:///<repo>/mlflow.db, or set "
        "`pipeline.tracking: false`."
    )


def _transient_backoff(n: int) -> float:
    """Jittered exponential back-off before transient retry `n` (1-based): within [0.5, 1] x nominal."""
    return RETRY_BACKOFF_S * 2 ** (n - 1) * (0.5 + random.random() / 2)


def _conflict_backoff(n: int) -> float:
    """Full-jitter back-off before conflict retry `n`, so contending writers spread out."""
    return random.uniform(0, min(CONFLICT_MAX_BACKOFF_S, CONFLICT_BACKOFF_S * 2 ** (n - 1)))


def retry(uri: str, what: str, fn: Callable[[], T], *, budget_s: float | None = None) -> T:
    """Call `fn` within a total deadline (`budget_s`, default :func:`tracking_timeout_s`): retry transient
    failures and write conflicts, then raise TrackingError. API errors pass through."""
    budget = tracking_timeout_s() if budget_s is None else float(budget_s)
    t0 = time.monotonic()
    deadline = t0 + budget
    transient = conflicts = 0
    while True:
        remaining = deadline - time.monotonic()
        # Leave room for the attempts still allowed after this one (each at least MIN_ATTEMPT_S, plus the
        # nominal back-off before it): a silent server cannot eat the whole budget in the first attempt
        # when retries are still possible, and never more than the budget in total.
        later = range(transient + 1, RETRY_ATTEMPTS)
        reserve = sum(MIN_ATTEMPT_S + RETRY_BACKOFF_S * 2 ** (j - 1) for j in later)
        try:
            with bounded_http(max(MIN_ATTEMPT_S, min(remaining, remaining - reserve))):
                return fn()
        except TrackingError:
            raise
        except Exception as err:
            foreign = _foreign_server(err)
            if foreign is not None:
                raise _foreign_error(uri, what, *foreign, err) from err
            if is_conflict(err):
                conflicts += 1
                kind, limit, delay = "conflict", CONFLICT_ATTEMPTS, _conflict_backoff(conflicts)
                tries = conflicts
            elif is_transient(err):
                transient += 1
                kind, limit, delay = "transient", RETRY_ATTEMPTS, _transient_backoff(transient)
                tries = transient
            else:
                raise
            elapsed = time.monotonic() - t0
            left = deadline - time.monotonic()
            if tries >= limit or left < MIN_ATTEMPT_S:
                why = (
                    f"no success within {budget:g} s"
                    if left < MIN_ATTEMPT_S
                    else f"failed {tries} times in {elapsed:.1f} s"
                )
                if kind == "conflict":
                    raise TrackingError(
                        f"MLflow {what} at {redact_uri(uri)} kept conflicting with concurrent writers "
                        f"({why}); rerun the step. (last error: {_detail(err)})"
                    ) from err
                gone = TrackingError(_unreachable(uri, f"{what}: {why}; last error: {_detail(err)}"))
                gone.unreachable = True
                raise gone from err
            delay = max(0.0, min(delay, left - MIN_ATTEMPT_S))
            log.warning(
                "MLflow %s failed (%s, %s); retry %d/%d in %.1f s",
                what,
                kind,
                _detail(err),
                tries,
                limit - 1,
                delay,
            )
            time.sleep(delay)


_CLIENT_MODULES = ("mlflow", "requests", "urllib3", "sqlalchemy", "http.client")
_S3_MODULES = ("botocore", "boto3", "s3transfer")


def describe_tracking_error(err: BaseException) -> str | None:
    """One line (what failed, the fix) for an MLflow / HTTP / artifact-store error that escaped
    :func:`retry` (an API error, or a call made outside it); None when `err` is none of those.

    Recognised by the module of its class, so nothing is imported to test it.
    """
    modules = [c.__module__ for c in type(err).__mro__]
    if any(m.startswith(_S3_MODULES) for m in modules):
        return (
            f"the artifact store refused a transfer ({_detail(err)}). Fix: check the S3 credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), MLFLOW_S3_ENDPOINT_URL and the bucket, or set "
            "`pipeline.tracking: false`."
        )
    if not any(m.startswith(_CLIENT_MODULES) for m in modules):
        return None
    try:
        uri = tracking_uri()
    except Exception:
        uri = "the tracking server"
    foreign = _foreign_server(err)
    if foreign is not None:
        return str(_foreign_error(uri, "request", *foreign, err))
    if is_transient(err):
        return _unreachable(uri, f"last error: {_detail(err)}")
    text = str(err).lower()
    if "readonly database" in text or "unable to open database file" in text:
        return (
            f"cannot write the MLflow store {redact_uri(uri)} ({_detail(err)}). Fix: make its folder "
            "writable, point MLFLOW_TRACKING_URI at another store, or set `pipeline.tracking: false`."
        )
    if is_conflict(err):
        return (
            f"MLflow at {redact_uri(uri)} reported a write conflict with a concurrent process "
            f"({_detail(err)}). Fix: rerun the step."
        )
    code = getattr(err, "error_code", None)
    return (
        f"MLflow at {redact_uri(uri)} rejected a request ({code + ', ' if code else ''}{_detail(err)}). Fix: "
        "check MLFLOW_TRACKING_URI and the server's log, or set `pipeline.tracking: false`."
    )


def mlflow_client(uri: str) -> Any:
    """An MlflowClient for `uri` with bounded HTTP; mlflow is imported only when needed.

    For a sqlite store, the stores are created (which creates or migrates the database's tables) under a
    file lock: concurrent processes creating one fresh database (``dvc exp run --queue -j N``, parallel
    steps) otherwise collide in MLflow's migrations and fail.
    """
    from mlflow.tracking import MlflowClient

    _configure_http()
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or uri
    try:
        with _sqlite_init_lock(uri):
            client = MlflowClient(tracking_uri=uri, registry_uri=registry)  # creates the tracking store
            if registry.startswith("sqlite:"):
                client._get_registry_client()  # creates the registry store (its tables) under the lock too
    except Exception as err:
        if is_transient(err):
            raise TrackingError(_unreachable(uri, f"opening the store: {_detail(err)}")) from err
        raise TrackingError(
            f"cannot open the MLflow store {redact_uri(uri)}: {_detail(err)}. Fix: check MLFLOW_TRACKING_URI "
            "(and MLFLOW_REGISTRY_URI; a sqlite store's folder must be writable), or set "
            "`pipeline.tracking: false`."
        ) from err
    return client


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    import fcntl

    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        f = open(f"{path}.init.lock", "a+b")  # noqa: SIM115 - held for the block
    except OSError:  # read-only folder: MLflow itself will report the store as unusable
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sqlite_path(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return path if path.startswith("/") else os.path.abspath(path)


REGISTRY_ENV = "MLFLOW_REGISTRY_URI"
SERVER_EXAMPLE = "http://mlflow.mlflow.svc.cluster.local:5000"


def require_durable_store(uri: str | None = None) -> str:
    """`uri` (default :func:`~components.tracking.identity.tracking_uri`), or TrackingError when it (or
    ``MLFLOW_REGISTRY_URI``) is a local store (sqlite:, file:, a path, the default) and this process runs in
    a Kubernetes pod: the store would vanish with the pod, and every later step (the report's `champion`)
    would miss what this one logged. ``DAFT_ALLOW_LOCAL_TRACKING=1`` allows it (a persistent volume).

    Checked where a step's run starts (:func:`~components.tracking.tracker.step_run`), before any work.
    """
    uri = uri or tracking_uri()
    if not in_pod() or local_store_allowed():
        return uri
    registry = os.environ.get(REGISTRY_ENV, "").strip()
    if is_local_store(uri):
        env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        what = f"MLflow tracking store {redact_uri(uri)}" + ("" if env else " (MLFLOW_TRACKING_URI unset)")
    elif registry and is_local_store(registry):
        what = f"MLflow registry store {REGISTRY_ENV}={redact_uri(registry)}"
    else:
        return uri
    raise TrackingError(
        f"{what} is local to this Kubernetes pod and is lost with it (every run and model version of the "
        "step). Fix: set the `tracking_uri` pipeline parameter (e.g. "
        f"{SERVER_EXAMPLE}) or MLFLOW_TRACKING_URI on the pods (ConfigMap/secret env), or "
        f"`pipeline.tracking: false`; {ALLOW_LOCAL_ENV}=1 keeps a local store (e.g. on a persistent volume)."
    )


def check_reachable(uri: str | None = None) -> None:
    """One cheap request (bounded retry) so a step fails fast, before its expensive work."""
    uri = uri or tracking_uri()
    client = mlflow_client(uri)
    retry(uri, "connect", lambda: client.search_experiments(max_results=1))
