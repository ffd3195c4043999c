"""The finetune step under ``torchrun --nproc-per-node 2`` (CPU, gloo), tracking off: one output, written by
rank 0, whose history says 2 processes trained it; and a killed job that resumes from rank 0's last.pt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components import prepare_data, pretrained
from components.params import params_from_dict
from tests.tiny_params import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[3]
FINETUNE = {"epochs": 2, "batch_size": 16, "augment": {"hflip": False, "random_resized_crop": True}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared digits data and a tiny pretrained model, plus a params file for the CLI."""
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("torchrun")
    tree = tiny_params(finetune=FINETUNE)
    params = params_from_dict(tree)
    prepare_data.run(params, wd / "data")
    pretrained.run(params, wd / "data", wd / "models/pretrained")
    write_params(wd / "params.yaml", tree)
    return wd


def _torchrun(wd: Path, out: str, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "components.finetune",
        "--params",
        "params.yaml",
        "--method",
        "ft",
        "--model",
        "models/pretrained",
        "--data",
        "data",
        "--out",
        out,
        "--curves",
        f"{out}.curves.json",
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    full_env.pop("DAFT_RESUME_URI", None)
    return subprocess.run(cmd, cwd=wd, env=full_env, capture_output=True, text=True, timeout=240)


def test_two_process_step_writes_one_model_recording_world_size(workdir: Path) -> None:
    res = _torchrun(workdir, "one/ft")
    assert res.returncode == 0, res.stderr[-3000:]
    out = workdir / "one/ft"
    assert sorted(p.name for p in (workdir / "one").iterdir()) == ["ft", "ft.curves.json"]  # no resume dir
    assert (out / "model.pt").is_file() and (out / "last.pt").is_file()
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(r["world_size"] == 2 for r in history)
    assert json.loads((workdir / "one/ft.curves.json").read_text()) == history
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_size_per_rank"] == 16


def test_killed_two_process_step_resumes_where_it_stopped(workdir: Path) -> None:
    killed = _torchrun(workdir, "runs/killed", DAFT_KILL_AT="training.after_epoch_checkpoint")
    assert killed.returncode != 0
    resume_dir = workdir / "runs/.killed.resume"
    last = torch.load(resume_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and len(last["rng_ranks"]) == 2
    assert not (workdir / "runs/killed").exists()

    res = _torchrun(workdir, "runs/killed")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming ft from" in res.stderr
    history = json.loads((workdir / "runs/killed/history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and all(r["world_size"] == 2 for r in history)
    assert not resume_dir.exists()
