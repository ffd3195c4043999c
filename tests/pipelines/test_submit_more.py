"""`submit` as kfp users expect it, against the fake KFP server of test_submit.py:

1. a login page (HTML) in front of the API, or any answer that is not the API's JSON, is one `error:` line
   (never `submitted run None`); `--cookie` / KF_PIPELINES_COOKIE passes an SSO session;
2. a 401's / 403's explanation (the body's `message` / `error`) is in the error line;
3. in a pod, the in-cluster host and the service-account token are the defaults;
4. `--wait` follows the run: one line per state, exit 0 on SUCCEEDED, 3 on FAILED, 2 after --timeout;
5. `--pipeline-name` uploads the package as a pipeline version and runs that version;
6. the backend version is checked (refused below 2.5.0, a warning when unknown).

Every bad case: exit status 2 (3 for a failed run) and exactly one `error:` line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines import submit as kfp_submit
from pipelines.cli import main as cli_main
from tests.pipelines import test_submit as base
from tests.pipelines.test_submit import ROOT, TOKEN, FakeKfp
from tests.servers import free_port

kfp_server = base.kfp_server  # the fake KFP server (a fixture)
_isolated_kfp_env = base._isolated_kfp_env  # autouse: no KFP / pod environment leaks into the tests

MLFLOW_URI = "http://mlflow.example:5000"
RUNS = "/apis/v2beta1/runs"
EXPERIMENTS = "/apis/v2beta1/experiments"
HEALTHZ = "/apis/v2beta1/healthz"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compiled package for the module (its tracking_uri default is a server, so tracking is fine)."""
    path = tmp_path_factory.mktemp("pkg") / "daft_pipeline.yaml"
    argv = ["compile", "--params", str(ROOT / "params.yaml"), "--image", "reg.example/daft:1"]
    assert cli_main([*argv, "--tracking-uri", MLFLOW_URI, "-o", str(path)]) == 0
    return path


def _submit(package: Path, *extra: str) -> int:
    argv = ["submit", "--params", str(ROOT / "params.yaml"), "--package", str(package)]
    return cli_main([*argv, "--experiment", "daft-exp", "--run-name", "r", *extra])


def _at(server: FakeKfp, *extra: str) -> list[str]:
    return ["--host", server.url, "--token", TOKEN, *extra]


def _one_error(rc: int, err: str, *expected: str, status: int = 2) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == status, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------------------------------
# 1. A login page, or anything that is not the API's JSON
# --------------------------------------------------------------------------------------------------


def test_login_page_in_front_of_the_api_is_a_clear_error(kfp_server: FakeKfp, package: Path, capsys) -> None:
    kfp_server.token, kfp_server.cookie = None, "authservice_session=s3ss10n"
    rc = _submit(package, "--host", kfp_server.url)
    out, err = capsys.readouterr()
    _one_error(
        rc,
        err,
        f"Kubeflow Pipelines host {kfp_server.url} answered {HEALTHZ} with an HTML page "
        "(looks like a login page): pass a token",
        "pass a token (--token / KF_PIPELINES_TOKEN) or a session cookie (--cookie / KF_PIPELINES_COOKIE, "
        "e.g. authservice_session=...)",
    )
    assert "submitted run" not in out
    assert not kfp_server.calls("POST", RUNS)
    # A token the login proxy does not take: the same error, and it says the credentials were refused.
    rc = _submit(package, *_at(kfp_server))
    _one_error(rc, capsys.readouterr().err, "looks like a login page", "a token given was not accepted")


def test_session_cookie_passes_the_login(
    kfp_server: FakeKfp, package: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    kfp_server.token, kfp_server.cookie = None, "authservice_session=s3ss10n"
    assert _submit(package, "--host", kfp_server.url, "--cookie", "authservice_session=s3ss10n") == 0
    assert "submitted run run-1 (r)" in capsys.readouterr().out
    monkeypatch.setenv("KF_PIPELINES_COOKIE", "s3ss10n")  # the bare value: Kubeflow's authservice cookie
    assert _submit(package, "--host", kfp_server.url) == 0, capsys.readouterr().err
    assert len(kfp_server.calls("POST", RUNS)) == 2
    assert all(r["cookie"] == "authservice_session=s3ss10n" for r in kfp_server.requests)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ((200, "text/html", b"<html><body>Sign in with SSO</body></html>"), "an HTML page (looks like a"),
        ((200, "application/json", b"{}"), f"answered {RUNS} without run_id"),
        ((200, "text/plain", b"hello from another service"), "not the API's JSON (hello from another"),
        ((302, "text/html", b""), "a redirect (HTTP 302) to"),
    ],
    ids=["html", "json-without-run_id", "plain-text", "redirect"],
)
def test_run_creation_answer_that_is_not_the_api(
    kfp_server: FakeKfp, package: Path, capsys, answer: tuple[int, str, bytes], expected: str
) -> None:
    kfp_server.canned[("POST", RUNS)] = answer
    rc = _submit(package, *_at(kfp_server))
    out, err = capsys.readouterr()
    _one_error(rc, err, f"Kubeflow Pipelines host {kfp_server.url}", expected)
    assert "submitted run" not in out


