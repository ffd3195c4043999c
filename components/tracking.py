"""MLflow tracking for the pipeline steps: the only module in the project that imports mlflow.

Layout in MLflow (one experiment per pipeline, ``pipeline.experiment`` in params.yaml)::

    pipeline-<id[:8]>                 parent run, tags daft.pipeline_run_id=<id>, daft.role=pipeline
      ├── prepare_data                child run per step, tags mlflow.parentRunId, daft.step, daft.method,
      ├── finetune[daft]              daft.pipeline_run_id; params, per-epoch metrics, dataset inputs,
      └── ...                         artifacts and logged models

Grouping without coordination
    DVC starts every stage of one ``dvc repro`` as a separate process, and Kubeflow runs every step in its
    own pod, so no process can hand a parent run id to the next one. Each step therefore derives the same
    *pipeline run id* on its own (:func:`pipeline_run_id`) and finds-or-creates the parent run tagged with it:

    * ``DAFT_PIPELINE_RUN_ID`` when set (the Kubeflow pipeline sets it to its own run id; a person may set
      it to keep two ``dvc repro`` of the same code and params apart);
    * else ``sha256(git HEAD commit, dirty digest of the source directories, sha256(params json))``: every
      stage of one ``dvc repro`` sees the same code and params and thus the same id. Re-running with the same
      commit, the same uncommitted source changes and the same params continues the same parent run; any
      change of code or params starts a new one. Files DVC writes during a repro (``dvc.lock``, data, models,
      metrics) are deliberately not part of the dirty digest, otherwise each stage would get its own parent.

    Two steps starting at the same instant (parallel Kubeflow pods) can both create a parent; both then pick
    the oldest one (earliest start time, then smallest run id) and the loser deletes the run it created.

Model logging format
    Models are logged with ``mlflow.pytorch.log_model(..., serialization_format="pickle")``: the pickle
    flavour (``torch.save`` of the whole module with MLflow's cloudpickle-based pickle module). The default of
    MLflow 3 (``torch.export``, "pt2") traces the forward for one fixed input example and loads back as an
    ``fx.GraphModule``: it would lose ``features()``/``head``/``spec`` and the data-dependent branches of
    ``DaftModel.preprocess`` (uint8 or float, 1 or 3 channels, any size). The pickle refers to classes by
    import path, so loading needs the same ``daft_core`` installed (it is: one image / one venv for every
    step); the weights are a CPU, eval-mode copy of the model, so ``mlflow.pytorch.load_model`` returns a
    module that reproduces the logged model's outputs exactly. Loading a pickled model executes code from
    the artifact store: only load models from a tracking server you trust. The portable, pickle-free copy of
    every model is the ``save_model`` checkpoint each step also writes (and DVC/Kubeflow track).

Failure behaviour
    Every call that talks to the tracking server goes through a bounded retry (3 attempts, 1 s and 2 s
    back-off, MLflow's own HTTP retries lowered to 1 with a 30 s request timeout unless the user set
    ``MLFLOW_HTTP_REQUEST_*``) and then raises :class:`TrackingError` naming the URI and the fixes.
    :func:`step_run` checks reachability first, so a step fails within seconds, before its expensive work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import numbers
import os
import re
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

__all__ = [
    "PARENT_TAG",
    "StepTracker",
    "TrackingError",
    "check_reachable",
    "data_digest",
    "pipeline_run_id",
    "repo_root",
    "set_alias",
    "step_run",
    "tracking_uri",
    "version_for_alias",
]

PIPELINE_ID_ENV = "DAFT_PIPELINE_RUN_ID"
PARENT_TAG = "daft.pipeline_run_id"
ROLE_TAG = "daft.role"
STEP_TAG = "daft.step"
METHOD_TAG = "daft.method"
DATA_DIGEST_TAG = "daft.data_digest"
# Directories/files whose uncommitted changes make a different pipeline id (code, not outputs).
SOURCE_PATHS = ("daft_core", "components", "pipelines", "dvc.yaml", "pyproject.toml")
ROOT_MARKERS = ("params.yaml", "dvc.yaml")

RETRY_ATTEMPTS = 3
RETRY_BACKOFF_S = 1.0
# Lowered MLflow HTTP defaults (7 retries with exponential back-off and a 120 s timeout would make a step
# hang for minutes on a dead server). setdefault: values the user exported win.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
MAX_PARAM_VALUE = 6000
MAX_DATASET_DIGEST = 32  # MLflow stores dataset digests in a 36-character column

T = TypeVar("T")


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be reached (or keeps failing); the message says how to fix it."""


