"""A step's MLflow child run (:func:`step_run`) and what the step logs into it (:class:`StepTracker`).

Model logging format
    Models are logged with ``mlflow.pytorch.log_model(..., serialization_format="pickle")``: the pickle
    flavour (``torch.save`` of the whole module with MLflow's cloudpickle-based pickle module). The default of
    MLflow 3 (``torch.export``, "pt2") traces the forward for one fixed input example and loads back as an
    ``fx.GraphModule``: it would lose ``features()``/``head``/``spec`` and the data-dependent branches of
    ``DaftModel.preprocess`` (uint8 or float, 1 or 3 channels, any size). The pickle refers to classes by
    import path, so ``daft_core`` is logged with the model (``code_paths``; MLflow puts it on ``sys.path``
    before unpickling) and the requirements pin torch, torchvision, timm, numpy and cloudpickle: a process
    with only those installed (``mlflow models serve``) loads it. The weights are a CPU, eval-mode copy of
    the model, so ``mlflow.pytorch.load_model`` returns a module that reproduces the logged model's outputs
    exactly. Loading a pickled model executes code from
    the artifact store: only load models from a tracking server you trust. The portable, pickle-free copy of
    every model is the ``save_model`` checkpoint each step also writes (and DVC/Kubeflow track).
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from components.tracking import registry
from components.tracking.fast_logging import lean_log_model
from components.tracking.identity import (
    DATA_DIGEST_TAG,
    METHOD_TAG,
    PARENT_TAG,
    ROLE_TAG,
    STEP_TAG,
    data_digest,
    store_root,
    tracking_uri,
)
from components.tracking.retries import (
    TrackingError,
    bounded_http,
    mlflow_client,
    redact_uri,
    require_durable_store,
    retry,
)
from components.tracking.runs import end_runs, ensure_experiment, find_or_create_parent, global_uri
from components.tracking.values import as_number, flatten, param_value, safe_name, to_numpy

log = logging.getLogger(__name__)

MAX_DATASET_DIGEST = 32  # MLflow stores dataset digests in a 36-character column

T = TypeVar("T")


class StepTracker:
    """Logs one step's run. Obtain it from :func:`step_run`; every method is a no-op when disabled,
    so steps log unconditionally and ``pipeline.tracking: false`` needs no branches in them."""

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

    @property
    def run_url(self) -> str | None:
        """The run's page in the MLflow UI for a tracking server (http(s), credentials removed); None for
        a local store, Databricks, or when tracking is off."""
        if not self.enabled or self.uri is None or self.experiment_id is None:
            return None
        link = _run_link(self.uri, self.experiment_id, str(self.run_id))
        return link if link.startswith(("http://", "https://")) else None

    def run_info(self) -> dict[str, str | None]:
        """``mlflow_run_id`` and ``mlflow_run_url`` (None when tracking is off), for a step's result."""
        return {"mlflow_run_id": self.run_id, "mlflow_run_url": self.run_url}

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        assert self.uri is not None
        return retry(self.uri, what, fn)

    # -- params / metrics --------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        flat = [Param(k, param_value(v)) for k, v in flatten(params).items() if v is not None]
        for i in range(0, len(flat), 100):  # MLflow's per-batch param limit
            chunk = flat[i : i + 100]
            self._call("log params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric values only (nested dicts flattened with dotted keys; None and non-numbers skipped)."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = []
        for k, v in flatten(metrics).items():
            x = as_number(v)
            if x is None:
                continue
            rows.append(Metric(k, x, now, int(step) if step is not None else 0))
        for i in range(0, len(rows), 1000):  # MLflow's per-batch metric limit
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
        source: str | None = None,
    ) -> str | None:
        """Record a dataset input (source: `source` when given, e.g. the ``s3://`` URI the data was read
        from, else data_dir; digest: the manifest's hashes); returns the digest.

        The full digest also goes into a run tag, since the dataset entity only keeps a prefix of it.
        """
        if not self.enabled:
            return None
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        digest = data_digest(manifest)
        where = source if source else data_dir
        ds = MetaDataset(source=_dataset_source(where), name=name, digest=digest[:MAX_DATASET_DIGEST])
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
        description: str | None = None,
        registered_model_description: str | None = None,
    ) -> str | None:
        """Log `model` (pickle flavour, CPU eval copy; see the module docstring for why), register a new
        version, tag it, set `alias`.

        Returns the new version (None when tracking is disabled). Version tags: ``stage``, ``method``,
        ``source_version`` (the version this model was derived from, or "none"), ``run_id``,
        ``pipeline_run_id``. `input_example`: one or two inputs as the model takes them (e.g. uint8
        (N, C, H, W) images; cut to 2 rows), stored with the model; the signature takes its dtype and
        channels with free batch, height and width (:func:`model_signature`). `description`: the new
        version's description; `registered_model_description`: the registered model's, set only while it
        has none (one edited in the UI is kept).

        The model is servable from its artifacts alone: ``daft_core`` travels with it (``code_paths``; MLflow
        puts it on ``sys.path`` when loading) and its requirements pin torch, torchvision, timm, numpy and
        cloudpickle as installed here (:func:`model_requirements`).
        """
        if not self.enabled:
            return None
        import mlflow
        import mlflow.pytorch

        module = copy.deepcopy(model).cpu().eval()
        example = to_numpy(input_example)
        signature = model_signature(module, example)
        requirements = model_requirements()

        def log_it() -> Any:
            with lean_log_model(requirements):  # ~2 s less per model, same artifacts (see there)
                return mlflow.pytorch.log_model(
                    module,
                    name=safe_name(stage),
                    input_example=example,
                    signature=signature,
                    serialization_format="pickle",
                    code_paths=[str(_core_package_dir())],
                    # explicit: skips MLflow's requirement inference, which re-loads the model in a
                    # subprocess
                    pip_requirements=requirements,
                )

        info = self._call(f"log model {stage}", log_it)
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
        if description:
            self._call(
                f"describe {registered_model} version {version}",
                lambda: self.client.update_model_version(registered_model, version, description=description),
            )
        if registered_model_description:
            current = self._call(
                f"get {registered_model}", lambda: self.client.get_registered_model(registered_model)
            )
            if not (current.description or "").strip():
                self._call(
                    f"describe {registered_model}",
                    lambda: self.client.update_registered_model(
                        registered_model, description=registered_model_description
                    ),
                )
        self.set_alias(registered_model, alias, version)
        self.set_tags({f"daft.model_version.{safe_name(stage)}": version})
        log.info("logged model %s version %s (stage %s, alias %s)", registered_model, version, stage, alias)
        return version

    def set_alias(self, registered_model: str, alias: str, version: str | int) -> None:
        if not self.enabled:
            return
        registry.set_alias(registered_model, alias, version, uri=self.uri)

    def version_for_alias(self, registered_model: str, alias: str) -> str | None:
        if not self.enabled:
            return None
        return registry.version_for_alias(registered_model, alias, uri=self.uri)


