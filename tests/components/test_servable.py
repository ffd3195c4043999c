"""A registered version is servable from its artifacts alone, and is described in the MLflow UI.

Against the real MLflow server (+ moto S3) fixture. The load happens in a separate interpreter, in an empty
working directory, that cannot import the project (no repository on ``sys.path``, the editable install's
finder removed): ``daft_core`` must come from the model's own ``code/`` folder, the rest from the
requirements (torch, torchvision, timm, numpy, cloudpickle).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from components.tracking import DATA_DIGEST_TAG, step_run
from components.tracking.runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from daft_core.models import build_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# Run with ``python -I`` (no PYTHONPATH, no script directory, no user site), then drop what could still reach
# the repository: the editable install's finder (site-packages/__editable___daft_pipeline_*_finder.py, put
# on sys.meta_path by its .pth file) and any sys.path entry that is the repository root.
CHILD = r"""
import json, os, sys

repo, uri, inputs, out = sys.argv[1:5]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != os.path.realpath(repo)]
for name in [m for m in sys.modules if m.split(".")[0] in ("daft_core", "components", "pipelines", "tests")]:
    del sys.modules[name]
try:
    import daft_core
except ModuleNotFoundError:
    pass
else:
    raise SystemExit(f"daft_core is importable without the model: {daft_core.__file__}")

import numpy as np
import mlflow.pyfunc
import mlflow.pytorch
import torch

model = mlflow.pytorch.load_model(uri)
import daft_core  # now: the copy MLflow put on sys.path from the model's code/ folder

x = dict(np.load(inputs))
with torch.no_grad():
    logits = {k: model(torch.from_numpy(v)).numpy() for k, v in x.items()}