# --------------------------------------------------------------------------------------------------
# Where to track, and under which pipeline run
# --------------------------------------------------------------------------------------------------


def repo_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The nearest directory holding params.yaml or dvc.yaml, from `start` (default cwd) upward; else cwd."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if any((d / m).is_file() for m in ROOT_MARKERS):
            return d
    return here


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo root>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{(repo_root() / 'mlflow.db').as_posix()}"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, timeout=30, check=False, env=_git_env()
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GIT_OPTIONAL_LOCKS", "0")  # never take index.lock while DVC may be using git
    return env


def _git_state(root: Path) -> str:
    head = _git(root, "rev-parse", "--verify", "HEAD")
    if head is None or head.returncode != 0:
        return "nogit"
    commit = head.stdout.decode().strip()
    paths = [p for p in SOURCE_PATHS if (root / p).exists()]
    if not paths:
        return commit
    diff = _git(root, "diff", "--no-ext-diff", "--binary", "HEAD", "--", *paths)
    if diff is None or diff.returncode != 0 or not diff.stdout:
        return commit
    return f"{commit}+dirty-{hashlib.sha256(diff.stdout).hexdigest()[:16]}"


def pipeline_run_id(params_json: str) -> str:
    """The id every step of one pipeline run derives independently (see the module docstring).

    ``DAFT_PIPELINE_RUN_ID`` when set; else a hex digest of the git HEAD commit (plus a digest of the
    uncommitted changes under the source directories, if any) and of ``params_json``.
    """
    env = os.environ.get(PIPELINE_ID_ENV, "").strip()
    if env:
        return env
    state = _git_state(repo_root())
    params_sha = hashlib.sha256(params_json.encode()).hexdigest()
    return hashlib.sha256(f"{state}\n{params_sha}".encode()).hexdigest()[:32]


