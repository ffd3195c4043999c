"""`python -m pipelines submit` against a small KFP v2beta1 REST server on 127.0.0.1.

The server implements the calls `submit` makes: ``GET /apis/v2beta1/healthz`` (and the v1beta1 one),
``GET /apis/v2beta1/experiments`` (find by name), ``POST /apis/v2beta1/experiments``, ``POST
/apis/v2beta1/runs`` (the pipeline spec inline, or a pipeline version reference), ``GET
/apis/v2beta1/runs/{id}`` (the states of ``FakeKfp.run_states`` in turn), and for ``--pipeline-name``
``GET /apis/v2beta1/pipelines?filter=...``, ``POST /apis/v2beta1/pipelines/upload``, ``POST
/apis/v2beta1/pipelines/upload_version`` and ``GET /apis/v2beta1/pipelines/{id}/versions``. It checks the
bearer token like an authenticating proxy would, or, with ``FakeKfp.cookie``, answers every request without
that session cookie with a Dex-like HTML login page; ``FakeKfp.canned`` replaces chosen answers (HTML,
403 with a message, ...).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from pipelines.cli import main as cli_main
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "t0ken-for-tests"
MLFLOW = "tracking_uri=http://mlflow.mlflow.svc:5000"  # submit needs a tracking server when tracking is on


LOGIN_PAGE = b"""<!DOCTYPE html>
<html><head><title>dex</title></head><body><form action="/dex/auth/local/login" method="post">
<h2>Log in to Your Account</h2><input name="login"><input name="password" type="password">
</form></body></html>
"""


@dataclass
class FakeKfp:
    url: str
    token: str | None = TOKEN
    cookie: str | None = None  # set: requests without this Cookie header get LOGIN_PAGE (200, text/html)
    health: dict[str, Any] = field(
        default_factory=lambda: {"commit_sha": "test", "tag_name": "2.5.0", "multi_user": False}
    )
    health_v1: dict[str, Any] | None = None  # None: 404, like a server without the v1 API
    # (method, path) -> (status, content type, body): replaces the answer (after the credentials check)
    canned: dict[tuple[str, str], tuple[int, str, bytes]] = field(default_factory=dict)
    run_states: list[str] = field(default_factory=lambda: ["PENDING", "RUNNING", "SUCCEEDED"])
    run_error: dict[str, Any] | None = None  # the run's `error` once it ends
    requests: list[dict[str, Any]] = field(default_factory=list)
    experiments: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    pipelines: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)

    def calls(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]


def _wanted_names(query: dict[str, list[str]]) -> list[str]:
    flt = json.loads(query.get("filter", ["{}"])[0])
    return [
        p.get("stringValue", p.get("string_value"))
        for p in flt.get("predicates", [])
        if p.get("key") in ("display_name", "name")
    ]


def _form(content_type: str, raw: bytes) -> dict[str, bytes]:
    """multipart/form-data -> {field name: bytes} (kfp uploads the package as `uploadfile`)."""
    msg = BytesParser(policy=email_policy).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in msg.iter_parts()
    }


def _handler(state: FakeKfp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            self._raw(status, "application/json", json.dumps(body).encode())

        def _raw(self, status: int, content_type: str, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            content_type = self.headers.get("Content-Type") or ""
            record = {
                "method": method,
                "path": parts.path,
                "query": parse_qs(parts.query),
                "auth": self.headers.get("Authorization"),
                "cookie": self.headers.get("Cookie"),
                "body": json.loads(raw) if raw and "multipart" not in content_type else None,
                "form": _form(content_type, raw) if "multipart" in content_type else None,
            }
            state.requests.append(record)
            if state.cookie and record["cookie"] != state.cookie:
                return self._raw(200, "text/html; charset=utf-8", LOGIN_PAGE)
            if state.token and record["auth"] != f"Bearer {state.token}":
                return self._reply(401, {"error": "Unauthorized", "code": 16, "message": "bad token"})
            if (method, parts.path) in state.canned:
                return self._raw(*state.canned[(method, parts.path)])
            if (method, parts.path) == ("GET", "/apis/v2beta1/healthz"):
                return self._reply(200, state.health)
            if (method, parts.path) == ("GET", "/apis/v1beta1/healthz") and state.health_v1 is not None:
                return self._reply(200, state.health_v1)
            if (method, parts.path) == ("GET", "/apis/v2beta1/pipelines"):
                wanted = _wanted_names(record["query"])
                found = [p for p in state.pipelines if not wanted or p["display_name"] in wanted]
                return self._reply(200, {"pipelines": found, "total_size": len(found)} if found else {})
            if (method, parts.path) == ("POST", "/apis/v2beta1/pipelines/upload"):
                return self._reply(200, self._upload(record, pipeline_id=None))
            if (method, parts.path) == ("POST", "/apis/v2beta1/pipelines/upload_version"):
                return self._reply(200, self._upload(record, pipeline_id=record["query"]["pipelineid"][0]))
            if method == "GET" and parts.path.startswith("/apis/v2beta1/pipelines/"):
                pipeline_id = parts.path.split("/")[4]
                wanted = _wanted_names(record["query"])
                found = [
                    v
                    for v in state.versions
                    if v["pipeline_id"] == pipeline_id and (not wanted or v["display_name"] in wanted)
                ]
                if record["query"].get("sort_by") == ["created_at desc"]:
                    found = found[::-1]
                found = found[: int(record["query"].get("page_size", ["100"])[0])]
                found = [{k: v for k, v in ver.items() if k != "package"} for ver in found]
                return self._reply(200, {"pipeline_versions": found} if found else {})
            if method == "GET" and parts.path.startswith("/apis/v2beta1/runs/"):
                run_id = parts.path.rsplit("/", 1)[1]
                (run,) = [r for r in state.runs if r["run_id"] == run_id]
                polls = len([r for r in state.requests if r["path"] == parts.path])
                run["state"] = state.run_states[min(polls, len(state.run_states)) - 1]
                if state.run_error and run["state"] in ("FAILED", "CANCELED"):
                    run["error"] = state.run_error
                return self._reply(200, run)
            if (method, parts.path) == ("GET", "/apis/v2beta1/experiments"):
                flt = json.loads(record["query"].get("filter", ["{}"])[0])
                wanted = [
                    p["stringValue"] for p in flt.get("predicates", []) if p.get("key") == "display_name"
                ]
                found = [e for e in state.experiments if not wanted or e["display_name"] in wanted]
                return self._reply(200, {"experiments": found, "total_size": len(found)} if found else {})
            if (method, parts.path) == ("POST", "/apis/v2beta1/experiments"):
                exp = {**record["body"], "experiment_id": f"exp-{len(state.experiments) + 1}"}
                state.experiments.append(exp)
                return self._reply(200, exp)
            if (method, parts.path) == ("POST", "/apis/v2beta1/runs"):
                run = {**record["body"], "run_id": f"run-{len(state.runs) + 1}", "state": "PENDING"}
                state.runs.append(run)
                return self._reply(200, run)
            return self._reply(404, {"error": f"no route {method} {parts.path}", "code": 5})

        def _upload(self, record: dict[str, Any], pipeline_id: str | None) -> dict[str, Any]:
            """A new pipeline (its first version named after it) or a new version of `pipeline_id`."""
            name = record["query"]["name"][0]
            if pipeline_id is None:
                pipeline_id = f"pipeline-{len(state.pipelines) + 1}"
                pipeline = {"pipeline_id": pipeline_id, "display_name": name}
                if "namespace" in record["query"]:
                    pipeline["namespace"] = record["query"]["namespace"][0]
                state.pipelines.append(pipeline)
                answer = pipeline
            version = {
                "pipeline_id": pipeline_id,
                "pipeline_version_id": f"version-{len(state.versions) + 1}",
                "display_name": name,
                "package": record["form"]["uploadfile"],  # kept for the tests (not in KFP's answer)
            }
            state.versions.append(version)
            if record["path"].endswith("/upload_version"):
                answer = {k: v for k, v in version.items() if k != "package"}
            return answer

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


@pytest.fixture
def kfp_server() -> Iterator[FakeKfp]:
    port = free_port()
    state = FakeKfp(url=f"http://127.0.0.1:{port}")
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _isolated_kfp_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # kfp.Client reads ~/.config/kfp/context.json and these variables; keep the tests hermetic.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_TOKEN", "KF_PIPELINES_UI_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("KF_PIPELINES_DEFAULT_EXPERIMENT_NAME", "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    # Not in a pod, and never a real service-account token, even when the tests run in one.
    for var in ("KUBERNETES_SERVICE_HOST", "KF_PIPELINES_COOKIE", "KF_PIPELINES_SA_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DAFT_KFP_SA_TOKEN_PATH", str(tmp_path / "no-kfp-token"))
    monkeypatch.setenv("DAFT_K8S_SA_TOKEN_PATH", str(tmp_path / "no-k8s-token"))


def _submit(*extra: str) -> int:
    return cli_main(
        ["submit", "--params", str(ROOT / "params.yaml"), "--image", "reg.example/daft:1", *extra]
    )


def test_submit_uploads_spec_parameters_experiment_and_run_name(kfp_server: FakeKfp, capsys) -> None:
    rc = _submit(
        "--host",
        kfp_server.url,
        "--token",
        TOKEN,
        "--namespace",
        "team-a",
        "--experiment",
        "daft-exp",
        "--run-name",
        "daft-run-1",
        "--param",
        "epochs=2",
        "--param",
        'learning_rates={"daft": {"head_lr": 0.5}}',
        "--param",
        "tracking_uri=http://mlflow.mlflow.svc:5000",
    )
    assert rc == 0, capsys.readouterr().err
    assert "submitted run run-1 (daft-run-1)" in capsys.readouterr().out
    assert kfp_server.calls("GET", "/apis/v2beta1/healthz")
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in kfp_server.requests)
    # Experiment: looked up by name in the namespace, then created there.
    (lookup,) = kfp_server.calls("GET", "/apis/v2beta1/experiments")
    assert lookup["query"]["namespace"] == ["team-a"]
    assert "daft-exp" in lookup["query"]["filter"][0]
    (created,) = kfp_server.calls("POST", "/apis/v2beta1/experiments")
    assert created["body"] == {"display_name": "daft-exp", "namespace": "team-a"}
    # Run: name, experiment, parameters (typed) and the compiled spec inline.
    (run,) = kfp_server.calls("POST", "/apis/v2beta1/runs")
    body = run["body"]
    assert body["display_name"] == "daft-run-1"
    assert body["experiment_id"] == "exp-1"
    assert body["runtime_config"]["parameters"] == {
        "epochs": 2,
        "learning_rates": {"daft": {"head_lr": 0.5}},
        "tracking_uri": "http://mlflow.mlflow.svc:5000",
    }
    spec = body["pipeline_spec"]["pipeline_spec"]
    platform = body["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "daft"
    names = {t["taskInfo"]["name"] for t in spec["root"]["dag"]["tasks"].values()}
    assert {"prepare-data", "finetune-daft", "evaluate-lp", "report"} <= names
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"reg.example/daft:1"}
    secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-finetune"][
        "secretAsEnv"
    ]
    assert {s["secretName"] for s in secrets} == {"daft-s3-credentials", "daft-mlflow-credentials"}
    # The token never lands in the run.
    assert TOKEN not in json.dumps(body)


def test_existing_experiment_is_reused_and_env_endpoint_honoured(
    kfp_server: FakeKfp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    kfp_server.experiments.append({"experiment_id": "exp-42", "display_name": "daft", "namespace": "team-a"})
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", kfp_server.url)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    package = tmp_path / "sweep.yaml"
    compile_args = ["--sweep", "--tracking-uri", "http://mlflow.mlflow.svc:5000", "-o", str(package)]
    assert cli_main(["compile", "--params", str(ROOT / "params.yaml"), *compile_args]) == 0
    rc = _submit(
        "--sweep", "--package", str(package), "--namespace", "team-a", "--param", "ft_lrs=[0.01, 0.1]"
    )
    assert rc == 0, capsys.readouterr().err
    assert not kfp_server.calls("POST", "/apis/v2beta1/experiments")
    (run,) = kfp_server.calls("POST", "/apis/v2beta1/runs")
    assert run["body"]["experiment_id"] == "exp-42"
    assert run["body"]["display_name"] == "daft-sweep"
    assert run["body"]["runtime_config"]["parameters"] == {"ft_lrs": [0.01, 0.1]}
    assert run["body"]["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "daft-sweep"


def test_unreachable_host_is_a_clear_error(capsys) -> None:
    host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rc = _submit("--host", host, "--token", TOKEN, "--experiment", "x", "--run-name", "y", "--param", MLFLOW)
    err = capsys.readouterr().err
    assert rc == 2
    assert f"cannot reach Kubeflow Pipelines host {host}" in err
    assert "Traceback" not in err


def test_failed_auth_is_a_clear_error(kfp_server: FakeKfp, capsys) -> None:
    rc = _submit(
        "--host",
        kfp_server.url,
        "--token",
        "wrong",
        "--experiment",
        "x",
        "--run-name",
        "y",
        "--param",
        MLFLOW,
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert f"authentication failed at Kubeflow Pipelines host {kfp_server.url} (HTTP 401)" in err
    assert not kfp_server.calls("POST", "/apis/v2beta1/runs")


def test_missing_host_and_bad_parameters(kfp_server: FakeKfp, capsys) -> None:
    assert _submit("--run-name", "y") == 2
    assert "KF_PIPELINES_ENDPOINT" in capsys.readouterr().err
    assert _submit("--host", kfp_server.url, "--token", TOKEN, "--param", "no_such=1") == 2
    assert "not a pipeline parameter" in capsys.readouterr().err
    assert _submit("--host", kfp_server.url, "--token", TOKEN, "--param", "epochs=many") == 2
    assert "expected int" in capsys.readouterr().err
    assert not kfp_server.calls("POST", "/apis/v2beta1/runs")
