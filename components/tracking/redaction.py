"""Keeping credentials out of everything the project prints or logs.

A tracking URI may carry credentials (``http://user:pass@host``, ``s3://key:secret@bucket``, a presigned
URL's ``?X-Amz-Signature=...``, a ``?token=...``); MLflow, requests and urllib3 echo URIs in their messages
and logs. :func:`redact` removes them from any text; :func:`install_log_redaction` applies it to every log
record of the process (whichever logger, whichever handler, including MLflow's own, which do not propagate
to the root logger) and stops MLflow printing "View run ... at: <uri>" to stdout.

Pure stdlib, so the error path can use it without importing mlflow.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"

# scheme://userinfo@  (userinfo: anything up to the first '@' that is not a path, space or quote)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"<>()\[\]]+)@")
# Query parameters that carry a credential (case-insensitive).
SENSITIVE_QUERY_KEYS = (
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "auth",
    "authorization",
    "api_key",
    "api-key",
    "apikey",
    "key",
    "secret",
    "client_secret",
    "password",
    "passwd",
    "pwd",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "sessionid",
    "session_token",
)
_QUERY = re.compile(
    r"(?P<lead>[?&;](?:" + "|".join(re.escape(k) for k in SENSITIVE_QUERY_KEYS) + r")=)[^&#\s'\"<>]+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<lead>\bBearer\s+)[A-Za-z0-9._~+/=\-]{8,}", re.IGNORECASE)
_AUTH_HEADER = re.compile(r"(?P<lead>['\"]?Authorization['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+(\s+[^'\"\s,}]+)?")
# Environment variables whose values are credentials; their literal values are masked wherever they appear.
SECRET_ENV_VARS = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_CLIENT_SECRET",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "KF_PIPELINES_TOKEN",
)
_MIN_SECRET_LEN = 8  # shorter values (test fixtures' "testing") would mask ordinary words


def redact(text: Any) -> str:
    """`text` (any object, as str) with credentials in URIs, query strings, auth headers and the values of
    :data:`SECRET_ENV_VARS` replaced by ``***``."""
    s = text if isinstance(text, str) else str(text)
    if not s:
        return s
    s = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", s)
    s = _QUERY.sub(lambda m: f"{m.group('lead')}{MASK}", s)
    s = _BEARER.sub(lambda m: f"{m.group('lead')}{MASK}", s)
    s = _AUTH_HEADER.sub(lambda m: f"{m.group('lead')}{MASK}", s)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= _MIN_SECRET_LEN and value in s:
            s = s.replace(value, MASK)
    return s


def has_credentials(uri: str) -> bool:
    """True when `uri` carries a user/password, a token in its query, or a signed-URL signature."""
    return redact(uri) != uri


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------

_installed = False


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it to the handler's own error reporting
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        # Formatted now, so the traceback text (which repeats exception messages) is redacted too.
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))


class RedactingFilter(logging.Filter):
    """A handler/logger filter that masks credentials in the record (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


def install_log_redaction() -> None:
    """Mask credentials in every log record of this process, and silence MLflow's stdout run links.

    A record factory rather than handler filters: MLflow replaces its loggers' handlers when it is imported
    (after this runs) and they do not propagate, so a filter on today's handlers would miss them. MLflow's
    "🏃 View run ... at: <tracking uri>" lines are ``sys.stdout.write`` calls, not log records; they are
    turned off with ``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT`` (the step logs its run id and the redacted
    URI itself). Idempotent.
    """
    global _installed
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _redact_record(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
