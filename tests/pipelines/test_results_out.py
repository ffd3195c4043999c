"""Kubeflow on a real cluster: every result out.

* In a pod (``KUBERNETES_SERVICE_HOST`` set) with tracking on, a local tracking store (the default sqlite,
  sqlite:, file:, a path) fails the step at once, in one line, unless ``DAFT_ALLOW_LOCAL_TRACKING=1``.
* A step against a tracking server returns its run's id and UI URL; the KFP wrappers put them (and the
  registered version) in their output artifact's metadata.
* ``submit`` refuses a run that would track to no server, before contacting the host.
* The report records ``champion_version: null`` and a ``champion_note`` (and warns) when the best method
  has no registered version, instead of skipping the `champion` alias silently.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from components import prepare_data, pretrained
from components.params import params_from_dict, params_to_json
from components.tracking import StepTracker
from pipelines import components as kfp_components
from pipelines.cli import main as cli_main
from tests.pipelines.artifacts import Art
from tests.pipelines.test_submit import TOKEN, FakeKfp, kfp_server  # noqa: F401  (kfp_server: a fixture)
from tests.tiny_params import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[2]
POD = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}


def _ui(root: Path) -> dict[str, Any]:
    """The report's KFP UI outputs (real artifacts: the body logs a confusion matrix on one)."""
    from kfp.dsl import ClassificationMetrics, Markdown

    return {
        "report_md": Markdown(uri=str(root / "report_md")),
        "confusion_matrix": ClassificationMetrics(uri=str(root / "confusion_matrix")),
    }


