"""`python -m pipelines submit`: create a run of the pipeline on a Kubeflow Pipelines (KFP v2) host.

Steps, each failing with one `error:` line (exit status 2) that says what to fix:

1. Where and how to connect (:func:`resolve_connection`): ``--host`` / ``$KF_PIPELINES_ENDPOINT``, else, in
   a pod (``KUBERNETES_SERVICE_HOST`` set), the in-cluster API :data:`IN_CLUSTER_HOST`. Credentials:
   ``--token`` / ``$KF_PIPELINES_TOKEN``, ``--cookie`` / ``$KF_PIPELINES_COOKIE`` (an SSO session, e.g.
   ``authservice_session=...``), else, in a pod, the KFP projected service-account token
   (:data:`KFP_SA_TOKEN_PATH`) or, for an in-cluster host only, the pod's Kubernetes service-account token.
2. With tracking on, the run needs an MLflow tracking server (:func:`require_tracking_server`), checked
   before the host is contacted.
3. One GET of the host's healthz (:func:`check_host`): unreachable host, a login page (an HTML answer, or
   a redirect) in front of the API, a refused token (401/403, with the server's explanation), and the
   backend version (refused below :data:`MIN_BACKEND`; unknown: a warning, and the submit goes on).
4. With ``kfp.Client``: the experiment (found by name, else created), then either the compiled spec inline
   in the run (the default), or, with ``--pipeline-name``, the package uploaded as a new version of that
   pipeline (the pipeline is created when missing) and the run made from that version. Every answer must
   be the API's JSON with the expected ids; anything else (an HTML login page, another service) is an
   error that names the host.
5. With ``--wait``: poll the run, print each state change, exit 0 on SUCCEEDED, :data:`EXIT_RUN_FAILED`
   when it ends otherwise, 2 after ``--timeout`` seconds (the run goes on; waiting never cancels it).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipelines.cli import (
    DEFAULT_PACKAGE,
    HEALTHZ_PATH,
    HOST_ENV,
    TOKEN_ENV,
    CliError,
    build_options,
    load_params_for,
    parse_pipeline_args,
)

COOKIE_ENV = "KF_PIPELINES_COOKIE"  # ours, like KF_PIPELINES_TOKEN: keeps the cookie out of `ps`
IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"  # the KFP API service, in a pod
KFP_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"  # projected, audience pipelines.kubeflow.org
K8S_SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
KFP_SA_TOKEN_ENV = "DAFT_KFP_SA_TOKEN_PATH"  # overrides (tests, unusual mounts); kfp's own variable:
KFP_SDK_SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
K8S_SA_TOKEN_ENV = "DAFT_K8S_SA_TOKEN_PATH"
HEALTHZ_V1_PATH = "/apis/v1beta1/healthz"
RUN_PATH = "/apis/v2beta1/runs/{run_id}"

MIN_BACKEND = (2, 5, 0)
MIN_BACKEND_WHY = (
    "the sweep collects artifacts from a dsl.ParallelFor with dsl.Collected (2.5), every step gets the run "
    "id (2.4), and the image runs as a non-root user (2.3)"
)
EXIT_RUN_FAILED = 3  # --wait: the run ended other than SUCCEEDED (0 ok, 1 bug, 2 error, 130 Ctrl-C)
SUCCEEDED = "SUCCEEDED"
ENDED_BADLY = ("FAILED", "CANCELED", "SKIPPED")  # V2beta1RuntimeState's other final states
POLL_RETRIES = 5  # --wait: consecutive unreachable / 5xx answers tolerated (an API pod restarting)
DETAIL_CHARS = 200  # a server's explanation, cut to this in the error line
LOGIN_WORDS = ("login", "log in", "sign in", "signin", "dex", "oauth", "authservice", "keycloak", "sso")
CREDENTIALS_HINT = (
    f"pass a token (--token / {TOKEN_ENV}) or a session cookie (--cookie / {COOKIE_ENV}, "
    "e.g. authservice_session=...)"
)


# --------------------------------------------------------------------------------------------------
# Connection: host and credentials
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    host: str
    token: str | None = None
    cookie: str | None = None
    token_file: str | None = None  # re-read on each poll: the kubelet rotates projected tokens
    origin: str = "--host"  # where the host came from: --host, $KF_PIPELINES_ENDPOINT, in-cluster default

    @property
    def credentials(self) -> str:
        if self.token_file:
            return f"the service-account token {self.token_file}"
        return " and ".join(n for n, v in (("a token", self.token), ("a session cookie", self.cookie)) if v)

    def current_token(self) -> str | None:
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip() or self.token
            except OSError:
                return self.token
        return self.token

    def headers(self) -> dict[str, str]:
        h = {"Accept": "application/json"}
        token = self.current_token()
        if token:
            h["Authorization"] = f"Bearer {token}"
        if self.cookie:
            h["Cookie"] = self.cookie
        return h


def in_pod(env: Mapping[str, str]) -> bool:
    """Kubernetes sets KUBERNETES_SERVICE_HOST in every container."""
    return bool(env.get("KUBERNETES_SERVICE_HOST"))


def _cluster_internal(host: str) -> bool:
    """A Service name (`ml-pipeline`, `ml-pipeline.kubeflow.svc.cluster.local`), not an outside address."""
    name = (urlsplit(host).hostname or "").lower()
    return bool(name) and ("." not in name or ".svc" in f"{name}." or name.endswith(".cluster.local"))


def _token_files(host: str, origin: str, env: Mapping[str, str]) -> list[str]:
    """The service-account token files to try, in order. The KFP projected token (audience-bound to Kubeflow
    Pipelines) goes to any host, as kfp.Client does; the pod's Kubernetes token, a cluster credential, only
    to the in-cluster API."""
    files = [env.get(KFP_SA_TOKEN_ENV) or env.get(KFP_SDK_SA_TOKEN_ENV) or KFP_SA_TOKEN_PATH]
    if origin == "in-cluster default" or _cluster_internal(host):
        files.append(env.get(K8S_SA_TOKEN_ENV) or K8S_SA_TOKEN_PATH)
    return files


def resolve_connection(
    host: str | None, token: str | None, cookie: str | None, env: Mapping[str, str] | None = None
) -> Connection:
    env = os.environ if env is None else env
    origin = "--host"
    if not host and env.get(HOST_ENV):
        host, origin = env[HOST_ENV], f"${HOST_ENV}"
    if not host:
        if not in_pod(env):
            raise CliError(
                f"no Kubeflow Pipelines host: pass --host URL or set {HOST_ENV} (in a pod the default is "
                f"{IN_CLUSTER_HOST})"
            )
        host, origin = IN_CLUSTER_HOST, "in-cluster default"
    token = token or env.get(TOKEN_ENV) or None
    cookie = cookie or env.get(COOKIE_ENV) or None
    if cookie and "=" not in cookie:
        cookie = f"authservice_session={cookie}"  # the bare value of Kubeflow's oidc-authservice cookie
    token_file = None
    if not token and not cookie and in_pod(env):
        for path in _token_files(host, origin, env):
            try:
                token = Path(path).read_text().strip() or None
            except FileNotFoundError:
                continue
            except OSError as e:
                raise CliError(
                    f"cannot read the service-account token {path} ({e.strerror}); pass --token (or "
                    f"{TOKEN_ENV})"
                ) from None
            if token:
                token_file = path
                break
    return Connection(host=host.rstrip("/"), token=token, cookie=cookie, token_file=token_file, origin=origin)


# --------------------------------------------------------------------------------------------------
# Answers: JSON or a clear error
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes
    location: str = ""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect from the API is a login proxy; following it would send the token to another host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _get(conn: Connection, path: str, timeout: float) -> Answer:
    """One GET of `path` on the host; CliError when it cannot be reached."""
    req = urllib.request.Request(conn.host + path, headers=conn.headers())
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return Answer(resp.status, resp.headers.get("Content-Type", ""), resp.read())
    except urllib.error.HTTPError as e:
        headers = e.headers or {}
        body = e.read() if e.fp is not None else b""
        return Answer(e.code, headers.get("Content-Type", ""), body or b"", headers.get("Location", ""))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _unreachable(conn, getattr(e, "reason", e)) from None


def _unreachable(conn: Connection, reason: Any) -> CliError:
    where = {
        "in-cluster default": f"the in-cluster default for a pod; pass --host (or {HOST_ENV}) if Kubeflow "
        "Pipelines runs elsewhere",
        f"${HOST_ENV}": f"from {HOST_ENV}",
    }.get(conn.origin, "check --host (or " + HOST_ENV + ")")
    return CliError(
        f"cannot reach Kubeflow Pipelines host {conn.host} ({reason}); {where}; check the port-forward / "
        "ingress and the network"
    )


def _text(body: bytes | str | None) -> str:
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace")
    return body or ""


def _cut(text: str, limit: int = DETAIL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_html(ans: Answer) -> bool:
    head = _text(ans.body[:512]).lstrip().lower()
    return "html" in ans.content_type.lower() or head.startswith(("<!doctype", "<html", "<head", "<body"))


def _detail(ans: Answer) -> str:
    """The server's explanation: the JSON body's `message` (grpc-gateway) or `error`, else the text."""
    text = _text(ans.body)
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("message", "error"):
            if data.get(key):
                return _cut(str(data[key]))
    if _is_html(ans):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.I | re.S)
        return _cut(f"an HTML page{': ' + title.group(1) if title else ''}")
    return _cut(text) or "no explanation in the answer"


def _login_error(conn: Connection, path: str, ans: Answer) -> CliError:
    if 300 <= ans.status < 400:
        target = urlsplit(ans.location)
        what = f"a redirect (HTTP {ans.status}) to {target.netloc}{target.path or '/'}"
    else:
        what = "an HTML page"
    looks_like_login = 300 <= ans.status < 400 or any(w in _text(ans.body).lower() for w in LOGIN_WORDS)
    if looks_like_login:
        message = f"answered {path} with {what} (looks like a login page): {CREDENTIALS_HINT}"
    else:
        message = (
            f"answered {path} with {what}, not the API's JSON: if it is a login page, {CREDENTIALS_HINT}; "
            "otherwise check that the host is the KFP API (e.g. https://kubeflow.example.com/pipeline)"
        )
    if conn.credentials:
        message += f" ({conn.credentials} given was not accepted: expired, or for another host?)"
    return CliError(f"Kubeflow Pipelines host {conn.host} {message}")


def answer_error(conn: Connection, path: str, ans: Answer) -> CliError:
    """The error for an answer that is not a success with the API's JSON."""
    login_ish = any(w in _text(ans.body).lower() for w in LOGIN_WORDS)
    if 300 <= ans.status < 400 or (_is_html(ans) and (ans.status in (200, 401, 407) or login_ish)):
        return _login_error(conn, path, ans)  # an SSO proxy (Dex, oauth2-proxy) in front of the API
    host = conn.host
    if ans.status == 401:
        return CliError(
            f"authentication failed at Kubeflow Pipelines host {host} (HTTP 401) on {path}: {_detail(ans)}; "
            f"pass a valid --token (or {TOKEN_ENV}) or session cookie (--cookie / {COOKIE_ENV}) for that host"
        )
    if ans.status == 403:
        return CliError(
            f"access denied at Kubeflow Pipelines host {host} (HTTP 403) on {path}: {_detail(ans)}; the "
            "identity of the token / cookie needs access to the namespace (--namespace): a contributor of "
            "its Kubeflow profile"
        )
    if not 200 <= ans.status < 300:
        return _http_error(conn, path, ans)
    return CliError(
        f"Kubeflow Pipelines host {host} answered {path} with {ans.content_type or 'no content type'}, not "
        f"the API's JSON ({_detail(ans)}); check that the host is the KFP API (e.g. "
        f"https://kubeflow.example.com/pipeline, or {IN_CLUSTER_HOST} in the cluster)"
    )


