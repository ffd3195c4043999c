"""The linear_probe step: normalize / max_iter reach the probe and are recorded; two CLI runs agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch

from components import linear_probe, prepare_data, pretrained
from components.params import ParamsError, ProbeParams, params_from_dict
from daft_core.models import load_model
from daft_core.probe import NORMALIZE_MODES
from tests.tiny_params import tiny_params, write_params


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared digits and the tiny pretrained model, shared by the tests below."""
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("lp")
    params = params_from_dict(tiny_params())
    prepare_data.run(params, wd / "data")
    pretrained.run(params, wd / "data", wd / "models/pretrained")
    return wd


def test_params_defaults_are_the_papers_and_modes_match_the_core() -> None:
    lp = ProbeParams()
    assert lp.normalize == "scalar" and lp.max_iter == 200
    assert get_args(ProbeParams.model_fields["normalize"].annotation) == NORMALIZE_MODES
    with pytest.raises(ParamsError, match=r"linear_probe\.normalize"):
        params_from_dict(tiny_params(linear_probe={"normalize": "standard"}))
    with pytest.raises(ParamsError, match=r"linear_probe\.max_iter"):
        params_from_dict(tiny_params(linear_probe={"max_iter": 0}))


@pytest.mark.parametrize("normalize", ["scalar", "per_feature"])
def test_normalize_and_max_iter_reach_the_probe_and_are_recorded(
    inputs: Path, tmp_path: Path, normalize: str
) -> None:
    params = params_from_dict(tiny_params(linear_probe={"normalize": normalize, "max_iter": 7}))
    out = tmp_path / "lp"
    summary = linear_probe.run(params, inputs / "models/pretrained", inputs / "data", out)
    assert summary["normalize"] == normalize and summary["max_iter"] == 7
    probe = json.loads((out / "probe.json").read_text())
    assert probe["normalize"] == normalize
    assert probe["solver"]["max_iter"] == 7
    assert all(row["iterations"] <= 7 for row in probe["sweep"])
    assert probe["best_C"] == summary["best_C"]
    assert load_model(out / "model.pt").extra["probe_normalize"] == normalize


def test_two_cli_runs_choose_the_same_C_and_head(inputs: Path, tmp_path: Path) -> None:
    """Separate processes (1 and 2 threads) give the same probe: C selection is reproducible."""
    write_params(tmp_path / "params.yaml", tiny_params())
    heads, probes = [], []
    for i, threads in enumerate((1, 2)):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
        out = tmp_path / f"lp{i}"
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "components.linear_probe",
                "--model",
                str(inputs / "models/pretrained"),
                "--data",
                str(inputs / "data"),
                "--out",
                str(out),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        probes.append(json.loads((out / "probe.json").read_text()))
        heads.append(load_model(out / "model.pt").head)
    assert probes[0]["best_C"] == probes[1]["best_C"]
    assert [r["val_correct"] for r in probes[0]["sweep"]] == [r["val_correct"] for r in probes[1]["sweep"]]
    assert (heads[0].weight - heads[1].weight).abs().max() <= 1e-6
    assert (heads[0].bias - heads[1].bias).abs().max() <= 1e-6
    assert probes[0]["normalize"] == "scalar"