def _tree(tag: str, tracking: bool = True) -> dict[str, Any]:
    return tiny_params(
        pipeline={"tracking": tracking, "experiment": f"results-{tag}", "registered_model": f"results-{tag}"}
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("results-data") / "data"
    prepare_data.run(params_from_dict(_tree("data", tracking=False)), out)
    return out


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder (params.yaml: tracking on) as the cwd, so the default store would be its mlflow.db."""
    write_params(tmp_path / "params.yaml", _tree(uuid.uuid4().hex[:8]))
    monkeypatch.chdir(tmp_path)
    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_REGISTRY_URI",
        "DAFT_ALLOW_LOCAL_TRACKING",
        "DAFT_PIPELINE_RUN_ID",
    ):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------------------------
# (a) a local store in a pod: one line, before any work; DAFT_ALLOW_LOCAL_TRACKING=1 keeps it working
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", [None, "sqlite:///{p}/pod.db", "file://{p}/mlruns", "{p}/mlruns", "mlruns"])
def test_local_store_in_a_pod_fails_at_once(project: Path, monkeypatch, capsys, uri: str | None) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", POD["KUBERNETES_SERVICE_HOST"])
    if uri is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(p=project))
    out = project / "models" / "pretrained"
    # The data folder does not exist: a step that got past the tracking check would fail on it instead.
    rc = pretrained.main(["--params", "params.yaml", "--data", str(project / "no-data"), "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert len(errors) == 1, err
    line = errors[0]
    assert "local to this Kubernetes pod" in line
    assert "tracking_uri" in line and "MLFLOW_TRACKING_URI" in line and "pipeline.tracking: false" in line
    assert "DAFT_ALLOW_LOCAL_TRACKING=1" in line
    assert "Traceback" not in err
    assert not out.exists() and not (project / "models").exists()
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()


def test_opt_out_keeps_a_local_store_in_a_pod(project: Path, data_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", POD["KUBERNETES_SERVICE_HOST"])
    monkeypatch.setenv("DAFT_ALLOW_LOCAL_TRACKING", "1")
    out = project / "models" / "pretrained"
    rc = pretrained.main(["--params", "params.yaml", "--data", str(data_dir), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "model.pt").is_file()
    assert (project / "mlflow.db").is_file()  # the default store, as outside a pod


# ---------------------------------------------------------------------------------------------------
# (b) against a tracking server: the run's id and UI URL come back
# ---------------------------------------------------------------------------------------------------


def test_step_returns_its_run_url_on_the_server(
    project: Path, data_dir: Path, mlflow_server, monkeypatch
) -> None:
    import mlflow

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", POD["KUBERNETES_SERVICE_HOST"])  # a server: fine in a pod
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    params = params_from_dict(_tree(uuid.uuid4().hex[:8]))
    info = pretrained.run(params, data_dir, project / "pretrained")
    run_id, url = info["mlflow_run_id"], info["mlflow_run_url"]
    run = mlflow.MlflowClient(tracking_uri=mlflow_server.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert url == f"{mlflow_server.uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    assert info["registered_version"] == "1"


def test_run_url_has_no_credentials_and_is_none_untracked() -> None:
    tracker = StepTracker(
        uri="https://alice:s3cr3t-pass@mlflow.example:443/", run_id="abc", experiment_id="7"
    )
    assert tracker.run_url == "https://***@mlflow.example:443/#/experiments/7/runs/abc"
    assert StepTracker(uri="sqlite:///x/mlflow.db", run_id="abc", experiment_id="7").run_url is None
    assert StepTracker().run_info() == {"mlflow_run_id": None, "mlflow_run_url": None}


# ---------------------------------------------------------------------------------------------------
# (c) submit refuses a run without a tracking server, before contacting the host
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ((), "no tracking server is given"),
        (
            ("--param", "tracking_uri=sqlite:///mlflow.db"),
            "--param tracking_uri sqlite:///mlflow.db is a local",
        ),
        (("--tracking-uri", "file:///srv/mlruns"), "--tracking-uri file:///srv/mlruns is a local store"),
        (("--param", "tracking=true", "--param", "tracking_uri=/srv/mlruns"), "is a local store"),
    ],
)
def test_submit_refuses_without_a_tracking_server(
    kfp_server: FakeKfp,  # noqa: F811
    monkeypatch,
    tmp_path: Path,
    capsys,
    extra: tuple[str, ...],
    expected: str,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    rc = cli_main(
        ["submit", "--params", str(ROOT / "params.yaml"), "--host", kfp_server.url, "--token", TOKEN, *extra]
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, err
    assert len(errors) == 1 and expected in errors[0], err
    assert "--param tracking_uri=http" in errors[0] and "--param tracking=false" in errors[0]
    assert kfp_server.requests == []  # nothing reached the host


SECRET_URI = """\
secrets:
  daft-mlflow-credentials:
    MLFLOW_TRACKING_URI: MLFLOW_TRACKING_URI
    MLFLOW_TRACKING_USERNAME: MLFLOW_TRACKING_USERNAME
"""


@pytest.mark.parametrize("how", ["tracking off", "server URI from a secret"])
def test_submit_without_a_uri_when_none_is_needed(
    kfp_server: FakeKfp,  # noqa: F811
    monkeypatch,
    tmp_path: Path,
    capsys,
    how: str,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    args = ["--host", kfp_server.url, "--token", TOKEN]
    if how == "tracking off":
        args += ["--param", "tracking=false"]
    else:  # the pods get MLFLOW_TRACKING_URI from a secret (the platform file maps it)
        (tmp_path / "platform.yaml").write_text(SECRET_URI)
        args += ["--platform", str(tmp_path / "platform.yaml")]
    rc = cli_main(["submit", "--params", str(ROOT / "params.yaml"), *args])
    assert rc == 0, capsys.readouterr().err
    (run,) = kfp_server.calls("POST", "/apis/v2beta1/runs")
    assert "tracking_uri" not in run["body"]["runtime_config"].get("parameters", {})


# ---------------------------------------------------------------------------------------------------
# (d) the KFP wrappers: run URL, run id and registered version in the artifact's metadata; the champion
# ---------------------------------------------------------------------------------------------------


def _metrics(folder: Path, method: str, val: float, version: str | None = None) -> Art:
    folder.mkdir(parents=True)
    row = {
        "method": method,
        "id_val_accuracy": val,
        "id_test_accuracy": val,
        "ood": {"printed": val / 2},
        "ood_mean_accuracy": val / 2,
    }
    (folder / f"{method}.json").write_text(json.dumps(row))
    if version is not None:
        (folder / "finetune.json").write_text(json.dumps({"method": method, "version": version, "lr": val}))
    return Art(str(folder))


def test_wrappers_put_the_run_in_the_artifact_metadata(
    project: Path, data_dir: Path, mlflow_server, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # restored after the test (step_setup exports the URI)
    monkeypatch.setenv("DAFT_PIPELINE_RUN_ID", uuid.uuid4().hex)
    params_json = params_to_json(params_from_dict(_tree(uuid.uuid4().hex[:8])))
    setup = (params_json, mlflow_server.uri)  # the run id comes from DAFT_PIPELINE_RUN_ID, no input

    model, metrics = Art(str(project / "model")), Art(str(project / "metrics"))
    kfp_components.pretrained(*setup, dataset=Art(str(data_dir)), model=model, metrics=metrics)
    assert model.metadata["mlflow_run_url"].startswith(f"{mlflow_server.uri}/#/experiments/")
    assert model.metadata["mlflow_run_url"].endswith(f"/runs/{model.metadata['mlflow_run_id']}")
    assert model.metadata["registered_version"] == "1"
    assert "mlflow_run_url" not in metrics.metadata  # the Metrics artifact holds numbers only

    # The report: `lp` has no registered version in this registry, so no champion, but a note and a warning.
    report = Art(str(project / "report"))
    lp = _metrics(project / "eval-lp", "lp", 0.9)
    with caplog.at_level(logging.WARNING):
        kfp_components.report(
            *setup, lp=lp, report=report, metrics=Art(str(project / "m2")), **_ui(project / "ui")
        )
    assert report.metadata["mlflow_run_url"].startswith(f"{mlflow_server.uri}/#/experiments/")
    assert "alias not moved" in report.metadata["champion_note"]
    assert "registered_version" not in report.metadata
    summary = json.loads((project / "report" / "reports" / "summary.json").read_text())
    assert summary["champion"] == "lp" and summary["champion_version"] is None
    assert "linear-probe" in summary["champion_note"]
    assert any("champion" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    # The sweep's selection: the best `ft` point has no version to move the alias to: noted, not failed.
    caplog.clear()
    points = [_metrics(project / f"eval-ft-{i}", "ft", v, version="") for i, v in enumerate((0.95, 0.97))]
    lp = _metrics(project / "eval-lp2", "lp", 0.5)
    report = Art(str(project / "sweep"))
    with caplog.at_level(logging.WARNING):
        kfp_components.select_best(
            *setup, lp=lp, report=report, metrics=Art(str(project / "m3")), ft=points, **_ui(project / "ui3")
        )
    assert report.metadata["champion"] == "ft"
    assert "no registered version" in report.metadata["champion_note"]
    assert report.metadata["mlflow_run_id"]
    assert any("alias was not moved" in r.getMessage() for r in caplog.records)
