"""Retries resume from the object store: a retried pod starts on a fresh disk, so the finetune step keeps
its resumable checkpoint at ``$DAFT_RESUME_URI/<run id>/<method>/<point key>/last.pt`` (the session's moto
S3 server here), downloads it at the start and deletes it once the step has succeeded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from components import finetune, prepare_data, pretrained, storage
from components.params import params_from_dict
from components.storage import StorageError
from daft_core.faults import KILL_ENV
from tests.servers import S3Server
from tests.tiny_params import tiny_params, write_params

REPO = Path(__file__).resolve().parents[2]
METHOD = "daft"
EPOCHS = 3
# The component's own kill point: right after epoch 1's last.pt is uploaded. (The library's
# `training.after_epoch_checkpoint` fires before the epoch callback, so before any upload.)
KILL_AFTER_UPLOAD = "finetune.after_resume_upload"
KILL_BEFORE_UPLOAD = "training.after_epoch_checkpoint"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared digits and the tiny pretrained model, once; params with 3 epochs of DAFT only."""
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("resume-store")
    tree = tiny_params(
        finetune={
            "epochs": EPOCHS,
            "methods": {METHOD: {"start": "pretrained", "head_lr": 0.1, "backbone_lr": 0.01}},
        }
    )
    write_params(wd / "params.yaml", tree)
    params = params_from_dict(tree)
    prepare_data.run(params, wd / "data")
    pretrained.run(params, wd / "data", wd / "pretrained")
    return wd


def _step(wd: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m components.finetune` in a subprocess (a pod), single-threaded for bit-identical CPU runs."""
    base = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, "DAFT_RESUME_URI")}
    args = ["--params", str(wd / "params.yaml"), "--method", METHOD, "--model", str(wd / "pretrained")]
    return subprocess.run(
        [sys.executable, "-m", "components.finetune", *args, "--data", str(wd / "data"), "--out", str(out)],
        cwd=REPO,
        env={**base, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": "", **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _resume_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.resume"


def test_a_retried_pod_on_a_fresh_disk_resumes_from_the_store(inputs: Path, s3: S3Server) -> None:
    wd = inputs
    full = _step(wd, wd / "full", {})
    assert full.returncode == 0, full.stderr[-3000:]

    prefix = f"resume-store/{uuid.uuid4().hex[:8]}"
    run_id = "kfp-run-1"
    env = {"DAFT_RESUME_URI": f"s3://{s3.bucket}/{prefix}", "DAFT_PIPELINE_RUN_ID": run_id}
    key = f"{prefix}/{run_id}/{METHOD}/h0.1-b0.01/last.pt"
    out = wd / "pod" / "model"

    killed = _step(wd, out, {**env, KILL_ENV: KILL_AFTER_UPLOAD})
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert s3.keys(prefix) == [key]
    shutil.rmtree(wd / "pod")  # the retry is a fresh pod: nothing of the first attempt on its disk

    retried = _step(wd, out, env)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert "resume store: downloaded" in retried.stderr and f"resuming {METHOD}" in retried.stderr
    assert f"epoch 1/{EPOCHS}" not in retried.stderr  # epoch 1 came from the checkpoint
    assert f"epoch 2/{EPOCHS}" in retried.stderr and f"epoch 3/{EPOCHS}" in retried.stderr
    assert _same_weights(out, wd / "full")
    assert s3.keys(prefix) == []  # deleted once the step succeeded
    assert not _resume_dir(out).exists()


def test_a_kill_before_the_first_upload_starts_fresh_and_still_matches(inputs: Path, s3: S3Server) -> None:
    """The library's kill point fires before the epoch's upload: the retry finds nothing and starts over."""
    wd = inputs
    if not (wd / "full" / "model.pt").is_file():
        assert _step(wd, wd / "full", {}).returncode == 0
    prefix = f"resume-store/{uuid.uuid4().hex[:8]}"
    env = {"DAFT_RESUME_URI": f"s3://{s3.bucket}/{prefix}/", "DAFT_PIPELINE_RUN_ID": "kfp-run-2"}
    out = wd / "pod2" / "model"
    killed = _step(wd, out, {**env, KILL_ENV: KILL_BEFORE_UPLOAD})
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert s3.keys(prefix) == []
    shutil.rmtree(wd / "pod2")
    retried = _step(wd, out, env)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert "no checkpoint at" in retried.stderr and f"epoch 1/{EPOCHS}" in retried.stderr
    assert _same_weights(out, wd / "full")
    assert s3.keys(prefix) == []


def test_a_bad_store_fails_before_training(inputs: Path, s3: S3Server) -> None:
    wd = inputs
    env = {"DAFT_RESUME_URI": f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", "DAFT_PIPELINE_RUN_ID": "r"}
    proc = _step(wd, wd / "bad" / "model", env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not exist" in proc.stderr and "epoch 1/" not in proc.stderr
    proc = _step(wd, wd / "bad2" / "model", {"DAFT_RESUME_URI": "gs://b/x"})
    assert proc.returncode == 2 and "only s3:// URIs are supported" in proc.stderr


def test_put_exists_delete(s3: S3Server, tmp_path: Path) -> None:
    uri = f"s3://{s3.bucket}/resume-store/{uuid.uuid4().hex[:8]}/last.pt"
    assert not storage.exists(uri)
    (tmp_path / "f").write_bytes(b"one")
    assert storage.put_file(tmp_path / "f", uri) == uri
    assert storage.exists(uri)
    (tmp_path / "f").write_bytes(b"two")
    storage.put_file(tmp_path / "f", uri)  # replaces the object
    assert storage.fetch_file(uri, tmp_path / "g").read_bytes() == b"two"
    storage.delete(uri)
    storage.delete(uri)  # already gone: fine
    assert not storage.exists(uri)
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/k"
    for call in (lambda: storage.exists(missing), lambda: storage.put_file(tmp_path / "f", missing)):
        with pytest.raises(StorageError, match="does not exist"):
            call()
    with pytest.raises(StorageError, match="names a prefix"):
        storage.exists(f"s3://{s3.bucket}/some/prefix/")


def test_the_store_key_names_run_method_and_point(monkeypatch: pytest.MonkeyPatch) -> None:
    params = params_from_dict(tiny_params())
    monkeypatch.delenv("DAFT_RESUME_URI", raising=False)
    assert finetune.resume_store_uri(params, "daft", params.recipe("daft")) is None
    monkeypatch.setenv("DAFT_RESUME_URI", "s3://b/ckpt/")
    monkeypatch.setenv("DAFT_PIPELINE_RUN_ID", "run/1")
    uri = finetune.resume_store_uri(params, "daft", params.recipe("daft"))
    assert uri == "s3://b/ckpt/run_1/daft/h0.1-b0.001/last.pt"


def test_the_pipeline_passes_the_store_to_the_finetune_tasks_only(tmp_path: Path) -> None:
    import yaml

    from pipelines.pipeline import PipelineOptions, compile_pipeline

    params = params_from_dict(tiny_params())
    package = compile_pipeline(params, PipelineOptions(resume_uri="s3://b/ckpt"), str(tmp_path / "p.yaml"))
    doc = next(yaml.safe_load_all(Path(package).read_text()))  # then the platform (kubernetes) document
    executors = doc["deploymentSpec"]["executors"]
    with_env = {
        name
        for name, spec in executors.items()
        if {"name": "DAFT_RESUME_URI", "value": "s3://b/ckpt"} in spec["container"].get("env", [])
    }
    assert with_env and all(name.startswith("exec-finetune") for name in with_env)
    assert len(with_env) == len(params.finetune.methods)