def expect_json(conn: Connection, path: str, ans: Answer, fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """The answer's JSON object with `fields` set, else CliError (HTML login page, 401/403, not KFP)."""
    if not 200 <= ans.status < 300 or _is_html(ans):
        raise answer_error(conn, path, ans)
    try:
        data = json.loads(_text(ans.body))
    except ValueError:
        raise answer_error(conn, path, ans) from None
    if not isinstance(data, dict):
        raise answer_error(conn, path, ans)
    missing = [f for f in fields if not data.get(f)]
    if missing:
        raise _lacks(conn, path, missing, _cut(_text(ans.body), 120))
    return data


def _lacks(conn: Connection, path: str, missing: list[str], got: str) -> CliError:
    return CliError(
        f"Kubeflow Pipelines host {conn.host} answered {path} without {', '.join(missing)} ({got}); check "
        "that the host is the KFP API (e.g. https://kubeflow.example.com/pipeline)"
    )


# --------------------------------------------------------------------------------------------------
# Healthz and the backend version
# --------------------------------------------------------------------------------------------------


def parse_version(tag: Any) -> tuple[int, int, int] | None:
    """`2.5.0`, `v2.5.0`, `2.5.0-rc.1` -> (2, 5, 0); `unknown`, `dev`, None -> None."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", str(tag or ""))
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def _version_text(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def check_host(
    conn: Connection, timeout: float = 10.0, warn: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """One GET of the KFP healthz endpoint, so an unreachable host, a login page or a refused token fails in
    seconds (kfp.Client itself retries healthz 5 times, 5 s apart, and then raises a bare TimeoutError).
    Returns the healthz JSON; refuses a backend older than MIN_BACKEND, warns when the version is unknown.
    """
    health = expect_json(conn, HEALTHZ_PATH, _get(conn, HEALTHZ_PATH, timeout))
    tag = health.get("tag_name")
    version = parse_version(tag)
    if version is None:  # older servers' v2beta1 healthz has no tag_name; the v1beta1 one has
        try:
            ans = _get(conn, HEALTHZ_V1_PATH, timeout)
            v1 = json.loads(_text(ans.body)) if ans.status == 200 and not _is_html(ans) else {}
        except (CliError, ValueError):
            v1 = {}
        if isinstance(v1, dict) and parse_version(v1.get("tag_name")):
            tag, version = v1["tag_name"], parse_version(v1["tag_name"])
    need = _version_text(MIN_BACKEND)
    if version is None:
        (warn or _warn)(
            f"cannot tell the Kubeflow Pipelines version of {conn.host} (healthz tag_name: {tag!r}); this "
            f"pipeline needs {need} or later ({MIN_BACKEND_WHY}); going on"
        )
    elif version < MIN_BACKEND:
        raise CliError(
            f"Kubeflow Pipelines at {conn.host} is {tag}, older than {need}, which this pipeline needs "
            f"({MIN_BACKEND_WHY}). Fix: upgrade Kubeflow Pipelines, or pass the --host of a newer one"
        )
    health["backend_version"] = tag if version else None
    return health


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# kfp.Client: experiment, upload, run
# --------------------------------------------------------------------------------------------------


def _guard(client: Any, conn: Connection) -> None:
    """Make every kfp.Client request fail clearly: an answer that is not the API's JSON (kfp_server_api would
    turn an HTML login page into an empty object, hence `submitted run None`), 401/403 with the server's
    explanation, an unreachable host. All kfp.Client's APIs share this one REST client (kfp 2.17)."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    rest = client._run_api.api_client.rest_client
    original = rest.request

    def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        path = urlsplit(url).path
        try:
            resp = original(method, url, *args, **kwargs)
        except ApiException as e:
            if not e.status:  # SSL and request-building errors
                raise _unreachable(conn, e.reason) from None
            headers = e.headers or {}
            ct, location = headers.get("Content-Type", ""), headers.get("Location", "")
            ans = Answer(e.status, ct, e.body or b"", location)
            raise answer_error(conn, path, ans) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise _unreachable(conn, getattr(e, "reason", None) or e) from None
        if kwargs.get("_preload_content", True) and hasattr(resp, "data"):
            ans = Answer(resp.status, resp.getheader("Content-Type") or "", resp.data or b"")
            expect_json(conn, path, ans)
        return resp

    rest.request = request


