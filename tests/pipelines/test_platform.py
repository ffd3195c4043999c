"""Kubeflow on a real cluster: the platform file, GPUs that are really used, bounded sweeps.

* The platform file is validated like params.yaml: an unknown or misplaced key is one ``error:`` line (exit 2)
  that names it.
* Tolerations, node selectors (every step, the GPU steps, one step), image pull secrets, per-step timeouts and
  scratch volumes land in the Kubernetes platform spec.
* GPUs with a CPU-only image are refused at compile time; the default image follows the GPU setting.
* A GPU task carries ``DAFT_EXPECT_GPU=1`` and its node's name; ``step_setup`` fails at once without a GPU.
* The sweep runs at most 4 points of a method at once unless told otherwise; 0 is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.params import load_params
from pipelines import DEFAULT_CUDA_IMAGE, DEFAULT_IMAGE
from pipelines.cli import local_run_id
from pipelines.cli import main as cli_main
from pipelines.pipeline import PipelineOptions, build_pipeline, image_has_cuda

ROOT = Path(__file__).resolve().parents[2]
PARAMS = str(ROOT / "params.yaml")
GPU_STEPS = {"finetune", "linear-probe"}


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _compile(tmp_path: Path, *extra: str, platform: dict | str | None = None) -> tuple[int, Path]:
    out = tmp_path / "p.yaml"
    if out.exists():
        out.unlink()
    argv = ["compile", "--params", PARAMS, "-o", str(out), *extra]
    if platform is not None:
        pf = tmp_path / "platform.yaml"
        pf.write_text(platform if isinstance(platform, str) else yaml.safe_dump(platform))
        argv += ["--platform", str(pf)]
    return cli_main(argv), out


def _docs(out: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], (
        docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    )


def _step(label: str) -> str:
    """exec-finetune-2 -> finetune."""
    name = label.removeprefix("exec-")
    return name.rsplit("-", 1)[0] if name[-1].isdigit() else name


# --------------------------------------------------------------------------------------------------
# The platform file: validated, one line naming the key
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names", "says"),
    [
        ("gpu: {tolerations: [{key: nvidia.com/gpu, operator: Exists}]}\n", "gpu.tolerations", "known here"),
        ("retries: {max_retries: 3}\n", "retries.max_retries", "count, factor"),
        ("tolerations_gpu: []\n", "tolerations_gpu", "unknown key"),
        ("timeouts: {finetune: soon}\n", "timeouts.finetune", "duration"),
        ("timeouts: {finetun: 1h}\n", "timeouts.finetun", "finetune"),
        ("tolerations: {gpu: [{key: k, operator: Sometimes}]}\n", "tolerations.gpu.0.operator", "Exists"),
        ("node_selector: {gpus: {pool: gpu}}\n", "node_selector.gpus", "gpu"),
        (
            "scratch: {prepare_data: {size: 10Gi, mount_path: tmp}}\n",
            "scratch.prepare_data.mount_path",
            "absolute",
        ),
        ("sweep_parallelism: 0\n", "sweep_parallelism", "greater than or equal to 1"),
        ("sweep: {daft: [0.1, 0.2]}\n", "sweep", "head_lr"),
        ("resources: {finetune: {cpus: '2'}}\n", "resources.finetune.cpus", "unknown key"),
        ("image_pull_secrets: regcred\n", "image_pull_secrets", "list"),
    ],
)
def test_a_bad_platform_file_is_one_error_naming_the_key(
    tmp_path: Path, capsys, text: str, names: str, says: str
) -> None:
    rc, out = _compile(tmp_path, platform=text)
    err = capsys.readouterr().err
    lines = _errors(err)
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert names in lines[0] and says in lines[0], lines[0]
    assert not out.exists()


def test_platform_settings_land_in_the_kubernetes_spec(tmp_path: Path) -> None:
    platform = {
        "tolerations": {
            "gpu": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "all": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        },
        "node_selector": {
            "all": {"kubernetes.io/arch": "amd64"},
            "gpu": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
            "evaluate": {"pool": "eval"},
        },
        "image_pull_secrets": ["regcred"],
        "timeouts": {"finetune": "12h", "default": "1h30m", "report": 600},
        "scratch": {
            "prepare_data": {"size": "50Gi"},
            "finetune": {"size": "20Gi", "storage_class": "fast-ssd", "mount_path": "/work"},
        },
        "data": {"pvc": "team-data"},
        "gpu": {"count": 2},
        "resume_uri": "s3://team-ckpt/daft",
    }
    rc, out = _compile(tmp_path, platform=platform)
    assert rc == 0
    spec, k8s = _docs(out)
    assert set(k8s) == set(spec["deploymentSpec"]["executors"])
    dedicated = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for label, ex in k8s.items():
        step = _step(label)
        gpu = step in {"finetune", "linear-probe"}
        assert ex["tolerations"] == ([dedicated, gpu_taint] if gpu else [dedicated]), label
        labels = ex["nodeSelector"]["labels"]
        assert labels["kubernetes.io/arch"] == "amd64", label
        assert ("cloud.google.com/gke-accelerator" in labels) == gpu, label
        assert (labels.get("pool") == "eval") == (step == "evaluate"), label
        assert [s["secretName"] for s in ex["imagePullSecret"]] == ["regcred"], label
        deadline = {"finetune": 12 * 3600, "report": 600}.get(step, 5400)
        assert int(ex["activeDeadlineSeconds"]) == deadline, label
        env = {
            e["name"]: e["value"]
            for e in spec["deploymentSpec"]["executors"][label]["container"].get("env", [])
        }
        if step == "prepare-data":
            assert ex["emptyDirMounts"] == [
                {"mountPath": "/scratch", "sizeLimit": "50Gi", "volumeName": "daft-scratch"}
            ]
            assert env["DAFT_WORKSPACE"] == env["TMPDIR"] == "/scratch"
            assert ex["pvcMount"][0]["mountPath"] == "/data"  # the data section still works beside it
        elif step == "finetune":
            (vol,) = ex["genericEphemeralVolume"]
            assert (
                vol["size"] == "20Gi"
                and vol["storageClassName"] == "fast-ssd"
                and vol["mountPath"] == "/work"
            )
            assert env["TMPDIR"] == "/work"
            assert env["DAFT_RESUME_URI"] == "s3://team-ckpt/daft"
        else:
            assert "emptyDirMounts" not in ex and "genericEphemeralVolume" not in ex, label
            assert "TMPDIR" not in env
    acc = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]["resources"]["accelerator"]
    assert acc["resourceCount"] == "2"


def test_local_build_leaves_the_cluster_settings_out() -> None:
    from kfp import compiler

    opts = PipelineOptions(
        local=True,
        tolerations={"all": [{"key": "k", "operator": "Exists"}]},
        node_selector={"gpu": {"pool": "gpu"}},
        timeouts={"default": 60},
        scratch={"prepare_data": {"size": "1Gi"}},
        image_pull_secrets=["regcred"],
        image="reg.example/daft:0.1.0-cpu",  # ignored locally: not refused
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "l.yaml"
        compiler.Compiler().compile(build_pipeline(load_params(PARAMS), opts), str(out))
        docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == 1  # no Kubernetes platform spec (the run id comes from run-local instead)
    for ex in docs[0]["deploymentSpec"]["executors"].values():
        assert not {e["name"] for e in ex["container"].get("env", [])} & {"DAFT_EXPECT_GPU", "TMPDIR"}


# --------------------------------------------------------------------------------------------------
# GPUs really used
# --------------------------------------------------------------------------------------------------


def test_default_image_follows_the_gpu_setting(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DAFT_IMAGE", raising=False)

    def images(*extra: str, platform: Any = None) -> set[str]:
        rc, out = _compile(tmp_path, *extra, platform=platform)
        assert rc == 0
        return {e["container"]["image"] for e in _docs(out)[0]["deploymentSpec"]["executors"].values()}

    assert DEFAULT_CUDA_IMAGE.endswith("-cuda") and image_has_cuda(DEFAULT_CUDA_IMAGE) is True
    assert images() == {DEFAULT_CUDA_IMAGE}
    assert images("--no-gpu") == {DEFAULT_IMAGE}
    assert images("--gpu-count", "0") == {DEFAULT_IMAGE}
    assert images(platform={"gpu": {"enabled": False}}) == {DEFAULT_IMAGE}
    assert images("--image", "reg.example/daft:2.0") == {"reg.example/daft:2.0"}  # a tag that says neither
    monkeypatch.setenv("DAFT_IMAGE", "reg.example/daft:2.0-cuda12")
    assert images() == {"reg.example/daft:2.0-cuda12"}


@pytest.mark.parametrize(
    ("extra", "platform", "why"),
    [
        (["--image", "reg.example/daft:0.1.0-cpu"], None, "its tag says cpu"),
        (["--image", "reg.example/daft:cpu"], None, "its tag says cpu"),
        (["--image", DEFAULT_IMAGE], None, "CPU build"),
        (["--image", "reg.example/daft:2.0"], {"gpu": {"image_has_cuda": False}}, "image_has_cuda: false"),
    ],
)
def test_gpus_with_a_cpu_image_are_refused(tmp_path: Path, capsys, extra, platform, why) -> None:
    rc, out = _compile(tmp_path, *extra, platform=platform)
    err = capsys.readouterr().err
    lines = _errors(err)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert why in lines[0] and "--no-gpu" in lines[0] and "TORCH_VARIANT=cuda" in lines[0], lines[0]
    assert not out.exists()
    # The same image without GPUs is fine.
    assert _compile(tmp_path, *extra, "--no-gpu", platform=platform)[0] == 0


def test_gpu_tasks_expect_a_gpu_and_name_their_node(tmp_path: Path) -> None:
    rc, out = _compile(tmp_path)
    assert rc == 0
    spec, k8s = _docs(out)
    for label, ex in spec["deploymentSpec"]["executors"].items():
        gpu = _step(label) in GPU_STEPS
        env = {e["name"]: e["value"] for e in ex["container"].get("env", [])}
        assert (env.get("DAFT_EXPECT_GPU") == "1") == gpu, label
        fields = {f["name"]: f["fieldPath"] for f in k8s[label]["fieldPathAsEnv"]}
        assert (fields.get("DAFT_NODE_NAME") == "spec.nodeName") == gpu, label
        assert "accelerator" in ex["container"].get("resources", {}) or not gpu
    rc, out = _compile(tmp_path, "--no-gpu")
    for ex in _docs(out)[0]["deploymentSpec"]["executors"].values():
        assert "DAFT_EXPECT_GPU" not in {e["name"] for e in ex["container"].get("env", [])}


def test_a_step_given_a_gpu_fails_at_once_without_one(monkeypatch) -> None:
    import torch

    from daft_core.errors import DeviceError
    from pipelines.components import step_setup

    if torch.cuda.is_available():  # this test is about a node without one
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DAFT_EXPECT_GPU", "1")
    monkeypatch.setenv("DAFT_NODE_NAME", "gpu-node-7")
    with pytest.raises(DeviceError) as info:
        step_setup("finetune", '{"pipeline": {"tracking": false}}', "")
    message = str(info.value)
    assert "\n" not in message
    assert "gpu-node-7" in message and "DAFT_EXPECT_GPU=1" in message
    assert "TORCH_VARIANT=cuda" in message and "driver" in message and "nvidia.com/gpu" in message
    # Without the variable (a CPU task, or dvc repro) nothing is checked.
    monkeypatch.delenv("DAFT_EXPECT_GPU")
    assert step_setup("finetune", '{"pipeline": {"tracking": false}}', "").pipeline.tracking is False


def test_a_pod_without_the_run_id_warns(monkeypatch, caplog) -> None:
    from pipelines.components import step_setup

    monkeypatch.delenv("DAFT_EXPECT_GPU", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("DAFT_PIPELINE_RUN_ID", "")  # the label was missing: the downward API gives ""
    with caplog.at_level(logging.WARNING):
        step_setup("report", '{"pipeline": {"tracking": false}}', "")
    assert any("pipeline/runid" in r.getMessage() for r in caplog.records)


def test_run_local_gives_the_steps_one_run_id(monkeypatch) -> None:
    monkeypatch.delenv("DAFT_PIPELINE_RUN_ID", raising=False)
    with local_run_id() as first:
        assert os.environ["DAFT_PIPELINE_RUN_ID"] == first and first.startswith("local-")
    assert "DAFT_PIPELINE_RUN_ID" not in os.environ
    with local_run_id() as second:
        assert second != first
    monkeypatch.setenv("DAFT_PIPELINE_RUN_ID", "mine")  # the caller's choice is kept
    with local_run_id() as kept:
        assert kept == "mine"
    assert os.environ["DAFT_PIPELINE_RUN_ID"] == "mine"


# --------------------------------------------------------------------------------------------------
# The sweep: bounded by default
# --------------------------------------------------------------------------------------------------


def _limits(out: Path) -> set[int]:
    tasks = _docs(out)[0]["root"]["dag"]["tasks"].values()
    return {t["iteratorPolicy"]["parallelismLimit"] for t in tasks if "parameterIterator" in t}


def test_sweep_parallelism_defaults_to_4_and_0_is_refused(tmp_path: Path, capsys) -> None:
    rc, out = _compile(tmp_path, "--sweep")
    assert rc == 0 and _limits(out) == {4}
    rc, out = _compile(tmp_path, "--sweep", platform={"sweep_parallelism": 2})
    assert rc == 0 and _limits(out) == {2}
    rc, out = _compile(tmp_path, "--sweep", "--sweep-parallelism", "3", platform={"sweep_parallelism": 2})
    assert rc == 0 and _limits(out) == {3}  # the flag wins
    capsys.readouterr()
    rc, out = _compile(tmp_path, "--sweep", "--sweep-parallelism", "0")
    lines = _errors(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and "sweep_parallelism" in lines[0] and ">= 1" in lines[0]
    assert PipelineOptions().sweep_parallelism == 4
