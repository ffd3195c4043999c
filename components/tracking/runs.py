"""The runs around a step's run: its experiment, the shared parent run, and ending both.

Steps of one pipeline run start in separate processes or pods with nothing but the pipeline run id in
common (see :mod:`components.tracking.identity`), so the parent run is found-or-created by its tag. Two
steps starting at the same instant (parallel Kubeflow pods) can both create one; both then pick the oldest
(earliest start time, then smallest run id) and the loser deletes the run it created.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from components.tracking.identity import PARENT_TAG, PIPELINE_ID_ENV, ROLE_TAG
from components.tracking.redaction import redact
from components.tracking.retries import bounded_http, retry, tracking_timeout_s

log = logging.getLogger(__name__)


# The MLflow UI (3.x) opens an experiment in the view its kind names; "custom_model_development" is the
# model-training view (runs, metrics, models), not the GenAI one (traces, evaluations).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client: Any, uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, restoring or creating it; tolerates a concurrent step creating it first.

    A new experiment is tagged :data:`EXPERIMENT_KIND_TAG` = :data:`EXPERIMENT_KIND`; an existing one
    without the tag gets it (a kind someone chose is kept).
    """
    from mlflow.exceptions import MlflowException

    exp = retry(uri, "get experiment", lambda: client.get_experiment_by_name(name))
    if exp is None:
        kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        try:
            return retry(
                uri, "create experiment", lambda: client.create_experiment(name, artifact_location, tags=kind)
            )
        except MlflowException as err:  # created by a concurrent step
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = retry(uri, "get experiment", lambda: client.get_experiment_by_name(name))
    if exp.lifecycle_stage == "deleted":
        retry(uri, "restore experiment", lambda: client.restore_experiment(exp.experiment_id))
    if not (exp.tags or {}).get(EXPERIMENT_KIND_TAG):
        retry(
            uri,
            "tag experiment",
            lambda: client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND),
        )
    return exp.experiment_id


def _parents(client: Any, uri: str, exp_id: str, pipeline_id: str) -> list[Any]:
    flt = f"tags.`{PARENT_TAG}` = '{pipeline_id}' and tags.`{ROLE_TAG}` = 'pipeline'"
    runs = retry(uri, "search runs", lambda: client.search_runs([exp_id], filter_string=flt, max_results=50))
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def find_or_create_parent(client: Any, uri: str, exp_id: str, pipeline_id: str) -> str:
    """The parent run of `pipeline_id`: the oldest one tagged with it, created when there is none."""
    found = _parents(client, uri, exp_id, pipeline_id)
    if found:
        return found[0].info.run_id
    tags = {PARENT_TAG: pipeline_id, ROLE_TAG: "pipeline", "mlflow.source.name": "daft pipeline"}
    if os.environ.get(PIPELINE_ID_ENV):
        tags["daft.pipeline_run_id.source"] = PIPELINE_ID_ENV
    run = retry(
        uri,
        "create parent run",
        lambda: client.create_run(exp_id, run_name=f"pipeline-{pipeline_id[:8]}", tags=tags),
    )
    mine = run.info.run_id
    found = _parents(client, uri, exp_id, pipeline_id)
    winner = found[0].info.run_id if found else mine
    if winner != mine:  # lost a creation race with a concurrent step
        log.info("parent run created concurrently; using %s", winner)
        retry(uri, "delete duplicate parent", lambda: client.delete_run(mine))
    else:
        log.info("created parent run %s for pipeline %s", mine, pipeline_id)
    return winner


@contextmanager
def global_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, register_model) at `uri` for the step; restore it after.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI; both are put back so one process can run
    several steps (tests, notebooks) against different stores. The registry URI follows the tracking URI
    unless MLFLOW_REGISTRY_URI is set.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    prev = getattr(tracking_utils, "_tracking_uri", None)
    prev_env = os.environ.get("MLFLOW_TRACKING_URI")
    # set explicitly: a registry URI set earlier in this process (another step, a notebook) must not
    # send this step's model versions to another server
    prev_registry = getattr(registry_utils, "_registry_uri", None)
    prev_registry_env = os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(prev_registry_env or uri)  # also exports MLFLOW_REGISTRY_URI: put back below
    try:
        yield
    finally:
        registry_utils._registry_uri = prev_registry
        if prev_registry_env is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)
        else:
            os.environ["MLFLOW_REGISTRY_URI"] = prev_registry_env
        mlflow.set_tracking_uri(prev)
        if prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev_env


# When the step already failed, ending its runs is best effort and must not hold up the step's own error
# (a dead server would otherwise cost the full budget twice more).
FAILED_END_BUDGET_S = 5.0


def end_runs(client: Any, uri: str, run_id: str, parent_id: str, status: str) -> None:
    """Terminate the step's run and the parent (which shows the latest step's outcome and end time).

    When the step already failed, a tracking error here is only logged, so the step's own error surfaces,
    and both calls share a short budget (:data:`FAILED_END_BUDGET_S`).
    """
    import mlflow

    end = int(time.time() * 1000)
    budget = None if status == "FINISHED" else min(FAILED_END_BUDGET_S, tracking_timeout_s())
    deadline = time.monotonic() + (budget or 0)

    def left() -> float | None:
        return None if budget is None else max(0.5, deadline - time.monotonic())

    try:
        retry(uri, "end run", lambda: client.set_terminated(run_id, status, end_time=end), budget_s=left())
        retry(
            uri,
            "end parent run",
            lambda: client.set_terminated(parent_id, status, end_time=end),
            budget_s=left(),
        )
    except Exception as err:
        if status == "FINISHED":
            raise
        # Logged, not raised: the step's own error is the one to report.
        log.error("could not mark MLflow run %s as %s: %s", run_id, status, redact(err))
    finally:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            # Already terminated above; this only pops the fluent run stack (its request is bounded too).
            with suppress(Exception), bounded_http(2):
                mlflow.end_run(status)