def make_client(conn: Connection, namespace: str | None) -> Any:
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "This client only works with KFP v2.0.0-beta.2+"
        try:
            client = kfp.Client(
                host=conn.host,
                existing_token=conn.token or None,
                cookies=conn.cookie,
                namespace=namespace or "kubeflow",
            )
        except TimeoutError as e:
            raise _unreachable(conn, e) from None
    _guard(client, conn)
    return client


def _need(conn: Connection, obj: Any, field: str, path: str) -> str:
    value = getattr(obj, field, None)
    if not value:
        raise _lacks(conn, path, [field], _cut(str(obj), 120))
    return str(value)


def package_pipeline_name(package: str) -> str:
    """The pipeline's own name (pipelineInfo.name) in a compiled package."""
    import yaml

    try:
        doc = next(yaml.safe_load_all(Path(package).read_text()))
        return str(doc["pipelineInfo"]["name"])
    except (OSError, yaml.YAMLError, StopIteration, KeyError, TypeError) as e:
        raise CliError(
            f"cannot read the pipeline name from {package} ({e}); pass --pipeline-name NAME"
        ) from None


def default_version_name(package: str, now: datetime | None = None) -> str:
    """`<sha256 of the package, 12 hex>-<UTC time>`: which content, and when (unique per upload)."""
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]
    return f"{digest}-{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


