"""Credentials in URIs never reach what the project prints or logs (steps, MLflow's own loggers and its
"View run" lines, retry warnings, error lines), and never reach a compiled or submitted pipeline."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components import prepare_data
from components.tracking.redaction import has_credentials, install_log_redaction, redact
from pipelines.cli import main as pipelines_main
from tests.reliability.test_error_path import assert_one_error, html_server
from tests.servers import free_port
from tests.tiny_params import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cret"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"http://user:{SECRET}@127.0.0.1:5000/api", "http://***@127.0.0.1:5000/api"),
        (f"see https://{SECRET}@mlflow.example.com/#/x", "https://***@mlflow.example.com/#/x"),
        (f"s3://AKIAKEY:{SECRET}@bucket/key", "s3://***@bucket/key"),
        (f"http://h/api?token={SECRET}&x=1", "http://h/api?token=***&x=1"),
        (
            f"https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F{SECRET}&X-Amz-Signature={SECRET}",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        (f"headers {{'Authorization': 'Bearer {SECRET}abcdef'}}", "'Authorization': '***"),
        ("http://127.0.0.1:5000/api/2.0/mlflow/runs/get?run_id=abc", "run_id=abc"),
        ("user@example.com wrote: no URI here", "user@example.com wrote: no URI here"),
    ],
)
def test_redact(text: str, kept: str) -> None:
    out = redact(text)
    assert SECRET not in out and kept in out


def test_secret_env_values_are_masked(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-long-password")
    assert redact("login with hunter2-long-password failed") == "login with *** failed"
    assert has_credentials(f"http://u:{SECRET}@h") and has_credentials("http://h/?token=abc")
    assert not has_credentials("http://mlflow.mlflow.svc:5000")


def test_every_log_record_is_redacted(capsys) -> None:
    """Including MLflow's loggers, which have their own handler and do not propagate to the root."""
    import mlflow  # noqa: F401 - configures its loggers (handlers replaced) on import

    install_log_redaction()
    logging.getLogger("mlflow.tracking.fluent").warning("run at http://u:%s@127.0.0.1:5000/x", SECRET)
    logging.getLogger("urllib3.connectionpool").error("retrying http://u:%s@h/ (token=%s)", SECRET, SECRET)
    try:
        raise RuntimeError(f"API request to http://u:{SECRET}@127.0.0.1:5000/api failed")
    except RuntimeError:
        logging.getLogger("components.x").exception("boom")
    captured = capsys.readouterr()
    assert SECRET not in captured.err + captured.out
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"


# --------------------------------------------------------------------------------------------------
# A step tracked to a URI with credentials
# --------------------------------------------------------------------------------------------------


def _env(uri: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DAFT_"))}
    # Debug logs everywhere: the most a user could turn on.
    env.update(MLFLOW_TRACKING_URI=uri, DAFT_LOG_LEVEL="DEBUG", MLFLOW_LOGGING_LEVEL="DEBUG", **extra)
    return env


@pytest.mark.slow
def test_step_output_never_shows_the_password(mlflow_server, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    write_params(
        tmp_path / "params.yaml", tiny_params(pipeline={"tracking": True, "experiment": "daft-secrets"})
    )
    uri = mlflow_server.uri.replace("http://", f"http://user:{SECRET}@")
    res = subprocess.run(
        [sys.executable, "-m", "components.prepare_data", "--out", "out"],
        cwd=tmp_path,
        env=_env(uri, **mlflow_server.s3.env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, redact(res.stderr[-3000:])
    assert SECRET not in res.stdout + res.stderr
    assert "View run" not in res.stdout  # MLflow's own link line (it would carry the URI) is off
    assert "http://***@127.0.0.1" in res.stderr  # our replacement names the run, without credentials
    exp = MlflowClient(tracking_uri=mlflow_server.uri).get_experiment_by_name("daft-secrets")
    assert exp is not None  # the run did land


def test_failing_step_never_shows_the_password(tmp_path: Path) -> None:
    """Retry warnings and the error line of an unreachable server."""
    write_params(tmp_path / "params.yaml", tiny_params(pipeline={"tracking": True}))
    uri = f"http://user:{SECRET}@127.0.0.1:{free_port()}"
    res = subprocess.run(
        [sys.executable, "-m", "components.prepare_data", "--out", "out"],
        cwd=tmp_path,
        env=_env(uri, DAFT_TRACKING_TIMEOUT_S="4"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "retry" in res.stderr  # the warnings were printed ...
    assert_one_error(res.returncode, res.stderr, "http://***@127.0.0.1")
    assert SECRET not in res.stdout + res.stderr  # ... without the password


def test_not_mlflow_server_error_never_shows_the_password(tmp_path: Path, capsys, monkeypatch) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params(pipeline={"tracking": True}))
    with html_server(404) as plain:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", plain.replace("http://", f"http://user:{SECRET}@"))
        rc = prepare_data.main(["--params", str(params), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert_one_error(rc, captured.err, "not answer like an MLflow")
    assert SECRET not in captured.err + captured.out


# --------------------------------------------------------------------------------------------------
# Pipelines: credentials are refused before anything is written or sent
# --------------------------------------------------------------------------------------------------


def test_submit_refuses_a_tracking_uri_with_credentials(tmp_path: Path, capsys) -> None:
    base = ["submit", "--params", str(ROOT / "params.yaml"), "--host", "http://127.0.0.1:1"]
    for extra in (
        ["--tracking-uri", f"http://user:{SECRET}@mlflow:5000"],
        ["--param", f"tracking_uri=http://mlflow:5000/?token={SECRET}"],
    ):
        rc = pipelines_main([*base, *extra])
        line = assert_one_error(rc, capsys.readouterr().err, "daft-mlflow-credentials")
        assert SECRET not in line and "MLFLOW_TRACKING_PASSWORD" in line


def test_run_local_refuses_a_tracking_uri_with_credentials(tmp_path: Path, capsys) -> None:
    argv = ["run-local", "--params", str(ROOT / "params.yaml"), "--pipeline-root", str(tmp_path / "kfp")]
    rc = pipelines_main([*argv, "--tracking-uri", f"http://user:{SECRET}@mlflow:5000"])
    line = assert_one_error(rc, capsys.readouterr().err, "MLFLOW_TRACKING_USERNAME")
    assert SECRET not in line
    assert not (tmp_path / "kfp").exists()
