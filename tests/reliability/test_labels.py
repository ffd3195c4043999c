"""A model built for other data (a 3-class checkpoint on 10-class digits) is refused up front by every step
that trains or scores it, with one line naming the model and the dataset, not an IndexError mid-loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from components import prepare_data
from components.params import params_from_dict
from daft_core.models import build_model, save_model
from tests.tiny_params import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labels")
    prepare_data.run(params_from_dict(tiny_params()), root / "data")
    three = build_model("tiny_cnn", weights=None, num_classes=3, input_size=16)
    save_model(three, root / "three" / "model.pt", extra={"stage": "pretrained"})
    write_params(root / "params.yaml", tiny_params())
    return root


@pytest.mark.parametrize(
    "argv",
    [
        ["components.finetune", "--method", "ft", "--model", "three", "--data", "data", "--out", "ft"],
        ["components.evaluate", "--method", "ft", "--model", "three", "--data", "data", "--out", "m.json"],
        ["components.linear_probe", "--model", "three", "--data", "data", "--out", "lp"],
    ],
    ids=["finetune", "evaluate", "linear_probe"],
)
def test_a_model_for_other_classes_is_refused_before_work(setup: Path, argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DAFT_LOG_LEVEL": "WARNING"}
    res = subprocess.run(
        [sys.executable, "-m", *argv], cwd=setup, env=env, capture_output=True, text=True, timeout=180
    )
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "3 outputs" in errors[0] and "10 classes" in errors[0] and "three" in errors[0], errors[0]
    assert not (setup / argv[-1]).exists()  # nothing written