@dataclass(frozen=True)
class Uploaded:
    pipeline_id: str
    version_id: str
    version_name: str
    created: bool  # the pipeline was created (its first version); else a version was added


def upload_pipeline(
    client: Any,
    conn: Connection,
    package: str,
    name: str,
    version_name: str | None,
    namespace: str | None,
) -> Uploaded:
    """Upload `package` as a new version of the pipeline `name`, creating the pipeline when missing."""
    listing = {"filter": _name_filter(name), "page_size": 100}
    if namespace:
        listing["namespace"] = namespace  # multi-user: the namespace's own pipelines
    found = client._pipelines_api.pipeline_service_list_pipelines(**listing).pipelines or []
    matches = [p for p in found if p.display_name == name]
    if len(matches) > 1:
        raise CliError(
            f"{len(matches)} pipelines are named {name!r} at {conn.host}; pass a unique --pipeline-name"
        )
    if not matches:
        created = client._upload_api.upload_pipeline(package, name=name, namespace=namespace)
        pipeline_id = _need(conn, created, "pipeline_id", "/apis/v2beta1/pipelines/upload")
        path = f"/apis/v2beta1/pipelines/{pipeline_id}/versions"
        versions = client._pipelines_api.pipeline_service_list_pipeline_versions(
            pipeline_id=pipeline_id, page_size=1, sort_by="created_at desc"
        )
        if not versions.pipeline_versions:
            raise _lacks(conn, path, ["pipeline_versions"], _cut(str(versions), 120))
        version = versions.pipeline_versions[0]
        return Uploaded(
            pipeline_id,
            _need(conn, version, "pipeline_version_id", path),
            str(version.display_name or name),
            created=True,
        )
    pipeline_id = _need(conn, matches[0], "pipeline_id", "/apis/v2beta1/pipelines")
    vname = version_name or default_version_name(package)
    same = client._pipelines_api.pipeline_service_list_pipeline_versions(
        pipeline_id=pipeline_id, filter=_name_filter(vname), page_size=100
    )
    if any(v.display_name == vname for v in same.pipeline_versions or []):
        raise CliError(
            f"pipeline {name!r} at {conn.host} already has a version named {vname!r}; pass another "
            "--version-name (or leave it out: <content hash>-<UTC time>)"
        )
    version = client._upload_api.upload_pipeline_version(package, name=vname, pipelineid=pipeline_id)
    return Uploaded(
        pipeline_id,
        _need(conn, version, "pipeline_version_id", "/apis/v2beta1/pipelines/upload_version"),
        vname,
        created=False,
    )