# What a logged model needs besides MLflow's defaults for the flavour (torch, cloudpickle): the packages
# daft_core's modules import (its code travels with the model, see StepTracker.log_model).
MODEL_PACKAGES = ("torchvision", "timm", "numpy")


def _core_package_dir() -> Path:
    """The ``daft_core`` package directory (logged as the model's code)."""
    import daft_core

    return Path(daft_core.__file__).resolve().parent


def model_requirements() -> list[str]:
    """pip requirements of a logged model: MLflow's pinned defaults for PyTorch plus
    :data:`MODEL_PACKAGES`, each pinned to the installed version (a local label such as ``+cpu`` dropped,
    as MLflow does, so pip can install it); a package not installed here is left out."""
    from importlib.metadata import PackageNotFoundError, version

    import mlflow.pytorch

    reqs = list(mlflow.pytorch.get_default_pip_requirements())
    names = {r.split("==")[0].lower() for r in reqs}
    for pkg in MODEL_PACKAGES:
        if pkg in names:
            continue
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def model_signature(module: Any, example: Any) -> Any:
    """The model's signature: images (-1, C, -1, -1) of the example's dtype (any batch size and image size;
    ``DaftModel.preprocess`` resizes), logits (-1, K). None (MLflow infers it) for an example that is not a
    4-d array."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    if not isinstance(example, np.ndarray) or example.ndim != 4:
        return None
    out_dtype, out_shape = _daft_output(module) or _output_of_forward(module, example)
    return ModelSignature(
        inputs=Schema([TensorSpec(example.dtype, (-1, int(example.shape[1]), -1, -1))]),
        outputs=Schema([TensorSpec(out_dtype, (-1, *out_shape))]),
    )


def _daft_output(module: Any) -> tuple[Any, tuple[int, ...]] | None:
    """A DaftModel's logits dtype and per-row shape, read off its linear head (its forward is
    ``head(features(x))``) instead of running the model: a first forward on a new input shape costs ~1.5 s
    on CPU (kernel set-up), more than the rest of logging. None for any other module."""
    from daft_core.models import DaftModel

    if not isinstance(module, DaftModel) or type(module).forward is not DaftModel.forward:
        return None
    import torch

    return torch.empty(0, dtype=module.head.weight.dtype).numpy().dtype, (int(module.head.out_features),)


def _output_of_forward(module: Any, example: Any) -> tuple[Any, tuple[int, ...]]:
    import numpy as np
    import torch

    with torch.no_grad():
        out = module(torch.from_numpy(np.ascontiguousarray(example)))
    logits = out.detach().cpu().numpy()
    return logits.dtype, tuple(int(n) for n in logits.shape[1:])


def _dataset_source(data_dir: str | os.PathLike[str]) -> Any:
    """A source pointing at data_dir: a URI (s3://...) as is, a local path as a file:// URI (an S3 URI
    resolves to MLflow's S3 artifact source, whose ``uri`` is the URI itself)."""
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


_last_run: dict[str, str | None] = {"mlflow_run_id": None, "mlflow_run_url": None}


def last_run() -> dict[str, str | None]:
    """:meth:`StepTracker.run_info` of the latest :func:`step_run` started in this process (Nones before
    any, or when it was untracked): for callers that only get a step's result from code they cannot change.
    """
    return dict(_last_run)


def _remember(tracker: StepTracker) -> None:
    _last_run.update(tracker.run_info())


def _run_link(uri: str, exp_id: str, run_id: str) -> str:
    """Where to look at the run: the UI link for a server (credentials removed), else the store URI.

    Stands in for MLflow's own "View run ... at: <uri>" line, which would print the URI's credentials and
    is switched off (:func:`~components.tracking.redaction.install_log_redaction`)."""
    safe = redact_uri(uri)
    if safe.startswith(("http://", "https://")):
        return f"{safe.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return safe


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
    Raises :class:`TrackingError` before the body runs when the tracking server is unreachable, or when the
    store is local to a Kubernetes pod (:func:`~components.tracking.retries.require_durable_store`), so a
    step fails within seconds instead of after its expensive work.
    """
    if not enabled:
        log.info("MLflow tracking disabled (pipeline.tracking: false)")
        tracker = StepTracker(step=step, method=method, pipeline_id=pipeline_id)
        _remember(tracker)
        yield tracker
        return

    import mlflow

    uri = require_durable_store(tracking_uri())
    client = mlflow_client(uri)
    t0 = time.monotonic()
    retry(uri, "connect", lambda: client.search_experiments(max_results=1))
    # With the default sqlite store, artifacts go next to it (<repo>/mlartifacts, git-ignored) whatever the
    # cwd, and in a DVC experiment's temporary workspace next to the real repository's store; with a server,
    # its own artifact root (e.g. --artifacts-destination s3://...) applies.
    default_store = not os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    location = (store_root() / "mlartifacts").as_uri() if default_store else None
    exp_id = ensure_experiment(client, uri, experiment, location)
    parent_id = find_or_create_parent(client, uri, exp_id, pipeline_id)
    run_name = f"{step}[{method}]" if method else step
    tags = {
        "mlflow.parentRunId": parent_id,
        PARENT_TAG: pipeline_id,
        ROLE_TAG: "step",
        STEP_TAG: step,
        METHOD_TAG: method or "none",
        "mlflow.source.name": f"components.{step}",
    }
    run = retry(uri, "create run", lambda: client.create_run(exp_id, run_name=run_name, tags=tags))
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
    _remember(tracker)
    log.info(
        "MLflow run %s (%s) under pipeline run %s at %s [%.1f s]",
        run_id,
        run_name,
        parent_id,
        _run_link(uri, exp_id, run_id),
        time.monotonic() - t0,
    )
    status = "FAILED"
    with global_uri(uri):
        # Also the fluent active run, so mlflow.* calls inside the step (log_model) land in this run.
        nested = mlflow.active_run() is not None
        retry(uri, "start run", lambda: mlflow.start_run(run_id=run_id, nested=nested))
        server_gone = False
        try:
            tracker.log_params(params)
            yield tracker
            status = "FINISHED"
        except TrackingError as err:
            server_gone = err.unreachable
            raise
        finally:
            if server_gone:
                # Marking the run FAILED would only spend more time on a server that does not answer: the
                # step fails within the tracking budget; the run stays RUNNING in MLflow.
                log.warning("MLflow run %s left RUNNING: the tracking server stopped answering", run_id)
                with suppress(Exception), bounded_http(1):
                    mlflow.end_run("FAILED")  # pops the fluent run stack
            else:
                end_runs(client, uri, run_id, parent_id, status)