served = mlflow.pyfunc.load_model(uri)  # what `mlflow models serve` wraps; enforces the signature
logits["pyfunc_x32"] = np.asarray(served.predict(x["x32"]))
np.savez(out, **logits)
print(json.dumps({
    "daft_core": daft_core.__file__,
    "class": f"{type(model).__module__}.{type(model).__name__}",
    "spec": model.spec,
}))
"""


def _inputs() -> dict[str, np.ndarray]:
    g = np.random.default_rng(3)
    return {
        "x16": g.integers(0, 256, (3, 1, 16, 16), dtype=np.uint8),
        "x32": g.integers(0, 256, (2, 1, 32, 32), dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory):
    """A tiny DaftModel logged and registered the way every step does (StepTracker.log_model)."""
    import mlflow

    tmp = tmp_path_factory.mktemp("servable")
    (tmp / "params.yaml").write_text("pipeline: {tracking: true}\n")
    tag = uuid.uuid4().hex[:8]
    torch.manual_seed(0)
    model = build_model("tiny_cnn", num_classes=3, input_size=16, width=4).eval()
    example = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    out = {"uri": mlflow_server.uri, "name": f"daft-servable-{tag}", "experiment": f"daft-servable-{tag}"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        mp.chdir(tmp)
        with step_run("pretrained", {}, experiment=out["experiment"], pipeline_id=uuid.uuid4().hex) as t:
            out["version"] = t.log_model(
                model,
                registered_model=out["name"],
                stage="pretrained",
                method=None,
                alias="pretrained",
                input_example=example,
                description="a **tiny** model",
                registered_model_description="tiny models",
            )
    out["model"] = model
    out["client"] = mlflow.MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    return out


def test_registered_version_loads_where_only_its_requirements_are_installed(logged, tmp_path: Path) -> None:
    empty = tmp_path / "cwd"
    empty.mkdir()
    io = tmp_path / "io"
    io.mkdir()
    x = _inputs()
    np.savez(io / "inputs.npz", **x)
    uri = f"models:/{logged['name']}/{logged['version']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_", "DAFT_"))}
    env.update(MLFLOW_TRACKING_URI=logged["uri"], OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, str(ROOT), uri, str(io / "inputs.npz"), str(io / "out.npz")],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"isolated load took {time.monotonic() - t0:.1f} s")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not Path(info["daft_core"]).resolve().is_relative_to(ROOT), info  # the model's own copy
    assert Path(info["daft_core"]).parent.parent.name == "code", info
    assert info["class"] == "daft_core.models.wrapper.DaftModel"
    assert info["spec"] == logged["model"].spec
    assert list(empty.iterdir()) == []
    got = dict(np.load(io / "out.npz"))
    with torch.no_grad():
        for key, images in x.items():
            expected = logged["model"](torch.from_numpy(images)).numpy()
            assert got[key].shape == (images.shape[0], 3)
            np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["pyfunc_x32"], got["x32"], rtol=1e-6, atol=1e-7)


def test_signature_code_and_pinned_requirements(logged, tmp_path: Path) -> None:
    from importlib.metadata import version

    import mlflow
    from mlflow.models import get_model_info

    uri = f"models:/{logged['name']}/{logged['version']}"
    mlflow.set_tracking_uri(logged["uri"])
    sig = get_model_info(uri).signature
    (inp,) = sig.inputs.inputs
    assert inp.type == np.dtype("uint8") and inp.shape == (-1, 1, -1, -1)  # free batch, height, width
    (outp,) = sig.outputs.inputs
    assert outp.type == np.dtype("float32") and outp.shape == (-1, 3)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    assert (local / "code" / "daft_core" / "models" / "wrapper.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    reqs = (local / "requirements.txt").read_text().split()
    for pkg in ("torch", "torchvision", "timm", "numpy", "cloudpickle"):
        assert f"{pkg}=={version(pkg).split('+')[0]}" in reqs, reqs


def test_experiment_kind_and_descriptions(logged, mlflow_server, tmp_path: Path, monkeypatch) -> None:
    client = logged["client"]
    exp = client.get_experiment_by_name(logged["experiment"])
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    assert client.get_model_version(logged["name"], logged["version"]).description == "a **tiny** model"
    assert client.get_registered_model(logged["name"]).description == "tiny models"

    # An existing experiment without the tag gets it; a kind someone chose is kept.
    tag = uuid.uuid4().hex[:8]
    bare = client.create_experiment(f"daft-bare-{tag}")
    chosen = client.create_experiment(f"daft-chosen-{tag}", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    (tmp_path / "params.yaml").write_text("pipeline: {tracking: true}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.chdir(tmp_path)
    for name in (f"daft-bare-{tag}", f"daft-chosen-{tag}"):
        with step_run("report", {}, experiment=name, pipeline_id=uuid.uuid4().hex):
            pass
    assert client.get_experiment(bare).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_steps_describe_their_versions(mlflow_server, tmp_path: Path, monkeypatch) -> None:
    """publish_model's description: stage, method, lineage, data (digest) and the params that made it."""
    import mlflow

    from components import finetune, prepare_data, pretrained
    from components.params import params_from_dict
    from tests.tiny_params import tiny_params

    tag = uuid.uuid4().hex[:8]
    name, experiment = f"daft-described-{tag}", f"daft-described-{tag}"
    params = params_from_dict(
        tiny_params(pipeline={"experiment": experiment, "registered_model": name, "tracking": True})
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("DAFT_PIPELINE_RUN_ID", f"described-{tag}")
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    prepare_data.run(params, tmp_path / "data")
    pretrained.run(params, tmp_path / "data", tmp_path / "pretrained")
    finetune.run(params, "ft", tmp_path / "pretrained", tmp_path / "data", tmp_path / "ft")

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    pre = client.get_model_version_by_alias(name, "pretrained")
    ft = client.get_model_version_by_alias(name, "ft")
    digest = client.get_run(ft.run_id).data.tags[DATA_DIGEST_TAG]
    assert digest == client.get_run(pre.run_id).data.tags[DATA_DIGEST_TAG]
    text = ft.description
    assert text.startswith("**finetune** model, method `ft` of the DAFT pipeline (alias `ft`).")
    assert f"Derived from `pretrained` (version {pre.version})" in text
    assert f"digest `{digest}`" in text and "preset `digits` (seed 0)" in text
    for part in ("backbone=tiny_cnn", "head_lr=0.01", "backbone_lr=0.01", "epochs=1", "batch_size=64"):
        assert part in text, text
    assert f"MLflow run `{ft.run_id}`" in text and f"pipeline run `described-{tag}`" in text
    assert pre.description.startswith("**pretrained** model of the DAFT pipeline (alias `pretrained`).")
    assert "head_lr" not in pre.description and "backbone=tiny_cnn" in pre.description
    described = client.get_registered_model(name).description
    assert f"models:/{name}@champion" in described and "`lp-ft`" in described