@dataclass(frozen=True)
class Submitted:
    run_id: str
    experiment_id: str
    uploaded: Uploaded | None = None


def submit(
    package: str,
    *,
    conn: Connection,
    namespace: str | None,
    experiment: str,
    run_name: str,
    arguments: Mapping[str, Any],
    pipeline_root: str | None = None,
    service_account: str | None = None,
    pipeline_name: str | None = None,
    version_name: str | None = None,
    multi_user: bool = False,
) -> Submitted:
    """Create a run of `package` on the host: the spec inline, or, with `pipeline_name`, a new version of that
    pipeline (created if missing) and a run of that version. The host was checked (check_host) before."""
    client = make_client(conn, namespace)
    experiment = os.environ.get("KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME") or experiment  # as kfp.Client does
    exp = client.create_experiment(name=experiment, namespace=namespace or None)
    experiment_id = _need(conn, exp, "experiment_id", "/apis/v2beta1/experiments")
    uploaded = None
    if pipeline_name:
        uploaded = upload_pipeline(
            client, conn, package, pipeline_name, version_name, namespace if multi_user else None
        )
        verb = "created pipeline" if uploaded.created else "pipeline"
        print(
            f"{verb} {pipeline_name} ({uploaded.pipeline_id}): version {uploaded.version_name} "
            f"({uploaded.version_id})"
        )
        source: dict[str, Any] = {"pipeline_id": uploaded.pipeline_id, "version_id": uploaded.version_id}
    else:
        source = {"pipeline_package_path": package}
    run = client.run_pipeline(
        experiment_id=experiment_id,
        job_name=run_name,
        params=dict(arguments),
        pipeline_root=pipeline_root,
        service_account=service_account,
        **source,
    )
    return Submitted(_need(conn, run, "run_id", "/apis/v2beta1/runs"), experiment_id, uploaded)