def test_healthz_answer_that_is_not_the_api(kfp_server: FakeKfp, package: Path, capsys) -> None:
    # e.g. --host is the central dashboard, whose index page answers every path
    kfp_server.canned[("GET", HEALTHZ)] = (200, "text/html", b"<!doctype html><title>Kubeflow</title>")
    rc = _submit(package, *_at(kfp_server))
    _one_error(rc, capsys.readouterr().err, "with an HTML page, not the API's JSON", "--cookie", "/pipeline")
    assert not kfp_server.calls("GET", EXPERIMENTS)


# --------------------------------------------------------------------------------------------------
# 2. 401 / 403: the server's explanation is printed
# --------------------------------------------------------------------------------------------------


def test_403_explanation_is_printed(kfp_server: FakeKfp, package: Path, capsys) -> None:
    why = "User 'alice@example.com' is not authorized with reason: PermissionDenied (namespace team-a)"
    body = json.dumps({"error": "Failed to authorize with API", "code": 7, "message": why}).encode()
    kfp_server.canned[("GET", EXPERIMENTS)] = (403, "application/json", body)
    rc = _submit(package, *_at(kfp_server, "--namespace", "team-a"))
    _one_error(
        rc,
        capsys.readouterr().err,
        f"access denied at Kubeflow Pipelines host {kfp_server.url} (HTTP 403) on {EXPERIMENTS}: {why}",
        "--namespace",
    )
    assert not kfp_server.calls("POST", RUNS)


def test_403_and_401_at_healthz_explained_and_cut(kfp_server: FakeKfp, package: Path, capsys) -> None:
    kfp_server.canned[("GET", HEALTHZ)] = (403, "text/plain", b"RBAC: access denied")
    rc = _submit(package, *_at(kfp_server))
    _one_error(rc, capsys.readouterr().err, "(HTTP 403) on /apis/v2beta1/healthz: RBAC: access denied")
    long = "x" * 5000
    kfp_server.canned[("GET", HEALTHZ)] = (403, "application/json", json.dumps({"error": long}).encode())
    rc = _submit(package, *_at(kfp_server))
    line = _one_error(rc, capsys.readouterr().err, "(HTTP 403)", "x…")
    assert len(line) <= 520
    del kfp_server.canned[("GET", HEALTHZ)]
    rc = _submit(package, *_at(kfp_server)[:-1], "wrong-token")
    _one_error(rc, capsys.readouterr().err, "(HTTP 401) on /apis/v2beta1/healthz: bad token", "--token")


