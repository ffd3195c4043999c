"""KFP v2 lightweight components: thin wrappers that call ``components.<step>.run``.

Each component function below is self-contained (every import inside its body), as KFP ships the function's
source to the container and runs it there with ``python -m kfp.dsl.executor_main``. The bodies import the
project (``components.*`` for the step, and the small runtime helpers at the bottom of this module), which
the project image has installed; no stage logic lives here.

Conventions
    * ``params_json``: the whole validated parameter tree (``components.params.params_to_json``), produced
      once per run by :func:`resolve_params` from params.yaml plus the pipeline parameters.
    * ``tracking_uri`` -> ``MLFLOW_TRACKING_URI`` (empty: keep the pod's environment / the components'
      default); ``pipeline_run_id`` (the KFP run id) -> ``DAFT_PIPELINE_RUN_ID``, so every step's MLflow run
      hangs under one parent run. Credentials never travel as parameters: they come from Kubernetes secrets
      as environment variables (see pipelines.pipeline).
    * Artifacts are directories where the step writes directories (``dataset.path``, ``model.path``,
      ``evaluation.path``); each step also logs its key numbers to an ``Output[Metrics]``.
    * Each output artifact's metadata records the step's MLflow run (``mlflow_run_id``, ``mlflow_run_url``)
      and, where there is one, the ``registered_version`` (:func:`record_run`, :func:`record_champion`).

:func:`make_components` binds the functions to a base image (a compile option), with
``install_kfp_package=False`` (the image already has the pinned kfp).
"""

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, List, Optional  # noqa: UP035  (KFP parses typing forms)

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

if TYPE_CHECKING:
    from components.params import Params

log = logging.getLogger(__name__)

# No ``from __future__ import annotations`` here: KFP reads the component functions' annotations as objects.

# --------------------------------------------------------------------------------------------------
# The components (plain functions; make_components() turns them into KFP components)
# --------------------------------------------------------------------------------------------------


def resolve_params(
    params_json: str,
    tracking: bool,
    experiment: str,
    registered_model: str,
    epochs: int,
    seed: int,
    params: Output[Artifact],
    data_root: str = "",
) -> str:
    """Validate params.yaml's tree with the pipeline parameters applied; every other step reads the result.

    `data_root` (a path in the pod, e.g. on a mounted PVC, or ``s3://bucket/prefix``) replaces
    ``data.root``; empty keeps params.yaml's. Returns the tree as a string (``params_json`` of the steps) and
    writes it to `params` (a JSON file) for the steps inside a sweep's ParallelFor (see pipelines.pipeline:
    kfp.local cannot pass a task's output parameter into a loop).
    """
    from pipelines.components import resolve_params_json

    resolved = resolve_params_json(
        params_json,
        {
            "pipeline.tracking": tracking,
            "pipeline.experiment": experiment,
            "pipeline.registered_model": registered_model,
            "finetune.epochs": epochs,
            "finetune.seed": seed,
        },
        data_root=data_root,
    )
    with open(params.path, "w") as f:
        f.write(resolved)
    return resolved


def prepare_data(
    params_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
):
    """components.prepare_data: the prepared DatasetBundle directory."""
    from components import prepare_data as step
    from pipelines.components import log_metrics, record_run, step_setup

    params = step_setup(params_json, tracking_uri, pipeline_run_id)
    result = step.run(params, dataset.path)
    dataset.metadata["preset"] = params.data.preset
    record_run(dataset, result)
    log_metrics(metrics, result["counts"], prefix="count.")


