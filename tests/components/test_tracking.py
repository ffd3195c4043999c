"""components.tracking against real components: an MLflow server subprocess backed by a moto S3 server,
a sqlite store, and a closed port. No mocks."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components import tracking
from components.tracking import TrackingError, data_digest, pipeline_run_id, step_run, tracking_uri
from tests.servers import free_port

pytestmark = pytest.mark.slow


class TinyNet(nn.Module):
    """Stands in for DaftModel: uint8 (N,1,8,8) in, cast inside forward; features() and head; BN."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.bn.running_mean.copy_(torch.randn(4, generator=g))
            self.bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
        self.input_size = 8
        self.spec = {"name": "tiny", "num_classes": 3, "input_size": 8}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MANIFEST = {
    "format_version": 1,
    "class_names": ["0", "1", "2"],
    "splits": {
        "id_train": {"count": 10, "images_sha256": "a" * 64, "labels_sha256": "b" * 64},
        "id_val": {"count": 4, "images_sha256": "c" * 64, "labels_sha256": "d" * 64},
    },
}


def _images(n: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def _project(tmp: Path) -> Path:
    (tmp / "params.yaml").write_text("pipeline: {tracking: true}\n")
    return tmp


# --------------------------------------------------------------------------------------------------
# Against the real MLflow server (+ moto S3 artifact store): run the steps once, assert in several tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(mlflow_server, tmp_path_factory):
    import mlflow

    tmp = _project(tmp_path_factory.mktemp("proj"))
    data_dir = tmp / "data" / "prepared"
    data_dir.mkdir(parents=True)
    tag = uuid.uuid4().hex[:8]
    out = {
        "uri": mlflow_server.uri,
        "experiment": f"daft-test-{tag}",
        "model_name": f"daft-tiny-{tag}",
        "pipeline_id": uuid.uuid4().hex,
        "data_dir": data_dir,
        "x": _images(),
    }
    base, derived = TinyNet(0), TinyNet(1)
    out["expected1"] = base.eval()(out["x"]).detach()
    out["expected2"] = derived.eval()(out["x"]).detach()
    common = {"experiment": out["experiment"], "pipeline_id": out["pipeline_id"]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        mp.chdir(tmp)
        t0 = time.monotonic()
        with step_run("prepare_data", {"data": {"seed": 0, "preset": "digits"}}, **common) as t:
            out["digest"] = t.log_dataset(data_dir, MANIFEST, name="digits", context="training")
            t.log_dict({"counts": {"id_train": 10}}, "summary.json")
            out["prepare_run"] = t.run_id
            v1 = t.log_model(
                base,
                registered_model=out["model_name"],
                stage="pretrained",
                method=None,
                alias="pretrained",
                input_example=out["x"][:2],
            )
        with step_run("finetune", {"finetune": {"epochs": 2, "lr": 0.01}}, method="daft", **common) as t:
            for epoch in (1, 2):
                t.log_epoch({"epoch": epoch, "train_loss": 1.0 / epoch, "val_accuracy": 0.5 + 0.1 * epoch})
            t.log_metrics({"best": {"val_accuracy": 0.7, "epoch": 2}, "skipped": None, "note": "text"})
            out["finetune_run"] = t.run_id
            v2 = t.log_model(
                derived,
                registered_model=out["model_name"],
                stage="finetune",
                method="daft",
                alias="daft",
                input_example=out["x"][:2],
                source_version=v1,
            )
        with pytest.raises(ValueError, match="boom"), step_run("evaluate", {}, method="daft", **common) as t:
            out["failed_run"] = t.run_id
            raise ValueError("boom")
        out["seconds"] = time.monotonic() - t0
    out["versions"] = (v1, v2)
    out["client"] = mlflow.MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    return out


def test_steps_group_under_one_parent(logged):
    client = logged["client"]
    exp = client.get_experiment_by_name(logged["experiment"])
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    parents = [r for r in runs.values() if r.data.tags.get(tracking.ROLE_TAG) == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags[tracking.PARENT_TAG] == logged["pipeline_id"]
    assert parent.info.run_name == f"pipeline-{logged['pipeline_id'][:8]}"
    children = {rid: r for rid, r in runs.items() if rid != parent.info.run_id}
    assert set(children) == {logged["prepare_run"], logged["finetune_run"], logged["failed_run"]}
    for r in children.values():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags[tracking.PARENT_TAG] == logged["pipeline_id"]
    prep, ft, failed = (children[logged[k]] for k in ("prepare_run", "finetune_run", "failed_run"))
    assert prep.info.run_name == "prepare_data" and prep.data.tags[tracking.STEP_TAG] == "prepare_data"
    assert ft.info.run_name == "finetune[daft]" and ft.data.tags[tracking.METHOD_TAG] == "daft"
    assert (prep.info.status, ft.info.status, failed.info.status) == ("FINISHED", "FINISHED", "FAILED")


def test_params_and_epoch_metrics(logged):
    client = logged["client"]
    prep = client.get_run(logged["prepare_run"])
    ft = client.get_run(logged["finetune_run"])
    assert prep.data.params == {"data.seed": "0", "data.preset": "digits"}
    assert ft.data.params["finetune.epochs"] == "2"
    hist = client.get_metric_history(logged["finetune_run"], "train_loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 0.5)]
    val = client.get_metric_history(logged["finetune_run"], "val_accuracy")
    assert [m.step for m in sorted(val, key=lambda m: m.step)] == [1, 2]
    assert ft.data.metrics["best.val_accuracy"] == pytest.approx(0.7)
    assert "skipped" not in ft.data.metrics and "note" not in ft.data.metrics
    assert "epoch" not in ft.data.metrics


def test_dataset_lineage(logged):
    run = logged["client"].get_run(logged["prepare_run"])
    assert logged["digest"] == data_digest(MANIFEST)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "digits"
    assert ds.digest == logged["digest"][: tracking.MAX_DATASET_DIGEST]
    assert logged["data_dir"].resolve().as_posix() in ds.source
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert run.data.tags[tracking.DATA_DIGEST_TAG] == logged["digest"]


def test_registered_versions_tags_and_aliases(logged):
    client, name = logged["client"], logged["model_name"]
    assert logged["versions"] == ("1", "2")
    mv1, mv2 = client.get_model_version(name, "1"), client.get_model_version(name, "2")
    assert mv1.tags["stage"] == "pretrained" and mv1.tags["method"] == "none"
    assert mv1.tags["source_version"] == "none" and mv1.tags["run_id"] == logged["prepare_run"]
    assert mv2.tags["stage"] == "finetune" and mv2.tags["method"] == "daft"
    assert mv2.tags["source_version"] == "1" and mv2.tags["run_id"] == logged["finetune_run"]
    assert client.get_model_version_by_alias(name, "pretrained").version == "1"
    assert client.get_model_version_by_alias(name, "daft").version == "2"
    # module-level helpers, outside any run (what the report step does for `champion`)
    uri = logged["uri"]
    assert tracking.version_for_alias(name, "champion", uri=uri) is None
    tracking.set_alias(name, "champion", "2", uri=uri)
    assert tracking.version_for_alias(name, "champion", uri=uri) == "2"
    assert tracking.version_for_alias(f"{name}-missing", "champion", uri=uri) is None


def test_registered_model_loads_back_exactly(logged, monkeypatch):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking._model_registry import utils as registry_utils

    # mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI: undo both after this test
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", logged["uri"])
    mlflow.set_tracking_uri(logged["uri"])
    mlflow.set_registry_uri(logged["uri"])
    name = logged["model_name"]
    for alias, expected in (("pretrained", logged["expected1"]), ("daft", logged["expected2"])):
        loaded = mlflow.pytorch.load_model(f"models:/{name}@{alias}")
        assert isinstance(loaded, TinyNet) and isinstance(loaded.head, nn.Linear)
        assert loaded.spec == {"name": "tiny", "num_classes": 3, "input_size": 8}
        with torch.no_grad():
            got = loaded.eval()(logged["x"])
        assert torch.equal(got, expected)


def test_artifacts_landed_in_s3(logged, mlflow_server):
    keys = mlflow_server.s3.keys("mlartifacts/")
    assert any(k.endswith("summary.json") for k in keys), keys
    assert sum(k.endswith(".pth") for k in keys) >= 2, keys  # the two pickled models
    assert any(k.endswith("MLmodel") for k in keys), keys


# --------------------------------------------------------------------------------------------------
# Default sqlite store, unreachable server, disabled tracking, ids
# --------------------------------------------------------------------------------------------------


def test_default_uri_is_sqlite_in_repo_root(tmp_path, monkeypatch):
    root = _project(tmp_path)
    (root / "sub").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root / "sub")  # found from cwd upward
    assert tracking_uri() == f"sqlite:///{(root / 'mlflow.db').resolve().as_posix()}"
    pid = pipeline_run_id('{"a": 1}')
    with step_run("prepare_data", {"seed": 1}, experiment="daft", pipeline_id=pid) as t:
        t.log_metrics({"count": 3, "ood": {"my set(1)": 0.5}})
        t.log_dict({"a": 1}, "a.json")
        run_id = t.run_id
    assert (root / "mlflow.db").is_file()
    assert list((root / "mlartifacts").rglob("a.json"))  # artifacts next to the db, not in the cwd
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=tracking_uri()).get_run(run_id)
    assert run.data.metrics == {"count": 3.0, "ood.my set_1_": 0.5}
    assert run.info.status == "FINISHED"


def test_unreachable_server_fails_fast(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(_project(tmp_path))
    t0 = time.monotonic()
    with (
        pytest.raises(TrackingError, match=re.escape(uri)) as err,
        step_run("prepare_data", {}, experiment="daft", pipeline_id="x" * 16),
    ):
        pytest.fail("the step body must not run when tracking is unreachable")
    assert time.monotonic() - t0 < 60
    assert "pipeline.tracking: false" in str(err.value)


def test_disabled_tracker_is_a_noop(tmp_path, monkeypatch):
    root = _project(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root)
    with step_run("finetune", {"a": 1}, method="ft", enabled=False, experiment="daft", pipeline_id="p") as t:
        assert not t.enabled
        t.log_params({"b": 2})
        t.log_metrics({"m": 1.0}, step=1)
        t.log_epoch({"epoch": 1, "train_loss": 0.1})
        assert t.log_dataset(root, MANIFEST, "digits", "training") is None
        t.log_artifact(root / "params.yaml")
        t.log_dict({"a": 1}, "a.json")
        v = t.log_model(
            TinyNet(0), registered_model="m", stage="s", method=None, alias="a", input_example=_images(1)
        )
        assert v is None
        assert t.version_for_alias("m", "a") is None
        t.set_alias("m", "a", "1")
    assert not (root / "mlflow.db").exists()
    assert not (root / "mlruns").exists()


def test_pipeline_run_id(tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path))
    monkeypatch.delenv("DAFT_PIPELINE_RUN_ID", raising=False)
    a, b = pipeline_run_id('{"x": 1}'), pipeline_run_id('{"x": 2}')
    assert a == pipeline_run_id('{"x": 1}') and a != b and re.fullmatch(r"[0-9a-f]{32}", a)
    monkeypatch.setenv("DAFT_PIPELINE_RUN_ID", "kfp-run-123")
    assert pipeline_run_id('{"x": 1}') == "kfp-run-123"


def test_data_digest_uses_manifest_hashes():
    changed = {
        **MANIFEST,
        "splits": {**MANIFEST["splits"], "id_val": {"count": 4, "images_sha256": "e" * 64}},
    }
    assert data_digest(MANIFEST) == data_digest(dict(reversed(list(MANIFEST.items()))))
    assert data_digest(MANIFEST) != data_digest(changed)
