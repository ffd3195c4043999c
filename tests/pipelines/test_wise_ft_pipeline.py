"""The optional WiSE-FT tasks in the Kubeflow pipeline: present only when params enable them, wired as
dvc.yaml's wise_ft / evaluate_wise_ft stages, feeding the report; refused with the sweep."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml

from components.params import load_params
from daft_core.methods import FINETUNED_METHODS
from pipelines import components as comps
from pipelines.pipeline import PipelineOptions, build_pipeline, compile_pipeline
from tests.pipelines.artifacts import Art

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example.com/ml/daft-pipeline:1.2.3"


def test_wise_tasks_mix_each_branch_with_its_start_and_feed_the_report(tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml", {"wise_ft.methods": ["ft", "daft"]})
    out = tmp_path / "p.yaml"
    compile_pipeline(params, PipelineOptions(image=IMAGE), str(out))
    spec = next(yaml.safe_load_all(out.read_text()))
    tasks = {t["taskInfo"]["name"]: (k, t) for k, t in spec["root"]["dag"]["tasks"].items()}
    name_of = {k: n for n, (k, _) in tasks.items()}

    def producer(display: str, artifact: str) -> str:
        src = tasks[display][1]["inputs"]["artifacts"][artifact]["taskOutputArtifact"]
        return name_of[src["producerTask"]]

    assert {n for n in tasks if "wise" in n} == {
        "wise_ft-ft",
        "wise_ft-daft",
        "evaluate-wise_ft_ft",
        "evaluate-wise_ft_daft",
    }
    assert (
        producer("wise_ft-ft", "finetuned") == "finetune-ft"
        and producer("wise_ft-ft", "start") == "pretrained"
    )
    assert producer("wise_ft-daft", "finetuned") == "finetune-daft"
    assert producer("wise_ft-daft", "start") == "convert-bn"
    for m in ("ft", "daft"):
        assert producer(f"evaluate-wise_ft_{m}", "model") == f"wise_ft-{m}"
        assert producer(f"evaluate-wise_ft_{m}", "reference") == "pretrained"
        assert producer("report", f"wise_ft_{m}") == f"evaluate-wise_ft_{m}"
        p = tasks[f"evaluate-wise_ft_{m}"][1]["inputs"]["parameters"]
        assert p["method"]["runtimeValue"]["constant"] == f"wise_ft_{m}"
    # The wise_ft task reads its own slice of the params (wise_ft, evaluate, the branches' starts).
    src = tasks["wise_ft-ft"][1]["inputs"]["parameters"]["params_json"]["taskOutputParameter"]
    assert name_of[src["producerTask"]] == "resolve-params" and src["outputParameterKey"] == "wise_ft"
    assert "wise_ft_lp_ft" not in tasks["report"][1]["inputs"]["artifacts"]  # only the enabled ones


def test_wise_slice_validates_with_the_branches_it_needs() -> None:
    params = load_params(ROOT / "params.yaml", {"wise_ft.methods": ["lp_ft"], "wise_ft.alphas": [0.0, 1.0]})
    tree = params.model_dump(mode="json")
    got = comps.step_setup("wise_ft", comps.split_params(json.dumps(tree))["wise_ft"], "")
    assert got.wise_ft == params.wise_ft and got.evaluate == params.evaluate
    assert got.method("lp_ft").start == "linear_probe"


def test_report_takes_one_wise_input_per_finetuned_method() -> None:
    names = set(inspect.signature(comps.report).parameters)
    assert {f"wise_ft_{m}" for m in FINETUNED_METHODS} <= names


def test_sweep_with_wise_ft_is_a_clear_error() -> None:
    params = load_params(ROOT / "params.yaml", {"wise_ft.methods": ["ft"]})
    with pytest.raises(ValueError, match=r"wise_ft\.methods is not supported by the sweep pipeline"):
        build_pipeline(params, PipelineOptions(image=IMAGE, sweep=True))


def test_wrapper_bodies_wise_then_evaluate_then_report(tmp_path: Path, monkeypatch) -> None:
    """The component bodies as a pod runs them: wise_ft's JSON result travels through evaluate to the
    report, whose table shows the WiSE-FT row with its α."""
    from kfp.dsl import ClassificationMetrics, Markdown

    from components import finetune, prepare_data, pretrained
    from components.params import params_from_dict
    from tests.tiny_params import tiny_params

    monkeypatch.delenv("DAFT_EXPECT_GPU", raising=False)
    torch.set_num_threads(1)
    tree = tiny_params(wise_ft={"methods": ["ft"], "alphas": [0.0, 1.0]})
    tree["finetune"]["methods"] = {"ft": {"start": "pretrained", "lr": 0.01}}
    params = params_from_dict(tree)
    slices = comps.split_params(json.dumps(params.model_dump(mode="json")))
    prepare_data.run(params, tmp_path / "data")
    pretrained.run(params, tmp_path / "data", tmp_path / "pre")
    finetune.run(params, "ft", tmp_path / "pre", tmp_path / "data", tmp_path / "ft")
    data, pre = Art(str(tmp_path / "data")), Art(str(tmp_path / "pre"))
    model, metrics = Art(str(tmp_path / "wise")), Art(str(tmp_path / "wise_metrics"))
    info = json.loads(
        comps.wise_ft(slices["wise_ft"], "", "ft", data, Art(str(tmp_path / "ft")), pre, model, metrics)
    )
    assert info["method"] == "wise_ft_ft" and info["alpha"] in (0.0, 1.0) and info["version"] == ""
    assert model.metadata["stage"] == "wise_ft" and metrics.metadata["alpha"] == info["alpha"]

    evaluation = Art(str(tmp_path / "eval"))
    comps.evaluate(
        "", "wise_ft_ft", data, model, pre, evaluation, Art(""), slices["evaluate"], None, json.dumps(info)
    )
    lp = Art(str(tmp_path / "eval_lp"))  # the report's one required input: any evaluation will do here
    comps.evaluate("", "lp", data, pre, pre, lp, Art(""), slices["evaluate"])
    report = Art(str(tmp_path / "report"))
    ui = {
        "report_md": Markdown(uri=str(tmp_path / "md")),
        "confusion_matrix": ClassificationMetrics(uri=str(tmp_path / "cm")),
    }
    comps.report(slices["report"], "", lp, report, Art(""), **ui, wise_ft_ft=evaluation)
    table = (tmp_path / "report/reports/table.md").read_text()
    assert f"wise_ft[ft] (α={info['alpha']:g})" in table
