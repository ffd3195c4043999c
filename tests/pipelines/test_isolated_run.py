"""`run-local --isolated`: every step as in its own pod (pipelines/local.py) against a real MLflow server and
data on S3 (the session's moto server): an empty working directory, its own HOME and TMPDIR, a pod's
environment (KUBERNETES_SERVICE_HOST set), no repository in reach. The run must complete, register its
versions on the server and leave nothing behind but its artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import local
from pipelines.cli import main as cli_main
from tests.servers import AWS_TEST_ENV, MlflowServer, S3Server
from tests.tiny_params import tiny_params

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("cat", "dog", "fox")
LAYOUT = {"id_train": 8, "id_test": 3, "ood/far": 2}  # images per class; id_val carved from id_train
ALIASES = {"pretrained", "bn-converted", "linear-probe", "ft", "lp-ft", "daft", "champion"}
# resolve_params, prepare_data, pretrained, convert_bn, linear_probe, 3 finetune, 4 evaluate, report
TASKS = 13
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def _upload_tree(s3: S3Server, root: Path) -> str:
    """A tiny imagefolder tree (3 classes of 8x8 PNGs) at a fresh prefix of the shared bucket; its URI."""
    rng = np.random.default_rng(0)
    prefix = f"test-isolated/{uuid.uuid4().hex[:8]}/data"
    client = s3.client()
    for split, n in LAYOUT.items():
        for c, cls in enumerate(CLASSES):
            for i in range(n):
                f = root / split / cls / f"{i}.png"
                f.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 64, (8, 8, 3), dtype=np.uint8) + np.uint8(80 * c)).save(f)
                client.upload_file(str(f), s3.bucket, f"{prefix}/{split}/{cls}/{i}.png")
    return f"s3://{s3.bucket}/{prefix}"


def _repo_files() -> dict[str, int]:
    """Every file of the repository (less caches, the venv and git) with its mtime."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):  # deleted meanwhile
                out[p.relative_to(REPO).as_posix()] = p.stat().st_mtime_ns
    return out


