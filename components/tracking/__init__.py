"""MLflow tracking for the pipeline steps: the only package in the project that imports mlflow (lazily,
so importing it stays cheap and a run with ``pipeline.tracking: false`` never needs a server).

Layout in MLflow (one experiment per pipeline, ``pipeline.experiment`` in params.yaml)::

    pipeline-<id[:8]>                 parent run, tags daft.pipeline_run_id=<id>, daft.role=pipeline
      ├── prepare_data                child run per step, tags mlflow.parentRunId, daft.step, daft.method,
      ├── finetune[daft]              daft.pipeline_run_id; params, per-epoch metrics, dataset inputs,
      └── ...                         artifacts and logged models

Modules: ``identity`` (store URI and its kind, pod detection, pipeline run id, data digest, tag names),
``retries`` (retries within a total deadline, write-conflict retries, TrackingError, no local store in a
pod), ``redaction`` (credentials out of messages and logs), ``registry`` (aliases), ``runs`` (experiment,
parent run), ``values`` (MLflow-safe values), ``tracker`` (step_run, StepTracker, the run's id and URL).
Names are re-exported here for reading and calling; to monkeypatch a setting (e.g. ``RETRY_BACKOFF_S``),
patch the module that defines it.
"""

from components.tracking.identity import (
    ALLOW_LOCAL_ENV,
    DATA_DIGEST_TAG,
    METHOD_TAG,
    PARENT_TAG,
    PIPELINE_ID_ENV,
    POD_ENV,
    ROLE_TAG,
    ROOT_MARKERS,
    SOURCE_PATHS,
    STEP_TAG,
    data_digest,
    in_pod,
    is_local_store,
    is_server_uri,
    local_store_allowed,
    pipeline_run_id,
    repo_root,
    store_root,
    tracking_uri,
)
from components.tracking.redaction import has_credentials, install_log_redaction, redact
from components.tracking.registry import set_alias, try_set_alias, version_for_alias
from components.tracking.retries import (
    CONFLICT_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    HTTP_ENV_DEFAULTS,
    RETRY_ATTEMPTS,
    RETRY_BACKOFF_S,
    TIMEOUT_ENV,
    TrackingError,
    check_reachable,
    require_durable_store,
    tracking_timeout_s,
)
from components.tracking.tracker import MAX_DATASET_DIGEST, StepTracker, last_run, step_run
from components.tracking.values import MAX_PARAM_VALUE

__all__ = [
    "ALLOW_LOCAL_ENV",
    "CONFLICT_ATTEMPTS",
    "DATA_DIGEST_TAG",
    "DEFAULT_TIMEOUT_S",
    "HTTP_ENV_DEFAULTS",
    "MAX_DATASET_DIGEST",
    "MAX_PARAM_VALUE",
    "METHOD_TAG",
    "PARENT_TAG",
    "PIPELINE_ID_ENV",
    "POD_ENV",
    "RETRY_ATTEMPTS",
    "RETRY_BACKOFF_S",
    "ROLE_TAG",
    "ROOT_MARKERS",
    "SOURCE_PATHS",
    "STEP_TAG",
    "TIMEOUT_ENV",
    "StepTracker",
    "TrackingError",
    "check_reachable",
    "data_digest",
    "has_credentials",
    "in_pod",
    "install_log_redaction",
    "is_local_store",
    "is_server_uri",
    "last_run",
    "local_store_allowed",
    "pipeline_run_id",
    "redact",
    "repo_root",
    "require_durable_store",
    "set_alias",
    "step_run",
    "store_root",
    "tracking_timeout_s",
    "tracking_uri",
    "try_set_alias",
    "version_for_alias",
]
