"""Stage tests: each step's run() on the real digits data with a tiny BN model, and its CLI's errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components import convert_bn, evaluate, finetune, linear_probe, prepare_data, pretrained, report
from components.params import params_from_dict
from daft_core.data import load_bundle
from daft_core.models import load_model
from tests.tiny_params import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the steps in DAG order once; the tests below inspect what each wrote."""
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("steps")
    params = params_from_dict(tiny_params())
    prepare_data.run(params, wd / "data")
    pretrained.run(params, wd / "data", wd / "models/pretrained")
    convert_bn.run(params, wd / "models/pretrained", wd / "data", wd / "models/bn_converted")
    linear_probe.run(params, wd / "models/pretrained", wd / "data", wd / "models/linear_probe")
    for method, start in (("ft", "pretrained"), ("lp_ft", "linear_probe"), ("daft", "bn_converted")):
        finetune.run(
            params,
            method,
            wd / f"models/{start}",
            wd / "data",
            wd / f"models/finetune/{method}",
            wd / f"metrics/curves/{method}.json",
        )
        evaluate.run(
            params,
            method,
            wd / f"models/finetune/{method}",
            wd / "models/pretrained",
            wd / "data",
            wd / f"metrics/methods/{method}.json",
        )
    evaluate.run(
        params,
        "lp",
        wd / "models/linear_probe",
        wd / "models/pretrained",
        wd / "data",
        wd / "metrics/methods/lp.json",
    )
    report.run(params, wd / "metrics/methods", wd / "reports")
    return wd


def test_prepare_data_writes_a_valid_bundle(workdir: Path) -> None:
    bundle = load_bundle(workdir / "data")
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797
    assert set(bundle.ood) == {"printed", "corrupted"}
    assert not list(workdir.glob(".data*")), "no temp dirs left behind"


def test_conversion_is_function_preserving_and_marked(workdir: Path) -> None:
    before = load_model(workdir / "models/pretrained/model.pt").eval()
    after = load_model(workdir / "models/bn_converted/model.pt").eval()
    assert after.extra["bn_converted"] is True and before.extra["bn_converted"] is False
    x = load_bundle(workdir / "data").val.images[:32]
    with torch.no_grad():
        torch.testing.assert_close(after(x), before(x), rtol=1e-4, atol=1e-4)
    report_json = json.loads((workdir / "models/bn_converted/bn_report.json").read_text())
    assert report_json["layers"] and report_json["num_samples"] > 0


def test_linear_probe_head_replaces_the_pretrained_head(workdir: Path) -> None:
    probe = json.loads((workdir / "models/linear_probe/probe.json").read_text())
    assert len(probe["sweep"]) == 4 and probe["best_C"] in [row["C"] for row in probe["sweep"]]
    pre = load_model(workdir / "models/pretrained/model.pt")
    lp = load_model(workdir / "models/linear_probe/model.pt")
    for k, v in pre.backbone.state_dict().items():
        assert torch.equal(v, lp.backbone.state_dict()[k]), f"probe changed backbone tensor {k}"
    assert not torch.equal(pre.head.weight, lp.head.weight)


def test_finetune_outputs_and_curves(workdir: Path) -> None:
    for method in ("ft", "lp_ft", "daft"):
        out = workdir / f"models/finetune/{method}"
        assert {"model.pt", "last.pt", "history.json", "summary.json"} <= {p.name for p in out.iterdir()}
        history = json.loads((workdir / f"metrics/curves/{method}.json").read_text())
        assert [r["epoch"] for r in history] == [1]
        assert not (workdir / f"models/finetune/.{method}.resume").exists()


def test_metrics_and_report(workdir: Path) -> None:
    rows = {
        p.stem: json.loads(p.read_text())
        for p in (workdir / "metrics/methods").glob("*.json")
        if not p.name.endswith(".details.json")
    }
    assert set(rows) == {"lp", "ft", "lp_ft", "daft"}
    for r in rows.values():
        assert 0 <= r["id_test_accuracy"] <= 1 and set(r["ood"]) == {"printed", "corrupted"}
        assert r["distortion"]["id_test_l2"] >= 0
    assert rows["lp"]["distortion"]["id_test_l2"] == pytest.approx(0.0, abs=1e-5)  # backbone untouched
    summary = json.loads((workdir / "reports/summary.json").read_text())
    best = max(rows.values(), key=lambda r: r["id_val_accuracy"])
    assert summary["champion"] == best["method"]
    assert {"table.md", "id_vs_ood.png", "ood_accuracy.png", "distortion.png"} <= {
        p.name for p in (workdir / "reports").iterdir()
    }


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_bad_params_key_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    tree = tiny_params()
    tree["finetune"]["epoch"] = 3  # typo
    write_params(tmp_path / "params.yaml", tree)
    res = _cli(["components.prepare_data", "--out", "out"], tmp_path)
    assert res.returncode == 2
    assert "finetune.epoch" in res.stderr and "unknown key" in res.stderr
    assert not (tmp_path / "out").exists()


def test_out_of_range_value_is_named(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", tiny_params(finetune={"batch_size": 0}))
    res = _cli(["components.prepare_data", "--out", "out"], tmp_path)
    assert res.returncode == 2 and "finetune.batch_size" in res.stderr


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    write_params(tmp_path / "params.yaml", tiny_params())
    res = _cli(["components.pretrained", "--data", "nope", "--out", "models/pretrained"], tmp_path)
    assert res.returncode == 2
    assert "prepared data nope not found" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "models/pretrained").exists()


def test_failed_rerun_keeps_the_previous_output(workdir: Path, tmp_path: Path) -> None:
    """A step that fails must not leave a half-written output, nor destroy the last good one."""
    out = tmp_path / "bn"
    params = params_from_dict(tiny_params())
    convert_bn.run(params, workdir / "models/pretrained", workdir / "data", out)
    good = (out / "model.pt").read_bytes()
    with pytest.raises(Exception, match="not found"):
        convert_bn.run(params, workdir / "models/pretrained", tmp_path / "missing-data", out)
    assert (out / "model.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn"]


def test_unknown_method_is_rejected(workdir: Path, tmp_path: Path) -> None:
    params = params_from_dict(tiny_params())
    with pytest.raises(Exception, match=r"not configured under finetune\.methods"):
        finetune.run(
            params, "daft_bn_only", workdir / "models/bn_converted", workdir / "data", tmp_path / "x"
        )


def test_unreachable_mlflow_server_fails_fast_without_outputs(tmp_path: Path) -> None:
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends
    write_params(tmp_path / "params.yaml", tiny_params(pipeline={"tracking": True}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    res = subprocess.run(
        [sys.executable, "-m", "components.prepare_data", "--out", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert f"127.0.0.1:{port}" in res.stderr and "pipeline.tracking: false" in res.stderr
    assert not (tmp_path / "out").exists()