def _written_by_the_run(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Files the run may have written in the repo: new ones, and the stores a hidden default would use.
    (Source files other developers add meanwhile are not the run's doing.)"""
    new = [p for p in set(after) - set(before) if not p.endswith((".py", ".md"))]
    stores = [p for p in before if p.split("/")[0] in ("mlflow.db", "mlruns", "mlartifacts", "kfp_local")]
    return sorted(new + [p for p in stores if after.get(p) != before[p]])


@pytest.mark.slow
def test_isolated_run_against_a_server_and_s3(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    s3 = mlflow_server.s3
    for k, v in AWS_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_REGISTRY_URI",
        "DAFT_PIPELINE_RUN_ID",
        "DAFT_ALLOW_LOCAL_TRACKING",
        "DAFT_WORKSPACE",
        "DAFT_RESUME_URI",
        "AWS_ENDPOINT_URL_S3",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(var, raising=False)
    uri = _upload_tree(s3, tmp_path / "tree")
    model = f"daft-isolated-{uuid.uuid4().hex[:6]}"
    tree = tiny_params(
        pipeline={"experiment": model, "registered_model": model, "tracking": True},
        data={"preset": "imagefolder", "root": uri, "image_size": 8, "val_fraction": 0.25},
    )
    params_file = tmp_path / "tiny.yaml"
    params_file.write_text(yaml.safe_dump(tree))
    pods = tmp_path / "pods"
    before = _repo_files()

    t0 = time.monotonic()
    rc = cli_main(
        [
            "run-local",
            "--isolated",
            "--pods-root",
            str(pods),
            "--params",
            str(params_file),
            "--pipeline-root",
            str(tmp_path / "kfp_local"),
            "--out",
            str(tmp_path / "out"),
            "--tracking-uri",
            mlflow_server.uri,
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, (captured.err + captured.out)[-5000:]
    print(f"isolated run-local took {time.monotonic() - t0:.0f} s")

    # One pod per task, each working directory empty afterwards.
    dirs = sorted(p for p in pods.iterdir() if p.is_dir())
    assert len(dirs) == TASKS, [p.name for p in dirs]
    for d in dirs:
        assert {p.name for p in d.iterdir()} == {"work", "home", "tmp"}
        assert list((d / "work").iterdir()) == [], d
    # Nothing in the repository: no store, no artifact root, no stray output.
    assert _written_by_the_run(before, _repo_files()) == []

    # The data came from S3: the prepared bundle's manifest records the URI.
    manifests = list((tmp_path / "kfp_local").rglob("manifest.json"))
    assert manifests
    sources = json.loads(manifests[0].read_text())["meta"]["sources"]
    assert sources["data.root"]["uri"] == uri

    # Registered on the server: every alias, the champion the report chose.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    aliases = client.get_registered_model(model).aliases
    assert set(aliases) == ALIASES
    summary = json.loads((tmp_path / "out" / "reports" / "summary.json").read_text())
    method_alias = {"lp": "linear-probe", "ft": "ft", "lp_ft": "lp-ft", "daft": "daft"}
    assert aliases["champion"] == aliases[method_alias[summary["champion"]]]


def test_an_isolated_step_refuses_a_local_tracking_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The pods look like Kubernetes pods: a sqlite store (lost with the pod) stops the first tracked step."""
    for var in ("MLFLOW_TRACKING_URI", "DAFT_PIPELINE_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DAFT_ALLOW_LOCAL_TRACKING", "1")  # the caller's; a pod does not get it
    params_file = tmp_path / "tiny.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params(pipeline={"tracking": True})))
    store = tmp_path / "mlflow.db"
    rc = cli_main(
        [
            "run-local",
            "--isolated",
            "--pods-root",
            str(tmp_path / "pods"),
            "--params",
            str(params_file),
            "--pipeline-root",
            str(tmp_path / "kfp_local"),
            "--out",
            str(tmp_path / "out"),
            "--tracking-uri",
            f"sqlite:///{store.as_posix()}",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 2
    assert "is local to this Kubernetes pod" in captured.out, captured.out[-3000:]
    assert not (tmp_path / "out" / "reports").exists()


# ---------------------------------------------------------------------------------------------- the pods


def _sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_a_pod_has_its_own_cwd_home_tmp_and_a_pods_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    from kfp.local import subprocess_task_handler as handler

    monkeypatch.setenv("DAFT_ALLOW_LOCAL_TRACKING", "1")
    monkeypatch.setenv("SOME_SHELL_VARIABLE", "x")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    probe = (
        "import os, sys, json; import components; "
        "print('PROBE ' + json.dumps({'cwd': os.getcwd(), 'env': dict(os.environ), "
        "'components': components.__file__, 'path': sys.path}))"
    )
    original = handler.run_local_subprocess
    with local.isolated_steps(tmp_path / "pods") as state:
        code = handler.run_local_subprocess([sys.executable, "-c", probe], {"TASK_VAR": "1"})
    assert handler.run_local_subprocess is original  # restored afterwards
    assert code == 0 and state.problems == []
    line = next(x for x in capfd.readouterr().out.splitlines() if x.startswith("PROBE "))
    seen = json.loads(line[len("PROBE ") :])
    pod = Path(state.pods[0]["dir"])
    env = seen["env"]
    assert Path(seen["cwd"]) == pod / "work"
    assert env["HOME"] == str(pod / "home") and env["TMPDIR"] == str(pod / "tmp")
    assert env["KUBERNETES_SERVICE_HOST"] and env["TASK_VAR"] == "1"
    assert "DAFT_ALLOW_LOCAL_TRACKING" not in env and "SOME_SHELL_VARIABLE" not in env
    assert "PYTHONPATH" not in env and str(REPO) not in seen["path"][1:]  # the installed package only
    assert Path(seen["components"]).is_file()


def test_a_step_that_leaves_files_in_its_cwd_fails(tmp_path: Path) -> None:
    from kfp.local import subprocess_task_handler as handler

    original = handler.run_local_subprocess
    with local.isolated_steps(tmp_path / "pods") as state:
        assert handler.run_local_subprocess(_sh("mkdir -p out && touch out/mlflow.db"), {}) == 1
        assert handler.run_local_subprocess(_sh("touch $HOME/.cache-ok $TMPDIR/ok"), {}) == 0
    assert handler.run_local_subprocess is original
    assert len(state.problems) == 1 and "out/mlflow.db" in state.problems[0]


def test_the_pods_root_must_be_outside_any_project(tmp_path: Path) -> None:
    with pytest.raises(local.IsolationError, match=r"params\.yaml"), local.isolated_steps(REPO / "kfp_pods"):
        pass
    assert not (REPO / "kfp_pods").exists()
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "dvc.yaml").write_text("stages: {}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines",
            "run-local",
            "--isolated",
            "--pods-root",
            str(tmp_path / "proj/p"),
            "--pipeline-root",
            str(tmp_path / "kfp"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "dvc.yaml" in proc.stderr, proc.stderr[-2000:]