def data_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 over every ``sha256`` entry of a manifest (with its key path); else over the whole manifest."""
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for k in sorted(node, key=str):
                v = node[k]
                sub = f"{path}.{k}" if path else str(k)
                if "sha256" in str(k).lower() and isinstance(v, str):
                    found.append(f"{sub}={v}")
                else:
                    walk(v, sub)
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(manifest, "")
    payload = "\n".join(found) if found else json.dumps(manifest, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Bounded retry and error translation
# --------------------------------------------------------------------------------------------------


def _redact(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password or parts.username:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
    return uri


def _configure_http() -> None:
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


_TRANSIENT_NAMES = (
    "ConnectionError",
    "ConnectTimeout",
    "ConnectTimeoutError",
    "NewConnectionError",
    "MaxRetryError",
    "RetryError",
    "ReadTimeout",
    "Timeout",
    "TimeoutError",
    "EndpointConnectionError",
    "ConnectionRefusedError",
    "RemoteDisconnected",
    "ProtocolError",
)
_TRANSIENT_TEXT = (
    "connection refused",
    "failed to establish a new connection",
    "max retries exceeded",
    "connection aborted",
    "connection reset",
    "remote end closed connection",
    "timed out",
    "database is locked",
    "temporarily unavailable",
    "502 bad gateway",
    "503 service unavailable",
    "504 gateway",
)


def _is_transient(err: BaseException) -> bool:
    """Connection-level / server-overload failures (worth retrying), as opposed to API errors."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        code = getattr(e, "error_code", None)
        if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        status = getattr(e, "get_http_status_code", None)
        if callable(status):
            try:
                if int(status()) in (502, 503, 504):
                    return True
            except Exception:
                pass
        text = str(e).lower()
        if any(t in text for t in _TRANSIENT_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _fix_hint(uri: str) -> str:
    return (
        f"MLflow tracking at {_redact(uri)} is unreachable. Fix: start the tracking server "
        "(e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000`), point "
        "MLFLOW_TRACKING_URI at a running one (unset it to use sqlite:///<repo>/mlflow.db), or set "
        "`pipeline.tracking: false` in params.yaml to run without tracking."
    )


def _retry(uri: str, what: str, fn: Callable[[], T]) -> T:
    """Call `fn`; retry transient failures (bounded), then raise TrackingError. API errors pass through."""
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return fn()
        except TrackingError:
            raise
        except Exception as err:
            if not _is_transient(err):
                raise
            if attempt == RETRY_ATTEMPTS:
                raise TrackingError(
                    f"{_fix_hint(uri)} ({what} failed {RETRY_ATTEMPTS} times; last error: "
                    f"{type(err).__name__}: {str(err)[:500]})"
                ) from err
            delay = RETRY_BACKOFF_S * 2 ** (attempt - 1)
            log.warning(
                "MLflow %s failed (%s); retry %d/%d in %.0f s", what, err, attempt, RETRY_ATTEMPTS - 1, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    _configure_http()
    return MlflowClient(tracking_uri=uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def check_reachable(uri: str | None = None) -> None:
    """One cheap request (bounded retry) so a step fails fast, before its expensive work."""
    uri = uri or tracking_uri()
    client = _client(uri)
    _retry(uri, "connect", lambda: client.search_experiments(max_results=1))


# --------------------------------------------------------------------------------------------------
# Flattening
# --------------------------------------------------------------------------------------------------


_KEY_OK = re.compile(r"[^\w\-. /]")


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; characters MLflow refuses in keys (e.g. from OOD set names) -> "_"."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        k = _KEY_OK.sub("_", str(k))
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _as_number(v: Any) -> float | None:
    if v is None or isinstance(v, str | bytes):
        return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, numbers.Real):
        return float(v)
    item = getattr(v, "item", None)  # numpy / 0-d torch scalars
    if callable(item) and getattr(v, "ndim", 0) == 0:
        try:
            x = item()
        except Exception:
            return None
        return float(x) if isinstance(x, numbers.Real) else None
    return None


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, list | tuple) else str(v)
    if len(s) > MAX_PARAM_VALUE:
        log.warning("param value truncated to %d characters", MAX_PARAM_VALUE)
        s = s[: MAX_PARAM_VALUE - 3] + "..."
    return s


# --------------------------------------------------------------------------------------------------
# Registry helpers (usable outside a run)
# --------------------------------------------------------------------------------------------------


def set_alias(registered_model: str, alias: str, version: str | int, *, uri: str | None = None) -> None:
    """Point `alias` (e.g. ``champion``) of `registered_model` at `version`."""
    uri = uri or tracking_uri()
    client = _client(uri)
    _retry(
        uri,
        f"set alias {registered_model}@{alias}",
        lambda: client.set_registered_model_alias(registered_model, alias, str(version)),
    )
    log.info("alias %s@%s -> version %s", registered_model, alias, version)


def version_for_alias(registered_model: str, alias: str, *, uri: str | None = None) -> str | None:
    """The version `alias` points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    client = _client(uri)
    try:
        mv = _retry(
            uri,
            f"get alias {registered_model}@{alias}",
            lambda: client.get_model_version_by_alias(registered_model, alias),
        )
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return str(mv.version)


# --------------------------------------------------------------------------------------------------
# Trackers
# --------------------------------------------------------------------------------------------------


class StepTracker:
    """Logs one step's run. Obtain it from :func:`step_run`; every method is a no-op when disabled."""

    def __init__(
        self,
        *,
        uri: str | None = None,
        client: Any = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        experiment_id: str | None = None,
        pipeline_id: str | None = None,
        step: str = "",
        method: str | None = None,
    ) -> None:
        self.uri = uri
        self.client = client
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.pipeline_id = pipeline_id
        self.step = step
        self.method = method

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        assert self.uri is not None
        return _retry(self.uri, what, fn)

    # -- params / metrics --------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        flat = [Param(k, _param_value(v)) for k, v in _flatten(params).items() if v is not None]
        for i in range(0, len(flat), 100):
            chunk = flat[i : i + 100]
            self._call("log params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric values only (nested dicts flattened with dotted keys; None and non-numbers skipped)."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = []
        for k, v in _flatten(metrics).items():
            x = _as_number(v)
            if x is None:
                continue
            rows.append(Metric(k, x, now, int(step) if step is not None else 0))
        for i in range(0, len(rows), 1000):
            chunk = rows[i : i + 1000]
            self._call("log metrics", lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """One per-epoch record (``finetune`` history row): every numeric field at step=epoch."""
        if not self.enabled:
            return
        epoch = record.get("epoch")
        self.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(epoch or 0))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        rows = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("set tags", lambda: self.client.log_batch(self.run_id, tags=rows))

    # -- lineage / artifacts -----------------------------------------------------------------------
    def log_dataset(
        self,
        data_dir: str | os.PathLike[str],
        manifest: Mapping[str, Any],
        name: str = "dataset",
        context: str = "training",
    ) -> str | None:
        """Record a dataset input (source: data_dir; digest: the manifest's hashes); returns the digest."""
        if not self.enabled:
            return None
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        digest = data_digest(manifest)
        ds = MetaDataset(source=_dataset_source(data_dir), name=name, digest=digest[:MAX_DATASET_DIGEST])
        entity = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self._call("log dataset", lambda: self.client.log_inputs(self.run_id, datasets=[entity]))
        self.set_tags({DATA_DIGEST_TAG: digest})
        return digest

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        p = Path(path)
        if p.is_dir():
            self._call(
                f"upload {p}", lambda: self.client.log_artifacts(self.run_id, str(p), artifact_path or p.name)
            )
        else:
            self._call(f"upload {p}", lambda: self.client.log_artifact(self.run_id, str(p), artifact_path))

    def log_dict(self, obj: Any, name: str) -> None:
        if not self.enabled:
            return
        self._call(f"upload {name}", lambda: self.client.log_dict(self.run_id, obj, name))

    # -- models ------------------------------------------------------------------------------------
    def log_model(
        self,
        model: Any,
        *,
        registered_model: str,
        stage: str,
        method: str | None,
        alias: str,
        input_example: Any,
        source_version: str | int | None = None,
    ) -> str | None:
        """Log `model` (pickle flavour, CPU eval copy), register a new version, tag it, set `alias`.

        Returns the new version (None when tracking is disabled). Version tags: ``stage``, ``method``,
        ``source_version`` (the version this model was derived from, or "none"), ``run_id``,
        ``pipeline_run_id``. `input_example`: one or two inputs as the model takes them (e.g. uint8
        (N, C, H, W) images; cut to 2 rows), stored with the model and used to infer its signature.
        """
        if not self.enabled:
            return None
        import mlflow
        import mlflow.pytorch

        module = copy.deepcopy(model).cpu().eval()
        example = _to_numpy(input_example)
        info = self._call(
            f"log model {stage}",
            lambda: mlflow.pytorch.log_model(
                module,
                name=_safe_name(stage),
                input_example=example,
                serialization_format="pickle",
                # explicit: skips MLflow's requirement inference, which re-loads the model in a subprocess
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            ),
        )
        tags = {
            "stage": stage,
            "method": method or "none",
            "source_version": str(source_version) if source_version is not None else "none",
            "run_id": self.run_id,
            "pipeline_run_id": self.pipeline_id or "",
        }
        mv = self._call(
            f"register {registered_model}",
            lambda: mlflow.register_model(info.model_uri, registered_model, tags=tags),
        )
        version = str(mv.version)
        self.set_alias(registered_model, alias, version)
        self.set_tags({f"daft.model_version.{_safe_name(stage)}": version})
        log.info("logged model %s version %s (stage %s, alias %s)", registered_model, version, stage, alias)
        return version

    def set_alias(self, registered_model: str, alias: str, version: str | int) -> None:
        if not self.enabled:
            return
        set_alias(registered_model, alias, version, uri=self.uri)

    def version_for_alias(self, registered_model: str, alias: str) -> str | None:
        if not self.enabled:
            return None
        return version_for_alias(registered_model, alias, uri=self.uri)


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in s) or "model"


def _to_numpy(x: Any, max_rows: int = 2) -> Any:
    """A tensor/array input example as numpy, cut to `max_rows` (it is stored as JSON next to the model)."""
    if x is None:
        return None
    detach = getattr(x, "detach", None)
    if callable(detach):
        x = detach().cpu().numpy()
    return x[:max_rows] if getattr(x, "ndim", 0) >= 1 else x


def _dataset_source(data_dir: str | os.PathLike[str]) -> Any:
    """A source pointing at data_dir: a URI (s3://...) as is, a local path as a file:// URI."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    s = str(data_dir)
    if "://" not in s:
        s = Path(s).resolve().as_uri()
    try:
        with warnings.catch_warnings():  # "file" and "" both map to LocalArtifactDatasetSource: harmless
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(s)
    except Exception:  # a scheme without an MLflow artifact repository: keep the URI as is
        return HTTPDatasetSource(url=s)


@contextmanager
def _global_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, register_model) at `uri` for the step; restore it after.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI; both are put back so one process can run
    several steps (tests, notebooks) against different stores. The registry URI follows the tracking URI
    unless MLFLOW_REGISTRY_URI is set.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    prev = getattr(tracking_utils, "_tracking_uri", None)
    prev_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(prev)
        if prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev_env


# --------------------------------------------------------------------------------------------------
# The step context manager
# --------------------------------------------------------------------------------------------------


def _experiment_id(client: Any, uri: str, name: str, artifact_location: str | None = None) -> str:
    from mlflow.exceptions import MlflowException

    exp = _retry(uri, "get experiment", lambda: client.get_experiment_by_name(name))
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            _retry(uri, "restore experiment", lambda: client.restore_experiment(exp.experiment_id))
        return exp.experiment_id
    try:
        return _retry(uri, "create experiment", lambda: client.create_experiment(name, artifact_location))
    except MlflowException as err:  # created by a concurrent step
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return _retry(uri, "get experiment", lambda: client.get_experiment_by_name(name)).experiment_id


def _parents(client: Any, uri: str, exp_id: str, pipeline_id: str) -> list[Any]:
    flt = f"tags.`{PARENT_TAG}` = '{pipeline_id}' and tags.`{ROLE_TAG}` = 'pipeline'"
    runs = _retry(uri, "search runs", lambda: client.search_runs([exp_id], filter_string=flt, max_results=50))
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _find_or_create_parent(client: Any, uri: str, exp_id: str, pipeline_id: str) -> str:
    found = _parents(client, uri, exp_id, pipeline_id)
    if found:
        return found[0].info.run_id
    tags = {PARENT_TAG: pipeline_id, ROLE_TAG: "pipeline", "mlflow.source.name": "daft pipeline"}
    if os.environ.get(PIPELINE_ID_ENV):
        tags["daft.pipeline_run_id.source"] = PIPELINE_ID_ENV
    run = _retry(
        uri,
        "create parent run",
        lambda: client.create_run(exp_id, run_name=f"pipeline-{pipeline_id[:8]}", tags=tags),
    )
    mine = run.info.run_id
    found = _parents(client, uri, exp_id, pipeline_id)
    winner = found[0].info.run_id if found else mine
    if winner != mine:  # lost a creation race with a concurrent step
        log.info("parent run created concurrently; using %s", winner)
        _retry(uri, "delete duplicate parent", lambda: client.delete_run(mine))
    else:
        log.info("created parent run %s for pipeline %s", mine, pipeline_id)
    return winner


@contextmanager
def step_run(
    step: str,
    params: Mapping[str, Any],
    *,
    method: str | None = None,
    enabled: bool = True,
    experiment: str,
    pipeline_id: str,
) -> Iterator[StepTracker]:
    """One child run for `step` under the pipeline's parent run; ends FINISHED, or FAILED and re-raises.

    With ``enabled=False`` yields a tracker whose methods do nothing (no server, no mlflow.db).
    Raises :class:`TrackingError` before the body runs when the tracking server is unreachable.
    """
    if not enabled:
        log.info("MLflow tracking disabled (pipeline.tracking: false)")
        yield StepTracker(step=step, method=method, pipeline_id=pipeline_id)
        return

    import mlflow

    uri = tracking_uri()
    client = _client(uri)
    t0 = time.monotonic()
    _retry(uri, "connect", lambda: client.search_experiments(max_results=1))
    # With the default sqlite store, artifacts go next to it (<repo>/mlartifacts, git-ignored) whatever the
    # cwd; with a server, its own artifact root (e.g. --artifacts-destination s3://...) applies.
    default_store = not os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    location = (repo_root() / "mlartifacts").as_uri() if default_store else None
    exp_id = _experiment_id(client, uri, experiment, location)
    parent_id = _find_or_create_parent(client, uri, exp_id, pipeline_id)
    run_name = f"{step}[{method}]" if method else step
    tags = {
        "mlflow.parentRunId": parent_id,
        PARENT_TAG: pipeline_id,
        ROLE_TAG: "step",
        STEP_TAG: step,
        METHOD_TAG: method or "none",
        "mlflow.source.name": f"components.{step}",
    }
    run = _retry(uri, "create run", lambda: client.create_run(exp_id, run_name=run_name, tags=tags))
    run_id = run.info.run_id
    tracker = StepTracker(
        uri=uri,
        client=client,
        run_id=run_id,
        parent_run_id=parent_id,
        experiment_id=exp_id,
        pipeline_id=pipeline_id,
        step=step,
        method=method,
    )
    log.info(
        "MLflow run %s (%s) under pipeline run %s at %s [%.1f s]",
        run_id,
        run_name,
        parent_id,
        _redact(uri),
        time.monotonic() - t0,
    )
    status = "FAILED"
    with _global_uri(uri):
        # Also the fluent active run, so mlflow.* calls inside the step (log_model) land in this run.
        nested = mlflow.active_run() is not None
        _retry(uri, "start run", lambda: mlflow.start_run(run_id=run_id, nested=nested))
        try:
            tracker.log_params(params)
            yield tracker
            status = "FINISHED"
        finally:
            _end(client, uri, run_id, parent_id, status)


def _end(client: Any, uri: str, run_id: str, parent_id: str, status: str) -> None:
    import mlflow

    end = int(time.time() * 1000)
    try:
        _retry(uri, "end run", lambda: client.set_terminated(run_id, status, end_time=end))
        # The parent shows the outcome and end time of the latest step.
        _retry(uri, "end parent run", lambda: client.set_terminated(parent_id, status, end_time=end))
    except Exception:
        if status == "FINISHED":
            raise
        log.exception("could not mark MLflow run %s as %s", run_id, status)  # keep the step's own error
    finally:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            with suppress(Exception):  # already terminated above; this only pops the fluent run stack
                mlflow.end_run(status)
