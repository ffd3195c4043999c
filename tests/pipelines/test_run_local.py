"""The whole Kubeflow DAG on this machine (kfp.local SubprocessRunner), and the sweep's selection."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.params import params_from_dict
from pipelines.cli import main as cli_main
from pipelines.cli import run_local
from pipelines.components import assemble_report
from pipelines.pipeline import PipelineOptions
from tests.tiny_params import tiny_params

ROOT = Path(__file__).resolve().parents[2]
MODEL = "daft-kfp-tiny"
# The shared shrunken params tree (tests/tiny_params.py: tiny BN CNN, 1 epoch, few Cs, CPU), tracked.
TINY: dict[str, Any] = tiny_params(
    pipeline={"experiment": "daft-kfp-local", "registered_model": MODEL, "tracking": True}
)
ALIASES = {"pretrained", "bn-converted", "linear-probe", "ft", "lp-ft", "daft", "champion"}


def _dvc_outputs() -> tuple[set[str], set[str]]:
    """The metrics / plots files dvc.yaml declares for the evaluate, evaluate_lp and report stages."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    per_method: set[str] = set()
    for stage in ("evaluate", "evaluate_lp"):
        spec = stages[stage].get("do", stages[stage])
        per_method |= {next(iter(m)) if isinstance(m, dict) else m for m in spec.get("metrics", [])}
    report = stages["report"]
    files = {next(iter(m)) for m in report["metrics"]} | {next(iter(p)) for p in report["plots"]}
    return per_method, files


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _aliases(uri: str) -> dict[str, str]:
    return {k: str(v) for k, v in _client(uri).get_registered_model(MODEL).aliases.items()}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The steps run as subprocesses in this working directory (MLflow's default artifact root lands here).
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DAFT_PIPELINE_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.mark.slow
def test_run_local_whole_dag_writes_dvc_outputs_and_aliases(workdir: Path, capsys) -> None:
    params_file = workdir / "tiny.yaml"
    params_file.write_text(yaml.safe_dump(TINY))
    uri = f"sqlite:///{(workdir / 'mlflow.db').as_posix()}"
    t0 = time.monotonic()
    rc = cli_main(
        [
            "run-local",
            "--params",
            str(params_file),
            "--pipeline-root",
            str(workdir / "kfp_local"),
            "--out",
            str(workdir / "out"),
            "--tracking-uri",
            uri,
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    print(f"run-local took {time.monotonic() - t0:.0f} s")
    out = workdir / "out"

    # The same files `dvc repro` writes (as declared in dvc.yaml), in the same layout.
    per_method, report_files = _dvc_outputs()
    for method in ("lp", *TINY["finetune"]["methods"]):
        for template in per_method:
            path = out / template.replace("${key}", method)
            assert path.is_file(), path
        row = json.loads((out / "metrics" / "methods" / f"{method}.json").read_text())
        assert row["method"] == method
        assert 0 <= row["id_val_accuracy"] <= 1 and 0 <= row["id_test_accuracy"] <= 1
        assert set(row["ood"]) and row["distortion"]["id_test_l2"] >= 0
    for f in report_files:
        assert (out / f).is_file(), f
    summary = json.loads((out / "reports" / "summary.json").read_text())
    assert set(summary["methods"]) == {"lp", "ft", "lp_ft", "daft"}
    best = max(summary["methods"], key=lambda m: summary["methods"][m]["id_val_accuracy"])
    assert summary["champion"] == best
    assert "champion" in captured.out  # the CLI's closing line

    # Registered model versions and aliases, as in the local loop; champion = the best method's version.
    aliases = _aliases(uri)
    assert set(aliases) == ALIASES
    method_alias = {"lp": "linear-probe", "ft": "ft", "lp_ft": "lp-ft", "daft": "daft"}
    assert aliases["champion"] == aliases[method_alias[summary["champion"]]]
    client = _client(uri)
    for alias in ("ft", "lp-ft", "daft"):
        mv = client.get_model_version_by_alias(MODEL, alias)
        assert mv.tags["stage"] == "finetune"
        assert mv.tags["method"] == alias.replace("-", "_")
    assert client.get_model_version_by_alias(MODEL, "daft").tags["source_version"] == aliases["bn-converted"]

    # Every step logged under one parent run whose id is the KFP run id.
    exp = client.get_experiment_by_name("daft-kfp-local")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("daft.role") == "pipeline"]
    steps = [r for r in runs if r.data.tags.get("daft.role") == "step"]
    assert len(parents) == 1
    assert (
        len(steps) == 1 + 1 + 1 + 1 + 3 + 4 + 1
    )  # prepare, pretrained, convert, probe, 3 ft, 4 eval, report
    assert {r.data.tags["mlflow.parentRunId"] for r in steps} == {parents[0].info.run_id}
    assert parents[0].data.tags.get("daft.pipeline_run_id.source") == "DAFT_PIPELINE_RUN_ID"


@pytest.mark.slow
def test_sweep_2x1_selects_best_id_val_and_sets_champion(workdir: Path) -> None:
    raw = json.loads(json.dumps(TINY))
    raw["finetune"]["methods"] = {"daft": {"start": "bn_converted", "head_lr": 1.0, "backbone_lr": 1.0e-4}}
    params = params_from_dict(raw)
    uri = f"sqlite:///{(workdir / 'mlflow.db').as_posix()}"
    # 2 x 1. A frozen zero head (lr 0) predicts one class (chance); lr 5 learns a head even in one epoch of
    # tiny_cnn, so the better point is known in advance and sits second (a tie would go to the first).
    grid = {"daft": {"head_lr": [0.0, 5.0], "backbone_lr": [0.0]}}
    # parallelism 1: the second point registers last, so the `daft` alias points at it until selection.
    opts = PipelineOptions(sweep=True, sweep_grid=grid, sweep_parallelism=1, retries=0)
    summary = run_local(
        params,
        opts,
        pipeline_root=workdir / "kfp_local",
        out_dir=workdir / "out",
        arguments={"tracking_uri": uri},
    )
    sweep = json.loads((workdir / "out" / "metrics" / "sweep.json").read_text())
    daft_rows = [r for r in sweep if r["method"] == "daft"]
    assert sorted(r["head_lr"] for r in daft_rows) == [0.0, 5.0]
    assert {r["backbone_lr"] for r in daft_rows} == {0.0}
    assert len({r["version"] for r in daft_rows}) == 2  # each point registered its own version
    by_head = {r["head_lr"]: r for r in daft_rows}
    # Best by ID val; a tie goes to the first point of the grid.
    first, second = by_head[0.0], by_head[5.0]
    assert second["id_val_accuracy"] > first["id_val_accuracy"], daft_rows
    winner = second
    selected = json.loads((workdir / "out" / "metrics" / "methods" / "daft.json").read_text())
    assert selected["id_val_accuracy"] == winner["id_val_accuracy"]
    aliases = _aliases(uri)
    assert aliases["daft"] == winner["version"]
    best_method = max(("lp", "daft"), key=lambda m: summary["methods"][m]["id_val_accuracy"])
    assert summary["champion"] == best_method
    assert aliases["champion"] == (winner["version"] if best_method == "daft" else aliases["linear-probe"])


def _fake_evaluation(root: Path, method: str, id_val: float, info: dict[str, Any]) -> str:
    root.mkdir(parents=True)
    row = {
        "method": method,
        "id_val_accuracy": id_val,
        "id_test_accuracy": id_val - 0.01,
        "id_test_ece": 0.05,
        "ood": {"printed": id_val - 0.2},
        "ood_ece": {"printed": 0.1},
        "ood_mean_accuracy": id_val - 0.2,
        "distortion": {"id_test_l2": 1.0, "id_test_cosine": 0.9, "ood_l2": 2.0, "ood_cosine": 0.8},
    }
    (root / f"{method}.json").write_text(json.dumps(row))
    (root / "finetune.json").write_text(json.dumps(info))
    return str(root)


def test_select_picks_best_id_val_per_method_without_tracking(tmp_path: Path) -> None:
    """The sweep's selection on its own (no MLflow): best ID val per method, then the report's champion."""
    raw = json.loads(json.dumps(TINY))
    raw["pipeline"]["tracking"] = False
    params = params_from_dict(raw)
    ev = tmp_path / "ev"
    groups = {
        "lp": [_fake_evaluation(ev / "lp", "lp", 0.70, {})],
        "daft": [
            _fake_evaluation(ev / "d0", "daft", 0.80, {"head_lr": 0.1, "backbone_lr": 1e-5, "version": "3"}),
            _fake_evaluation(ev / "d1", "daft", 0.90, {"head_lr": 1.0, "backbone_lr": 1e-5, "version": "4"}),
        ],
        "ft": [
            _fake_evaluation(ev / "f0", "ft", 0.85, {"head_lr": 0.01, "backbone_lr": 0.01, "version": "5"}),
            _fake_evaluation(ev / "f1", "ft", 0.85, {"head_lr": 0.1, "backbone_lr": 0.1, "version": "6"}),
        ],
    }
    summary = assemble_report(params, groups, str(tmp_path / "report"))
    selected = json.loads(summary["selected"])
    assert selected["daft"]["head_lr"] == 1.0 and selected["daft"]["version"] == "4"
    assert selected["ft"]["version"] == "5"  # tie: the first configuration
    assert summary["champion"] == "daft"
    assert len(summary["sweep"]) == 5
    methods = tmp_path / "report" / "metrics" / "methods"
    assert sorted(p.name for p in methods.glob("*.json")) == ["daft.json", "ft.json", "lp.json"]
    assert json.loads((methods / "daft.json").read_text())["id_val_accuracy"] == 0.90
    assert (tmp_path / "report" / "reports" / "summary.json").is_file()
    assert len(json.loads((tmp_path / "report" / "metrics" / "sweep.json").read_text())) == 5