# --------------------------------------------------------------------------------------------------
# --wait
# --------------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def wait_for_run(
    conn: Connection,
    run_id: str,
    *,
    timeout: float | None = None,
    poll_interval: float = 10.0,
    out: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Poll the run until it ends; print each state change. 0 on SUCCEEDED, EXIT_RUN_FAILED (with one
    `error:` line) when it ends otherwise; CliError after `timeout` seconds (the run goes on)."""
    from components.common import print_error

    path = RUN_PATH.format(run_id=run_id)
    start, last, failures = clock(), None, 0
    try:
        while True:
            try:
                ans = _get(conn, path, timeout=30.0)
                if ans.status >= 500 or ans.status == 429:
                    raise _http_error(conn, path, ans)
            except CliError as e:  # unreachable or 5xx: an API pod restarting, a flaky network
                failures += 1
                if failures > POLL_RETRIES:
                    raise CliError(f"{e} (while waiting for run {run_id}, which goes on)") from None
                sleep(min(max(poll_interval, 1.0), 30.0))
                continue
            run = expect_json(conn, path, ans, fields=("run_id",))
            failures = 0
            state = str(run.get("state") or "RUNTIME_STATE_UNSPECIFIED")  # proto3 JSON omits the zero value
            elapsed = clock() - start
            if state != last:
                out(f"run {run_id}: {state} ({_duration(elapsed)})")
                last = state
            if state == SUCCEEDED:
                return 0
            if state in ENDED_BADLY:
                error = run.get("error") if isinstance(run.get("error"), dict) else {}
                why = f": {_cut(str(error['message']))}" if error.get("message") else ""
                print_error(
                    f"run {run_id} ended {state} after {_duration(elapsed)}{why}. Fix: see the run's page in "
                    "the Kubeflow Pipelines UI and the failed step's logs"
                )
                return EXIT_RUN_FAILED
            if timeout is not None and elapsed >= timeout:
                raise CliError(
                    f"run {run_id} is still {state} after {_duration(elapsed)} (--timeout {timeout:g}); it "
                    "goes on on the cluster (waiting never cancels it): follow it in the UI, or cancel it"
                )
            pause = poll_interval if timeout is None else min(poll_interval, max(timeout - elapsed, 0.0))
            sleep(pause)
    except KeyboardInterrupt:
        print(f"stopped waiting; run {run_id} goes on on the cluster (not cancelled)", file=sys.stderr)
        raise


def _http_error(conn: Connection, path: str, ans: Answer) -> CliError:
    host = conn.host
    return CliError(f"Kubeflow Pipelines host {host} answered HTTP {ans.status} on {path}: {_detail(ans)}")


# --------------------------------------------------------------------------------------------------
# Tracking: a run needs an MLflow server
# --------------------------------------------------------------------------------------------------

TRACKING_SERVER_EXAMPLE = "http://mlflow.mlflow.svc.cluster.local:5000"
URI_ENV = "MLFLOW_TRACKING_URI"


def _package_docs(package: str) -> list[Any]:
    import yaml

    try:
        return [d for d in yaml.safe_load_all(Path(package).read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError):
        return []


def _package_defaults(docs: list[Any]) -> dict[str, Any]:
    """The pipeline parameters' defaults compiled into a package ({} when it has none)."""
    try:
        parameters = docs[0]["root"]["inputDefinitions"]["parameters"]
        return {k: v["defaultValue"] for k, v in parameters.items() if "defaultValue" in v}
    except (IndexError, KeyError, TypeError, AttributeError):
        return {}


def _package_secret_envs(docs: list[Any]) -> set[str]:
    """The environment variables a package's steps get from Kubernetes secrets."""
    try:
        executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        return {
            k.get("envVar", "")
            for ex in executors.values()
            for secret in ex.get("secretAsEnv", [])
            for k in secret.get("keyToEnv", [])
        }
    except (IndexError, KeyError, TypeError, AttributeError):
        return set()