def pretrained(
    params_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """components.pretrained: the verified backbone checkpoint every branch starts from."""
    from components import pretrained as step
    from pipelines.components import annotate_model, log_metrics, record_run, step_setup

    params = step_setup(params_json, tracking_uri, pipeline_run_id)
    info = step.run(params, dataset.path, model.path)
    annotate_model(model, params, "pretrained")
    record_run(model, info, version=info.get("registered_version"))
    log_metrics(metrics, {k: info[k] for k in ("batchnorm_layers", "parameters", "num_features")})


def convert_bn(
    params_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    dataset: Input[Dataset],
    pretrained: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """components.convert_bn: DAFT's function-preserving BatchNorm conversion."""
    from components import convert_bn as step
    from pipelines.components import annotate_model, log_metrics, record_run, step_setup

    params = step_setup(params_json, tracking_uri, pipeline_run_id)
    summary = step.run(params, pretrained.path, dataset.path, model.path)
    annotate_model(model, params, "bn_converted")
    record_run(model, summary, version=summary.get("registered_version"))
    log_metrics(metrics, summary)


def linear_probe(
    params_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    dataset: Input[Dataset],
    pretrained: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """components.linear_probe: features once, logistic-regression C sweep on ID val."""
    from components import linear_probe as step
    from pipelines.components import annotate_model, log_metrics, record_run, step_setup

    params = step_setup(params_json, tracking_uri, pipeline_run_id)
    summary = step.run(params, pretrained.path, dataset.path, model.path)
    annotate_model(model, params, "linear_probe")
    record_run(model, summary, version=summary.get("registered_version"))
    log_metrics(metrics, summary)


def finetune(
    tracking_uri: str,
    pipeline_run_id: str,
    method: str,
    dataset: Input[Dataset],
    start: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    params_json: str = "",
    params_file: Optional[Input[Artifact]] = None,  # noqa: UP045
    learning_rates: Optional[dict] = None,  # noqa: UP045
    lr: Optional[float] = None,  # noqa: UP045
    head_lr: Optional[float] = None,  # noqa: UP045
    backbone_lr: Optional[float] = None,  # noqa: UP045
) -> str:
    """components.finetune for one method (a branch, or one sweep point when lrs are given).

    `learning_rates` (method -> {lr | head_lr | backbone_lr}) or the sweep point's `lr` / `head_lr` /
    `backbone_lr` set the method's learning rates, by params' own rule. Returns a JSON string: method, the
    learning rates used, the registered model version ("" when tracking is off) and the best ID val
    accuracy; the evaluate step carries it to the sweep's selection.
    """
    import json

    from components import finetune as step
    from pipelines.components import annotate_model, log_metrics, method_lrs, record_run, step_setup

    params = step_setup(params_json, tracking_uri, pipeline_run_id, params_file)
    lrs = method_lrs(method, learning_rates, lr=lr, head_lr=head_lr, backbone_lr=backbone_lr)
    params = params.with_method_lrs(method, **lrs)
    summary = step.run(params, method, start.path, dataset.path, model.path)
    version = summary.get("registered_version") or ""
    info = {
        "method": method,
        "head_lr": summary["head_lr"],
        "backbone_lr": summary["backbone_lr"],
        "version": version,
        "best_val_accuracy": summary["best_val_accuracy"],
    }
    annotate_model(model, params, "finetune", method=method, version=version, extra=info)
    record_run(model, summary, version=version)
    log_metrics(metrics, {k: summary[k] for k in ("best_epoch", "best_val_accuracy", "epochs")})
    return json.dumps(info, sort_keys=True)


def evaluate(
    tracking_uri: str,
    pipeline_run_id: str,
    method: str,
    dataset: Input[Dataset],
    model: Input[Model],
    reference: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    params_json: str = "",
    params_file: Optional[Input[Artifact]] = None,  # noqa: UP045
    finetune_info: str = "{}",
):
    """components.evaluate: `<method>.json` (+ `.details.json`, `finetune.json`) in `evaluation`."""
    from pathlib import Path

    from components import evaluate as step
    from components.common import write_json
    from pipelines.components import as_mapping, log_metrics, record_run, step_setup

    params = step_setup(params_json, tracking_uri, pipeline_run_id, params_file)
    out = Path(evaluation.path)
    out.mkdir(parents=True, exist_ok=True)
    result = step.run(params, method, model.path, reference.path, dataset.path, out / f"{method}.json")
    info = as_mapping(finetune_info)
    write_json(out / "finetune.json", info)
    evaluation.metadata.update({"method": method, **{k: v for k, v in info.items() if k != "method"}})
    record_run(evaluation, result, version=info.get("version"))  # the version of the model evaluated
    log_metrics(
        metrics,
        {k: result.get(k) for k in ("id_val_accuracy", "id_test_accuracy", "ood_mean_accuracy")},
    )
    log_metrics(metrics, result.get("ood", {}), prefix="ood.")


def report(
    params_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    lp: Input[Artifact],
    report: Output[Artifact],
    metrics: Output[Metrics],
    ft: Optional[Input[Artifact]] = None,  # noqa: UP045
    lp_ft: Optional[Input[Artifact]] = None,  # noqa: UP045
    daft: Optional[Input[Artifact]] = None,  # noqa: UP045
    daft_bn_only: Optional[Input[Artifact]] = None,  # noqa: UP045
    daft_fast_head_only: Optional[Input[Artifact]] = None,  # noqa: UP045
):
    """components.report over every method's evaluation; it sets the `champion` alias.

    The report directory mirrors the DVC layout: ``metrics/methods/<method>.json`` and ``reports/``.
    """
    from pipelines.components import assemble_report, log_metrics, record_champion, step_setup

    params = step_setup(params_json, tracking_uri, pipeline_run_id)
    given = {"lp": lp, "ft": ft, "lp_ft": lp_ft, "daft": daft}  # one input per catalogue method:
    given.update({"daft_bn_only": daft_bn_only, "daft_fast_head_only": daft_fast_head_only})  # KFP needs
    groups = {m: [a.path] for m, a in given.items() if a is not None}  # them named (tests check the list)
    summary = assemble_report(params, groups, report.path)
    report.metadata["champion"] = summary["champion"]
    record_champion(report, summary)
    log_metrics(metrics, {"champion_id_val_accuracy": summary["champion_id_val_accuracy"]})
    log_metrics(metrics, {f"{m}.{k}": v for m, row in summary["methods"].items() for k, v in row.items()})


def select_best(
    params_json: str,
    tracking_uri: str,
    pipeline_run_id: str,
    lp: Input[Artifact],
    report: Output[Artifact],
    metrics: Output[Metrics],
    ft: Optional[Input[List[Artifact]]] = None,  # noqa: UP006, UP045
    lp_ft: Optional[Input[List[Artifact]]] = None,  # noqa: UP006, UP045
    daft: Optional[Input[List[Artifact]]] = None,  # noqa: UP006, UP045
    daft_bn_only: Optional[Input[List[Artifact]]] = None,  # noqa: UP006, UP045
    daft_fast_head_only: Optional[Input[List[Artifact]]] = None,  # noqa: UP006, UP045
):
    """The sweep's selection: per method the configuration with the best ID val accuracy gets the method's
    alias, then components.report gives the overall best (by ID val) the `champion` alias.

    ``metrics/sweep.json`` in the report directory lists every configuration tried.
    """
    from pipelines.components import assemble_report, log_metrics, record_champion, step_setup

    params = step_setup(params_json, tracking_uri, pipeline_run_id)
    given = {"ft": ft, "lp_ft": lp_ft, "daft": daft}  # one input per fine-tuned catalogue method
    given.update({"daft_bn_only": daft_bn_only, "daft_fast_head_only": daft_fast_head_only})
    groups = {"lp": [lp.path], **{m: [a.path for a in arts] for m, arts in given.items() if arts}}
    summary = assemble_report(params, groups, report.path)
    report.metadata["champion"] = summary["champion"]
    report.metadata["selected"] = summary["selected"]
    record_champion(report, summary)
    log_metrics(metrics, {"champion_id_val_accuracy": summary["champion_id_val_accuracy"]})
    log_metrics(metrics, {f"{m}.{k}": v for m, row in summary["methods"].items() for k, v in row.items()})
    log_metrics(metrics, {"configurations": len(summary["sweep"])})


COMPONENT_FUNCTIONS = (
    resolve_params,
    prepare_data,
    pretrained,
    convert_bn,
    linear_probe,
    finetune,
    evaluate,
    report,
    select_best,
)


def make_components(image: str) -> SimpleNamespace:
    """Every component bound to `image` (``base_image``), without installing kfp at run time."""
    return SimpleNamespace(
        **{
            fn.__name__: dsl.component(fn, base_image=image, install_kfp_package=False)
            for fn in COMPONENT_FUNCTIONS
        }
    )


# --------------------------------------------------------------------------------------------------
# Runtime helpers: run inside the component's container (imported by the bodies above). Plumbing only.
# --------------------------------------------------------------------------------------------------

PIPELINE_ID_ENV = "DAFT_PIPELINE_RUN_ID"


def resolve_params_json(params_json: str, overrides: Mapping[str, Any], data_root: str = "") -> str:
    """The validated tree with the pipeline parameters applied; `data_root` sets ``data.root`` unless empty
    (blank means params.yaml's, so the parameter's default changes nothing)."""
    from components.params import apply_overrides, params_from_dict, params_to_json

    overrides = dict(overrides)
    if data_root.strip():
        overrides["data.root"] = data_root.strip()
    raw = apply_overrides(json.loads(params_json), overrides)
    return params_to_json(params_from_dict(raw, "pipeline parameters"))


def step_setup(
    params_json: Any, tracking_uri: str, pipeline_run_id: str, params_file: Any = None
) -> "Params":
    """Environment for the step (tracking URI, KFP run id), logging, and the validated params.

    The params come from `params_json`, or from the `params_file` artifact (resolve_params' JSON file) when
    given (the steps inside a sweep's ParallelFor).
    """
    from components import storage
    from components.common import configure_logging
    from components.params import params_from_dict

    if pipeline_run_id and not pipeline_run_id.startswith("{{"):
        os.environ[PIPELINE_ID_ENV] = pipeline_run_id
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    configure_logging()
    storage.install()  # s3:// checkpoints through the core's URI hook
    if params_file is not None:
        return params_from_dict(json.loads(Path(params_file.path).read_text()), "params_file")
    return params_from_dict(as_mapping(params_json), "params_json")


def as_mapping(value: Any) -> dict[str, Any]:
    """A JSON-string parameter as a dict (also accepts one already parsed: kfp.local's loop handling may
    substitute parsed JSON values; a cluster passes the string)."""
    if isinstance(value, Mapping):
        return dict(value)
    return json.loads(value or "{}")


def method_lrs(
    method: str, learning_rates: Mapping[str, Any] | None, **point: float | None
) -> dict[str, Any]:
    """`method`'s learning rates from the `learning_rates` parameter, then a sweep point's on top."""
    from components.params import ParamsError

    entry = dict((learning_rates or {}).get(method) or {})
    unknown = sorted(set(entry) - {"lr", "head_lr", "backbone_lr"})
    if unknown:
        raise ParamsError(f"learning_rates.{method}: unknown key(s) {unknown}; use lr, head_lr, backbone_lr")
    if any(v is not None for v in point.values()):
        entry = {
            "lr": point.get("lr"),
            "head_lr": point.get("head_lr"),
            "backbone_lr": point.get("backbone_lr"),
        }
    return entry


def annotate_model(
    model: Any,
    params: "Params",
    stage: str,
    method: str | None = None,
    version: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    model.metadata.update({"stage": stage, "registered_model": params.pipeline.registered_model})
    if method:
        model.metadata["method"] = method
    if version:
        model.metadata["registered_version"] = version
    for k, v in (extra or {}).items():
        if isinstance(v, str | int | float | bool):
            model.metadata[k] = v


RUN_FIELDS = ("mlflow_run_id", "mlflow_run_url")


def record_run(artifact: Any, result: Mapping[str, Any], version: Any = None) -> None:
    """The step's MLflow run (``mlflow_run_id``, ``mlflow_run_url``: from its result, else the run the step
    just started in this process) and the registered version, when there is one, in `artifact`'s metadata.
    Nothing when tracking is off; the URL only for a tracking server (credentials removed)."""
    from components.tracking import last_run

    fallback = last_run()
    for key in RUN_FIELDS:
        value = result.get(key) if key in result else fallback.get(key)
        if value:
            artifact.metadata[key] = str(value)
    if version:
        artifact.metadata["registered_version"] = str(version)


def record_champion(report: Any, summary: Mapping[str, Any]) -> None:
    """The report step's run, the champion's registered version (``registered_version`` and
    ``champion_version``) or, when it has none, ``champion_note`` (why), in the report's metadata."""
    record_run(report, summary, version=summary.get("champion_version"))
    if summary.get("champion_version"):
        report.metadata["champion_version"] = str(summary["champion_version"])
    if summary.get("champion_note"):
        report.metadata["champion_note"] = str(summary["champion_note"])


def _flat_numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat_numbers(v, key + "."))
        elif isinstance(v, int | float):  # bool included
            out[key] = float(v)
    return out


def log_metrics(metrics: Any, values: Mapping[str, Any], prefix: str = "") -> None:
    """Numeric values (nested mappings flattened with dots) onto a KFP Metrics artifact."""
    for k, v in _flat_numbers(values, prefix).items():
        metrics.log_metric(k, v)


def assemble_report(params: "Params", groups: Mapping[str, list[str]], out_dir: str) -> dict[str, Any]:
    """Select per method the best evaluation by ID val, then run components.report on the selection.

    `groups`: method -> evaluation directories (one per configuration; one when there is no sweep). The
    selected configuration's registered version gets the method's alias (the sweep points each moved it),
    so components.report's `champion` lands on the selected version. Writes ``metrics/methods/`` (the
    selection, as DVC's layout), ``metrics/sweep.json`` (every configuration) and ``reports/``.

    With tracking on, a local store in a pod fails at once (``TrackingError``), and a selected configuration
    whose version cannot get the alias (none recorded, or not in the registry) is a WARNING, not a failure:
    the report then records ``champion_version: null`` and a ``champion_note`` if that method wins, and the
    summary lists such methods under ``selection_notes``.
    """
    from components import report as report_step
    from components import tracking
    from components.common import read_json, write_json
    from daft_core.selection import select_best

    if params.pipeline.tracking:
        tracking.require_durable_store()  # before any work: a pod's own store lacks every logged version
    out = Path(out_dir)
    methods_dir = out / "metrics" / "methods"
    methods_dir.mkdir(parents=True, exist_ok=True)
    unavailable: dict[str, str] = {}  # method -> why its selected version did not get the method's alias
    sweep: list[dict[str, Any]] = []
    selected: dict[str, dict[str, Any]] = {}
    for method, dirs in groups.items():
        candidates = []
        for d in dirs:
            row = read_json(Path(d) / f"{method}.json")
            info_path = Path(d) / "finetune.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            entry = {
                "method": method,
                "id_val_accuracy": row["id_val_accuracy"],
                "id_test_accuracy": row["id_test_accuracy"],
                "ood_mean_accuracy": row.get("ood_mean_accuracy"),
                **{k: info[k] for k in ("head_lr", "backbone_lr", "version") if k in info},
            }
            sweep.append(entry)
            candidates.append((entry, Path(d)))
        best = select_best([entry for entry, _ in candidates])
        best_dir = next(d for entry, d in candidates if entry is best)
        selected[method] = best
        shutil.copy2(best_dir / f"{method}.json", methods_dir / f"{method}.json")
        details = best_dir / f"{method}.details.json"
        if details.is_file():
            shutil.copy2(details, methods_dir / details.name)
        version = best.get("version")
        if params.pipeline.tracking and len(candidates) > 1:
            why = _move_alias(params, method, version)
            if why is None:
                log.info("sweep: %s selected %s (version %s)", method, best, version)
            else:
                unavailable[method] = why
                log.warning("sweep: %s selected %s, but its alias was not moved: %s", method, best, why)
    write_json(out / "metrics" / "sweep.json", sweep)
    summary = report_step.run(params, methods_dir, out / "reports", unavailable=unavailable)
    if unavailable:
        summary["selection_notes"] = dict(unavailable)
    summary["sweep"] = sweep
    summary["selected"] = json.dumps(selected, sort_keys=True)
    return summary


MISSING_VERSION_CODES = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def _move_alias(params: "Params", method: str, version: Any) -> str | None:
    """Point `method`'s alias at the selected `version`; None when done, else why it could not be."""
    from mlflow.exceptions import MlflowException

    from components import tracking
    from components.tracking.retries import redact_uri
    from daft_core.methods import alias_for

    name = params.pipeline.registered_model
    if not version:
        return "the selected configuration has no registered version (its finetune step was not tracked)"
    try:
        tracking.set_alias(name, alias_for(method), version)
    except MlflowException as err:
        if err.error_code not in MISSING_VERSION_CODES:
            raise
        where = redact_uri(tracking.tracking_uri())
        return f"version {version} of {name} is not in the model registry at {where} ({err.error_code})"
    return None
