"""Concurrent writers: N processes logging to one MLflow store all land.

* 8 processes against the real `mlflow server` (sqlite backend), each logging the same dataset and
  registering a version of the same registered model: 8 distinct versions, no error.
* Write conflicts (a unique constraint another writer violated first) are retried with jittered back-off
  by :func:`components.tracking.retries.retry`; persistent ones end in one TrackingError.
* Processes opening one fresh sqlite store at once (``dvc exp run --queue -j N``) do not collide in
  MLflow's table creation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from components.tracking import retries
from components.tracking.retries import CONFLICT_ATTEMPTS, TrackingError, is_conflict, retry

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 8

WORKER = """
import sys
import torch
from torch import nn
from components.tracking import step_run

experiment, model_name, pipeline_id, i = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.manual_seed(i)
manifest = {"splits": {"id_train": {"images_sha256": "a" * 64, "labels_sha256": "b" * 64}}}
with step_run("finetune", {"worker": i}, method=f"w{i}", experiment=experiment, pipeline_id=pipeline_id) as t:
    t.log_dataset("/data/prepared", manifest, name="digits", context="training")
    version = t.log_model(
        nn.Linear(3, 2), registered_model=model_name, stage="finetune", method=f"w{i}",
        alias=f"w{i}", input_example=torch.zeros(2, 3),
    )
print(f"VERSION={version}", flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DAFT_"))}
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1", **extra)
    return env


@pytest.mark.slow
def test_concurrent_registrations_all_land(mlflow_server, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    tag = uuid.uuid4().hex[:8]
    experiment, model_name, pipeline_id = f"conc-{tag}", f"conc-model-{tag}", f"conc-{tag}"
    env = _env(MLFLOW_TRACKING_URI=mlflow_server.uri, **mlflow_server.s3.env)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, experiment, model_name, pipeline_id, str(i)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WORKERS)
    ]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    for p, _out, err in results:
        assert p.returncode == 0, err[-3000:]
        assert not [line for line in err.splitlines() if line.startswith("error:")], err[-3000:]
    versions = [re.search(r"VERSION=(\d+)", out).group(1) for _, out, _ in results]
    assert sorted(versions, key=int) == [str(v) for v in range(1, WORKERS + 1)]

    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    registered = client.search_model_versions(f"name = '{model_name}'")
    assert sorted(int(v.version) for v in registered) == list(range(1, WORKERS + 1))
    for i in range(WORKERS):  # each worker's alias points at its own version
        mv = client.get_model_version_by_alias(model_name, f"w{i}")
        assert mv.tags["method"] == f"w{i}"
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`daft.role` = 'step'")
    assert len(runs) == WORKERS and {r.info.status for r in runs} == {"FINISHED"}
    assert all(len(r.inputs.dataset_inputs) == 1 for r in runs)
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`daft.role` = 'pipeline'")
    assert len(parents) == 1  # concurrent parent creation resolved to one


def test_fresh_sqlite_store_opened_concurrently(tmp_path: Path) -> None:
    """MLflow creates a fresh sqlite store's tables on first open; concurrent first opens used to
    collide ("table ... already exists", alembic "expected to match one row")."""
    code = (
        "import sys\n"
        "from components.tracking.retries import mlflow_client, retry\n"
        "uri = sys.argv[1]\n"
        "client = mlflow_client(uri)\n"
        "retry(uri, 'search', lambda: client.search_experiments(max_results=1))\n"
        "retry(uri, 'search models', lambda: client.search_registered_models(max_results=1))\n"
        "print('OK', flush=True)\n"
    )
    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "OK" in out, err[-3000:]


# --------------------------------------------------------------------------------------------------
# The retry policy for conflicts (no server needed)
# --------------------------------------------------------------------------------------------------

UNIQUE = (
    "(sqlite3.IntegrityError) UNIQUE constraint failed: model_versions.name, model_versions.version "
    "[SQL: INSERT INTO model_versions ...]"
)


def _mlflow_error(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException(message, error_code="INTERNAL_ERROR")


def test_conflicts_are_recognised() -> None:
    from mlflow.exceptions import RestException

    assert is_conflict(_mlflow_error(UNIQUE))
    assert is_conflict(RestException({"error_code": "INTERNAL_ERROR", "message": UNIQUE}))
    assert is_conflict(_mlflow_error("UNIQUE constraint failed: datasets.experiment_id, datasets.name"))
    assert is_conflict(_mlflow_error("Model Version creation error (name=m). Giving up after 3 attempts."))
    assert is_conflict(_mlflow_error('duplicate key value violates unique constraint "model_versions_pkey"'))
    exists = RestException(
        {
            "error_code": "RESOURCE_ALREADY_EXISTS",
            "message": "Experiment(name=daft) already exists. Error: (sqlite3.IntegrityError) UNIQUE "
            "constraint failed: experiments.workspace, experiments.name",
        }
    )
    assert not is_conflict(exists)  # final: ensure_experiment handles it, repeating cannot help
    assert not is_conflict(ValueError("bad value"))


def test_conflict_is_retried_with_jitter(monkeypatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(retries.time, "sleep", sleeps.append)
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise _mlflow_error(UNIQUE)
        return "7"

    assert retry("http://127.0.0.1:1", "register m", flaky) == "7"
    assert calls["n"] == 4 and len(sleeps) == 3
    assert all(0 <= s <= retries.CONFLICT_MAX_BACKOFF_S for s in sleeps)
    assert len({round(s, 6) for s in sleeps}) == 3  # jittered: contending writers do not retry in lockstep


def test_persistent_conflict_ends_in_one_tracking_error(monkeypatch) -> None:
    monkeypatch.setattr(retries.time, "sleep", lambda s: None)
    calls = {"n": 0}

    def always() -> None:
        calls["n"] += 1
        raise _mlflow_error(UNIQUE)

    with pytest.raises(TrackingError, match="concurrent writers") as err:
        retry("http://user:pw@127.0.0.1:1", "register m", always)
    assert calls["n"] == CONFLICT_ATTEMPTS
    assert "pw@" not in str(err.value) and "rerun" in str(err.value)


def test_api_errors_are_not_retried(monkeypatch) -> None:
    monkeypatch.setattr(retries.time, "sleep", lambda s: pytest.fail("an API error must not be retried"))
    with pytest.raises(Exception, match="already exists"):
        retry("http://127.0.0.1:1", "create", lambda: (_ for _ in ()).throw(_mlflow_error("already exists")))