def require_tracking_server(
    args: argparse.Namespace, params: Any, opts: Any, arguments: dict[str, Any]
) -> None:
    """CliError when the run would track to no server: with tracking on (the `tracking` parameter, else
    the package's default, else params' ``pipeline.tracking``), the tracking URI (``--param tracking_uri``,
    else ``--tracking-uri``, else the package's default) must be an http(s) or Databricks server, or, left
    empty, the pods must get ``MLFLOW_TRACKING_URI`` from a secret (the platform file's ``secrets:``).
    Otherwise each pod would log to its own sqlite store, lost with the pod (and the steps refuse to start).

    With ``--package``, ``--tracking-uri`` is passed as the ``tracking_uri`` argument (it cannot change
    the compiled default).
    """
    from components.tracking.identity import is_server_uri
    from components.tracking.retries import redact_uri

    docs = _package_docs(args.package) if args.package else []
    defaults = _package_defaults(docs)
    if args.package and args.tracking_uri and "tracking_uri" not in arguments:
        arguments["tracking_uri"] = args.tracking_uri
    tracking = arguments.get("tracking", defaults.get("tracking", params.pipeline.tracking))
    if not tracking:
        return
    if "tracking_uri" in arguments:
        uri, where = str(arguments["tracking_uri"] or ""), "--param tracking_uri"
    elif args.tracking_uri:
        uri, where = args.tracking_uri, "--tracking-uri"
    else:
        uri, where = str(defaults.get("tracking_uri") or ""), "the package's tracking_uri"
    if is_server_uri(uri):
        return
    if not uri.strip():
        envs = (
            _package_secret_envs(docs)
            if args.package
            else {env for keys in opts.secrets.values() for env in keys.values()}
        )
        if URI_ENV in envs:
            return  # the pods' own MLFLOW_TRACKING_URI, from a secret (the steps check it is a server)
    given = f"{where} {redact_uri(uri)} is a local store" if uri.strip() else "no tracking server is given"
    raise CliError(
        f"tracking is on but {given}: each pod would log to its own store, lost when the pod ends (and "
        f"the steps refuse to start). Fix: pass --param tracking_uri={TRACKING_SERVER_EXAMPLE} (or "
        f"--tracking-uri; or map {URI_ENV} from a secret in the platform file), or turn tracking off with "
        "--param tracking=false"
    )


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _check_options(args: argparse.Namespace) -> None:
    if args.version_name is not None and args.pipeline_name is None:
        raise CliError("--version-name names an uploaded pipeline version: pass --pipeline-name [NAME] too")
    if args.version_name is not None and not args.version_name.strip():
        raise CliError("--version-name must not be empty")
    if args.timeout is not None and not args.wait:
        raise CliError("--timeout bounds --wait: pass --wait too")
    if args.timeout is not None and args.timeout <= 0:
        raise CliError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if args.poll_interval <= 0:
        raise CliError(f"--poll-interval must be > 0 seconds, got {args.poll_interval:g}")


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.pipeline import build_pipeline, compile_pipeline

    _check_options(args)
    conn = resolve_connection(args.host, args.token, args.cookie)
    params = load_params_for(args)
    opts = build_options(args)
    signature = inspect.signature(build_pipeline(params, opts).pipeline_func)
    arguments = parse_pipeline_args(args.param, signature)
    require_tracking_server(args, params, opts, arguments)  # before contacting the host
    health = check_host(conn)
    with tempfile.TemporaryDirectory(prefix="daft-kfp-") as tmp:
        package = args.package or compile_pipeline(params, opts, str(Path(tmp) / DEFAULT_PACKAGE))
        pipeline_name = args.pipeline_name
        if pipeline_name is not None:
            pipeline_name = pipeline_name.strip() or package_pipeline_name(package)
        run_name = args.run_name or f"{params.pipeline.experiment}-{'sweep' if args.sweep else 'run'}"
        submitted = submit(
            package,
            conn=conn,
            namespace=args.namespace,
            experiment=args.experiment or params.pipeline.experiment,
            run_name=run_name,
            arguments=arguments,
            pipeline_root=args.pipeline_root,
            service_account=args.service_account,
            pipeline_name=pipeline_name,
            version_name=args.version_name,
            multi_user=health.get("multi_user") is True,
        )
    print(f"submitted run {submitted.run_id} ({run_name}) to {conn.host}", flush=True)
    if not args.wait:
        return 0
    return wait_for_run(conn, submitted.run_id, timeout=args.timeout, poll_interval=args.poll_interval)