# --------------------------------------------------------------------------------------------------
# 3. In a pod: the in-cluster host and the service-account token
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["kfp projected token", "kubernetes token"])
def test_in_a_pod_defaults_to_the_in_cluster_host_and_sa_token(
    kfp_server: FakeKfp, package: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys, which: str
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setattr(kfp_submit, "IN_CLUSTER_HOST", kfp_server.url)  # the real one is not resolvable here
    var = "DAFT_KFP_SA_TOKEN_PATH" if which == "kfp projected token" else "DAFT_K8S_SA_TOKEN_PATH"
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv(var, str(tmp_path / "token"))
    assert _submit(package) == 0, capsys.readouterr().err
    assert f"submitted run run-1 (r) to {kfp_server.url}" in capsys.readouterr().out
    assert kfp_server.requests and all(r["auth"] == f"Bearer {TOKEN}" for r in kfp_server.requests)


def test_in_a_pod_host_and_token_options_win(
    kfp_server: FakeKfp, package: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    unreachable = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(kfp_submit, "IN_CLUSTER_HOST", unreachable)
    rc = _submit(package)
    _one_error(rc, capsys.readouterr().err, f"cannot reach Kubeflow Pipelines host {unreachable}", "--host")
    # --host overrides the in-cluster default; the pod's Kubernetes token never goes to an outside host
    (tmp_path / "k8s").write_text("k8s-sa-token")
    monkeypatch.setenv("DAFT_K8S_SA_TOKEN_PATH", str(tmp_path / "k8s"))
    rc = _submit(package, "--host", kfp_server.url)
    _one_error(rc, capsys.readouterr().err, "(HTTP 401)")
    assert all(r["auth"] is None for r in kfp_server.requests)
    assert _submit(package, *_at(kfp_server)) == 0  # --token wins over the token files
    assert kfp_server.requests[-1]["auth"] == f"Bearer {TOKEN}"


# --------------------------------------------------------------------------------------------------
# 4. --wait
# --------------------------------------------------------------------------------------------------


def test_wait_prints_each_state_once_and_exits_0_on_success(
    kfp_server: FakeKfp, package: Path, capsys
) -> None:
    kfp_server.run_states = ["PENDING", "RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"]
    rc = _submit(package, *_at(kfp_server, "--wait", "--poll-interval", "0.01"))
    out, err = capsys.readouterr()
    assert rc == 0, err
    states = re.findall(r"^run run-1: (\w+) \(\d+m\d\ds\)$", out, re.M)
    assert states == ["PENDING", "RUNNING", "SUCCEEDED"]
    assert len(kfp_server.calls("GET", f"{RUNS}/run-1")) == 5


def test_wait_failed_run_is_exit_3_with_the_reason(kfp_server: FakeKfp, package: Path, capsys) -> None:
    kfp_server.run_states = ["RUNNING", "FAILED"]
    kfp_server.run_error = {"code": 2, "message": "task finetune-daft failed: OOMKilled"}
    rc = _submit(package, *_at(kfp_server, "--wait", "--poll-interval", "0.01"))
    out, err = capsys.readouterr()
    _one_error(rc, err, "run run-1 ended FAILED", "OOMKilled", status=kfp_submit.EXIT_RUN_FAILED)
    assert "submitted run run-1" in out and "run run-1: FAILED" in out


def test_wait_timeout_and_option_errors(kfp_server: FakeKfp, package: Path, capsys) -> None:
    kfp_server.run_states = ["RUNNING"]
    rc = _submit(package, *_at(kfp_server, "--wait", "--timeout", "0.3", "--poll-interval", "0.05"))
    _one_error(rc, capsys.readouterr().err, "run run-1 is still RUNNING", "--timeout 0.3", "goes on")
    rc = _submit(package, *_at(kfp_server, "--timeout", "5"))
    _one_error(rc, capsys.readouterr().err, "--timeout bounds --wait")
    rc = _submit(package, *_at(kfp_server, "--wait", "--poll-interval", "0"))
    _one_error(rc, capsys.readouterr().err, "--poll-interval must be > 0")
    assert len(kfp_server.calls("POST", RUNS)) == 1


def test_wait_sees_a_login_page_while_polling(kfp_server: FakeKfp, package: Path, capsys) -> None:
    kfp_server.canned[("GET", f"{RUNS}/run-1")] = (200, "text/html", b"<html>Log in to dex</html>")
    rc = _submit(package, *_at(kfp_server, "--wait", "--poll-interval", "0.01"))
    _one_error(rc, capsys.readouterr().err, f"answered {RUNS}/run-1 with an HTML page (looks like a login")


# --------------------------------------------------------------------------------------------------
# 5. --pipeline-name: a named, versioned pipeline
# --------------------------------------------------------------------------------------------------


def test_pipeline_upload_then_new_versions(kfp_server: FakeKfp, package: Path, capsys) -> None:
    # First submit: the pipeline does not exist -> uploaded (its first version), the run references it.
    assert _submit(package, *_at(kfp_server, "--pipeline-name")) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "created pipeline daft (pipeline-1): version daft (version-1)" in out
    (upload,) = kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == ["daft"]  # the package's own pipeline name
    assert upload["form"]["uploadfile"] == package.read_bytes()
    (run,) = kfp_server.calls("POST", RUNS)
    assert run["body"]["pipeline_version_reference"] == {
        "pipeline_id": "pipeline-1",
        "pipeline_version_id": "version-1",
    }
    assert "pipeline_spec" not in run["body"]
    (lookup,) = kfp_server.calls("GET", "/apis/v2beta1/pipelines")
    assert "daft" in lookup["query"]["filter"][0] and "namespace" not in lookup["query"]
    # Second submit: a new version named <content hash>-<UTC time>.
    assert _submit(package, *_at(kfp_server, "--pipeline-name")) == 0, capsys.readouterr().err
    (added,) = kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload_version")
    assert added["query"]["pipelineid"] == ["pipeline-1"]
    assert re.fullmatch(r"[0-9a-f]{12}-\d{8}-\d{6}", added["query"]["name"][0])
    assert added["query"]["name"][0][:12] == kfp_submit.default_version_name(str(package))[:12]
    assert kfp_server.calls("POST", RUNS)[-1]["body"]["pipeline_version_reference"] == {
        "pipeline_id": "pipeline-1",
        "pipeline_version_id": "version-2",
    }
    # A chosen version name, once; the same name again is refused before anything is uploaded.
    assert _submit(package, *_at(kfp_server, "--pipeline-name", "daft", "--version-name", "v1")) == 0
    capsys.readouterr()
    rc = _submit(package, *_at(kfp_server, "--pipeline-name", "daft", "--version-name", "v1"))
    _one_error(rc, capsys.readouterr().err, "pipeline 'daft'", "already has a version named 'v1'")
    assert len(kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload_version")) == 2
    assert len(kfp_server.calls("POST", RUNS)) == 3


def test_pipeline_upload_in_a_multi_user_namespace(kfp_server: FakeKfp, package: Path, capsys) -> None:
    kfp_server.health["multi_user"] = True
    rc = _submit(package, *_at(kfp_server, "--namespace", "team-a", "--pipeline-name", "daft-team"))
    assert rc == 0, capsys.readouterr().err
    (lookup,) = kfp_server.calls("GET", "/apis/v2beta1/pipelines")
    assert lookup["query"]["namespace"] == ["team-a"]
    (upload,) = kfp_server.calls("POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == ["daft-team"] and upload["query"]["namespace"] == ["team-a"]


def test_version_name_needs_pipeline_name(kfp_server: FakeKfp, package: Path, capsys) -> None:
    rc = _submit(package, *_at(kfp_server, "--version-name", "v1"))
    _one_error(rc, capsys.readouterr().err, "--pipeline-name")
    assert kfp_server.requests == []


# --------------------------------------------------------------------------------------------------
# 6. The backend version
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("health", "health_v1", "shown"),
    [
        ({"tag_name": "2.4.1", "multi_user": False}, None, "is 2.4.1, older than 2.5.0"),
        ({"multi_user": False}, {"commit_sha": "abc", "tag_name": "2.3.0"}, "is 2.3.0, older than 2.5.0"),
        ({"tag_name": "1.8.5"}, None, "is 1.8.5, older than 2.5.0"),
    ],
    ids=["2.4.1", "v1beta1-healthz-2.3.0", "1.8.5"],
)
def test_old_backend_is_refused(
    kfp_server: FakeKfp, package: Path, capsys, health: dict, health_v1: dict | None, shown: str
) -> None:
    kfp_server.health, kfp_server.health_v1 = health, health_v1
    rc = _submit(package, *_at(kfp_server))
    _one_error(rc, capsys.readouterr().err, shown, "dsl.Collected", "upgrade Kubeflow Pipelines")
    assert not kfp_server.calls("GET", EXPERIMENTS)


def test_unknown_backend_version_warns_and_goes_on(kfp_server: FakeKfp, package: Path, capsys) -> None:
    kfp_server.health = {"commit_sha": "unknown", "tag_name": "unknown", "multi_user": False}
    rc = _submit(package, *_at(kfp_server))
    out, err = capsys.readouterr()
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "cannot tell the Kubeflow Pipelines version" in warnings[0]
    assert "'unknown'" in warnings[0] and "2.5.0" in warnings[0]
    assert kfp_server.calls("GET", "/apis/v1beta1/healthz")  # looked there too
    assert "submitted run run-1" in out


@pytest.mark.parametrize(
    ("tag", "parsed"),
    [
        ("2.5.0", (2, 5, 0)),
        ("v2.14.3", (2, 14, 3)),
        ("2.5.0-rc.1", (2, 5, 0)),
        ("2.5", (2, 5, 0)),
        ("unknown", None),
        ("", None),
        (None, None),
        ("master", None),
    ],
)
def test_parse_version(tag: str | None, parsed: tuple[int, int, int] | None) -> None:
    assert kfp_submit.parse_version(tag) == parsed


def test_package_pipeline_name(package: Path) -> None:
    assert kfp_submit.package_pipeline_name(str(package)) == "daft"
    docs = list(yaml.safe_load_all(package.read_text()))
    assert docs[0]["pipelineInfo"]["name"] == "daft" and "platforms" in docs[1]  # spec + platform spec
