"""Tracking faults: a server that accepts connections and never answers fails the step within the
DAFT_TRACKING_TIMEOUT_S budget (MLflow's own HTTP timeout/retries and the project's retries included),
and a DVC experiment run in a temporary workspace keeps its tracking in the real repository's store."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.tracking import TIMEOUT_ENV, TrackingError, check_reachable, store_root, tracking_timeout_s
from tests.tiny_params import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUDGET_S = 5.0


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A loopback TCP server that accepts every connection and never sends a byte."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)  # kept open, never answered

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        srv.close()
        for c in held:
            c.close()


def test_default_budget_and_validation(monkeypatch) -> None:
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert tracking_timeout_s() == 30.0
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert tracking_timeout_s() == 12.5
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(TrackingError, match=TIMEOUT_ENV):
            tracking_timeout_s()


def test_unresponsive_server_honours_the_budget(monkeypatch) -> None:
    """In-process, so the bound is measured without interpreter start-up: MLflow's own settings exported
    as generous as they come (7 retries, 120 s timeout) do not stretch it."""
    import mlflow  # noqa: F401 - imported before timing (seconds of import are not network time)

    monkeypatch.setenv(TIMEOUT_ENV, str(BUDGET_S))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    with silent_server() as uri:
        t0 = time.monotonic()
        with pytest.raises(TrackingError) as err:
            check_reachable(uri)
        seconds = time.monotonic() - t0
    assert seconds < BUDGET_S + 1.5, seconds
    message = str(err.value)
    assert uri in message and f"within {BUDGET_S:g} s" in message and TIMEOUT_ENV in message
    assert "pipeline.tracking: false" in message


def test_unresponsive_server_fails_the_step_in_bounded_time(tmp_path: Path) -> None:
    """The whole step (a fresh interpreter): one error line, exit 2, no output, well under 30 s."""
    write_params(tmp_path / "params.yaml", tiny_params(pipeline={"tracking": True}))
    with silent_server() as uri:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DAFT_"))}
        env.update(MLFLOW_TRACKING_URI=uri, **{TIMEOUT_ENV: str(BUDGET_S)})
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "components.prepare_data", "--out", "out"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        seconds = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and uri in errors[0] and "Traceback" not in res.stderr
    assert seconds < BUDGET_S + 10 < 30, seconds  # the budget plus interpreter and import start-up
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# DVC experiments in a temporary workspace
# --------------------------------------------------------------------------------------------------


def test_store_root_outside_dvc_temp_workspace(tmp_path: Path, monkeypatch) -> None:
    real = tmp_path / "repo"
    temp = real / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc123"
    temp.mkdir(parents=True)
    for d in (real, temp):
        (d / "params.yaml").write_text("a: 1\n")
    for k in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(temp)
    assert store_root() == real.resolve()
    assert store_root(real) == real.resolve()
    # A layout DVC may use one day: found from its environment instead.
    other = real / ".dvc" / "tmp" / "elsewhere" / "tmpxyz"
    other.mkdir(parents=True)
    (other / "params.yaml").write_text("a: 1\n")
    assert store_root(other) == other.resolve()
    monkeypatch.setenv("DVC_ROOT", str(real))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    assert store_root(other) == real.resolve()


@pytest.mark.slow
def test_dvc_exp_run_temp_keeps_its_runs(tmp_path: Path) -> None:
    """`dvc exp run --temp` runs the stage in <repo>/.dvc/tmp/exps/... and deletes that copy afterwards;
    the run must land in the real root's mlflow.db (and its artifact location in <repo>/mlartifacts)."""
    from mlflow import MlflowClient

    from tests.test_dvc_e2e import _run, git_project

    repo = tmp_path / "repo"
    repo.mkdir()
    experiment = "daft-exp-temp"
    params = tiny_params(pipeline={"tracking": True, "experiment": experiment})
    env = git_project(repo, params, {"DAFT_WARM_START": "0"}, drop=("MLFLOW_", "DAFT_", "DVC_"))
    out = _run([str(BIN / "dvc"), "exp", "run", "--temp", "prepare_data"], repo, env, timeout=600)
    assert "Ran experiment" in out, out[-3000:]
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db")), "a store inside the temp workspace"
    db = repo / "mlflow.db"
    assert db.is_file(), out[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{db.as_posix()}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    assert exp.artifact_location == (repo / "mlartifacts").resolve().as_uri()
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`daft.step` = 'prepare_data'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["count.id_train"] > 0


def test_no_more_waiting_once_the_server_stopped_answering(tmp_path: Path, monkeypatch) -> None:
    """When a call inside the step gives up on a silent server, the step does not spend another budget
    trying to mark its run FAILED on that server."""
    from mlflow import MlflowClient

    from components.tracking import step_run
    from components.tracking.runs import FAILED_END_BUDGET_S

    (tmp_path / "params.yaml").write_text("pipeline: {tracking: true}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    gone = TrackingError("MLflow tracking at http://x is unreachable")
    gone.unreachable = True
    ended: list[str] = []
    monkeypatch.setattr("components.tracking.tracker.end_runs", lambda *a, **k: ended.append("called"))
    with (
        pytest.raises(TrackingError),
        step_run("prepare_data", {}, experiment="e", pipeline_id="p" * 16) as t,
    ):
        run_id = t.run_id
        raise gone
    assert ended == [] and FAILED_END_BUDGET_S <= 5
    run = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}").get_run(run_id)
    assert run.info.status in ("RUNNING", "FAILED")  # never FINISHED; not waited for
