"""The TrainJob's entry point, as the launcher writes it, run here under torchrun on CPU (gloo, 2 processes).

What a Trainer node runs is `torchrun_command(nodes, gpus, finetune_args(...))`; on one machine torchrun's
defaults (node rank 0, master on 127.0.0.1) stand in for the PET_* variables the Trainer sets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components import prepare_data, pretrained
from components.params import params_from_dict, params_to_json
from pipelines.trainjob import finetune_args, torchrun_command
from tests.tiny_params import tiny_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("trainjob-entry")
    tree = tiny_params(finetune={"epochs": 1, "batch_size": 16, "device": "cpu"})
    params = params_from_dict(tree)
    prepare_data.run(params, wd / "data")
    pretrained.run(params, wd / "data", wd / "models/pretrained")
    return wd, params_to_json(params)


def test_the_jobs_torchrun_command_trains_data_parallel_on_cpu(workdir: tuple[Path, str]) -> None:
    wd, params_json = workdir
    args = finetune_args(params_json, "ft", "models/pretrained", "data", "out/ft")
    cmd = torchrun_command(1, 2, args)
    assert cmd[:5] == ["torchrun", "--nnodes", "1", "--nproc-per-node", "2"]
    # `torchrun` is python -m torch.distributed.run; --standalone picks a free local port.
    local = [sys.executable, "-m", "torch.distributed.run", "--standalone", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("DAFT_RESUME_URI", None)
    res = subprocess.run(local, cwd=wd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    history = json.loads((wd / "out/ft/history.json").read_text())
    assert history and all(r["world_size"] == 2 for r in history)
    assert (wd / "out/ft/model.pt").is_file()
