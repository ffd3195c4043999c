"""Stage test of components.wise_ft on the real digits data with a tiny BN model: the chosen mix in
finetune's format, its evaluation and report row, its registered version (a sqlite store), bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components import evaluate, finetune, linear_probe, prepare_data, pretrained, report, wise_ft
from components.params import ParamsError, params_from_dict
from daft_core.models import load_model
from daft_core.wise_ft import interpolate, start_model
from tests.tiny_params import tiny_params, write_params

ALPHAS = [0.0, 0.5, 1.0]


def _tree(tracking: bool) -> dict:
    tree = tiny_params(wise_ft={"methods": ["ft"], "alphas": ALPHAS})
    tree["pipeline"].update(tracking=tracking, experiment="wise-test", registered_model="wise-test")
    tree["finetune"]["methods"] = {"ft": {"start": "pretrained", "lr": 0.01}}
    return tree


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare_data -> pretrained -> {linear_probe, finetune[ft] -> wise_ft[ft]} -> evaluate -> report."""
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("wise")
    params = params_from_dict(_tree(tracking=False))
    prepare_data.run(params, wd / "data")
    pretrained.run(params, wd / "data", wd / "models/pretrained")
    linear_probe.run(params, wd / "models/pretrained", wd / "data", wd / "models/linear_probe")
    finetune.run(params, "ft", wd / "models/pretrained", wd / "data", wd / "models/finetune/ft")
    models, data = wd / "models", wd / "data"
    summary = wise_ft.run(
        params,
        "ft",
        models / "finetune/ft",
        models / "pretrained",
        data,
        models / "wise_ft/ft",
        wd / "curve.json",
    )
    assert summary["registered_version"] is None  # untracked
    for method, model in (("lp", "linear_probe"), ("ft", "finetune/ft"), ("wise_ft_ft", "wise_ft/ft")):
        evaluate.run(
            params, method, models / model, models / "pretrained", data, wd / f"metrics/{method}.json"
        )
    report.run(params, wd / "metrics", wd / "reports")
    return wd


def test_the_chosen_mix_is_written_in_finetunes_format(workdir: Path) -> None:
    out = workdir / "models/wise_ft/ft"
    assert {"model.pt", "wise_ft.json", ".daft-output.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "wise_ft.json").read_text())
    curve = info["curve"]
    assert [p["alpha"] for p in curve] == ALPHAS
    assert json.loads((workdir / "curve.json").read_text()) == curve
    best = max(p["val_accuracy"] for p in curve)
    assert info["alpha"] == min(p["alpha"] for p in curve if p["val_accuracy"] == best)  # ties: smaller α
    assert info["start"] == "pretrained" and info["val_accuracy"] == best

    model = load_model(out / "model.pt")
    assert model.extra["stage"] == "wise_ft"
    assert model.extra["wise_ft"] == {
        "method": "ft",
        "alpha": info["alpha"],
        "start": "pretrained",
        "alias": "wise-ft-ft",
    }
    start, ft = (
        load_model(workdir / "models/pretrained/model.pt"),
        load_model(workdir / "models/finetune/ft/model.pt"),
    )
    assert info["start_head"] == "zero"  # FT's random head is stored nowhere: a zero start head
    want = interpolate(start_model(start, "random"), ft, info["alpha"]).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    # The α = 1 point is the fine-tuned model itself: its ID val accuracy is finetune's best.
    ft_summary = json.loads((workdir / "models/finetune/ft/summary.json").read_text())
    assert curve[-1]["val_accuracy"] == pytest.approx(ft_summary["best_val_accuracy"])


def test_evaluation_and_report_show_the_wise_row_after_its_method(workdir: Path) -> None:
    row = json.loads((workdir / "metrics/wise_ft_ft.json").read_text())
    alpha = json.loads((workdir / "models/wise_ft/ft/wise_ft.json").read_text())["alpha"]
    assert row["wise_ft"]["method"] == "ft" and row["wise_ft"]["alpha"] == alpha
    table = (workdir / "reports/table.md").read_text().splitlines()
    names = [line.split("|")[1].strip().replace(" (champion)", "") for line in table[2:]]
    assert names == ["lp", "ft", f"wise_ft[ft] (α={alpha:g})"]
    assert "ΔW backbone" in table[0]
    summary = json.loads((workdir / "reports/summary.json").read_text())
    assert summary["methods"]["wise_ft_ft"]["wise_ft_alpha"] == alpha
    # The probe leaves the backbone untouched: backbone distance 0, its refit head moved.
    lp = json.loads((workdir / "metrics/lp.json").read_text())
    assert lp["parameter_distance_total"]["l2"] == 0.0 and lp["parameter_distance_head"]["l2"] > 0
    assert lp["parameter_distance_head"]["num_params"] < lp["parameter_distance_total"]["num_params"]


@pytest.mark.slow
def test_registered_with_its_alias_and_lineage(workdir: Path, tmp_path: Path, monkeypatch) -> None:
    """Tracked to a sqlite store: a new version with alias wise-ft-<method alias>, derived from the version
    the method's alias points at (a stand-in here: registering the real ft model would cost ~10 s)."""
    import mlflow

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("wise-test")
    ft = client.create_model_version("wise-test", source=(tmp_path / "ft").as_uri())
    client.set_registered_model_alias("wise-test", "ft", ft.version)
    models = workdir / "models"
    summary = wise_ft.run(
        params_from_dict(_tree(tracking=True)),
        "ft",
        models / "finetune/ft",
        models / "pretrained",
        workdir / "data",
        tmp_path / "out",
    )
    wise = client.get_model_version_by_alias("wise-test", "wise-ft-ft")
    assert summary["registered_version"] == str(wise.version) != str(ft.version)
    assert wise.tags["stage"] == "wise_ft" and wise.tags["method"] == "wise_ft_ft"
    assert wise.tags["source_version"] == str(ft.version)
    assert "α chosen on ID val" in wise.description and "Derived from `ft`" in wise.description
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["alpha"] == summary["alpha"] and run.info.run_name == "wise_ft[ft]"


def test_cli_takes_the_start_from_params_and_refuses_a_wrong_start(
    workdir: Path, tmp_path: Path, capsys
) -> None:
    params_file = write_params(tmp_path / "params.yaml", _tree(tracking=False))
    common = ["--params", str(params_file), "--method", "ft", "--model", str(workdir / "models/finetune/ft")]
    common += ["--data", str(workdir / "data")]
    wrong = wise_ft.main(
        [*common, "--start", str(workdir / "models/linear_probe"), "--out", str(tmp_path / "a")]
    )
    err = capsys.readouterr().err
    assert wrong == 2 and "'linear_probe' model, but 'ft' starts from 'pretrained'" in err
    assert not (tmp_path / "a").exists()
    ok = wise_ft.main([*common, "--starts", str(workdir / "models"), "--out", str(tmp_path / "b")])
    assert ok == 0
    mixed, chosen = load_model(tmp_path / "b/model.pt"), load_model(workdir / "models/wise_ft/ft/model.pt")
    assert all(torch.equal(v, chosen.state_dict()[k]) for k, v in mixed.state_dict().items())


def test_not_a_finetuned_model_and_unconfigured_methods_are_clear_errors(
    workdir: Path, tmp_path: Path
) -> None:
    params = params_from_dict(_tree(tracking=False))
    with pytest.raises(wise_ft.StepError, match="not 'ft''s fine-tuned model"):
        wise_ft.run(
            params,
            "ft",
            workdir / "models/linear_probe",
            workdir / "models/pretrained",
            workdir / "data",
            tmp_path / "o",
        )
    tree = _tree(tracking=False)
    tree["wise_ft"]["methods"] = ["daft"]
    with pytest.raises(
        ParamsError, match=r"wise_ft.methods: \['daft'\] not configured under finetune.methods"
    ):
        params_from_dict(tree)
