"""KFP v2 lightweight components: thin wrappers that call ``components.<step>.run``.

Each component function below is self-contained (every import inside its body), as KFP ships the function's
source to the container and runs it there with ``python -m kfp.dsl.executor_main``. The bodies import the
project (``components.*`` for the step, and the small runtime helpers at the bottom of this module), which
the project image has installed; no stage logic lives here.

Conventions
    * ``params_json``: the step's own slice of the validated parameter tree (:data:`STEP_PARAMS`: the
      sections it reads, plus ``pipeline``; the others keep their defaults), produced once per run by
      :func:`resolve_params` from params.yaml plus the pipeline parameters. A step's inputs are its cache
      key, so a change elsewhere in params.yaml does not re-run it.
    * ``tracking_uri`` -> ``MLFLOW_TRACKING_URI`` (empty: keep the pod's environment / the components'
      default). The KFP run id is no input: it arrives as the environment variable ``DAFT_PIPELINE_RUN_ID``
      (from the pod's ``pipeline/runid`` label on a cluster, set by ``run-local`` here), so every step's
      MLflow run hangs under one parent run. Credentials never travel as parameters: they come from
      Kubernetes secrets as environment variables (see pipelines.pipeline).
    * ``DAFT_EXPECT_GPU=1`` (set on the tasks given a GPU): :func:`step_setup` fails at once when torch
      finds no CUDA device, instead of training on the CPU for hours.
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
from typing import TYPE_CHECKING, Any, List, NamedTuple, Optional  # noqa: UP035  (KFP parses typing forms)

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

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
) -> NamedTuple(  # inline: KFP ships this function's source alone
    "StepParams",
    [
        ("prepare_data", str),
        ("pretrained", str),
        ("convert_bn", str),
        ("linear_probe", str),
        ("finetune", str),
        ("wise_ft", str),
        ("evaluate", str),
        ("report", str),
    ],
):
    """Validate params.yaml's tree with the pipeline parameters applied; hand each step its own sections.

    `data_root` (a path in the pod, e.g. on a mounted PVC, or ``s3://bucket/prefix``) replaces
    ``data.root``; empty keeps params.yaml's. Returns one JSON string per step (an output named after the
    step: the step's sections of :data:`STEP_PARAMS` plus ``pipeline``), the ``params_json`` of that step, so
    a step's input changes only when what it reads changes (the cache key). Also writes them, step -> tree,
    to `params` (a JSON file) for the steps inside a sweep's ParallelFor (see pipelines.pipeline: kfp.local
    cannot pass a task's output parameter into a loop).
    """
    import json

    from pipelines.components import resolve_params_json, split_params

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
    parts = split_params(resolved)  # step -> its sections as JSON, in STEP_PARAMS' (the outputs') order
    with open(params.path, "w") as f:
        json.dump({step: json.loads(text) for step, text in parts.items()}, f, sort_keys=True)
    return tuple(parts.values())


def prepare_data(
    params_json: str,
    tracking_uri: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
):
    """components.prepare_data: the prepared DatasetBundle directory."""
    from components import prepare_data as step
    from pipelines.components import log_metrics, record_run, step_setup

    params = step_setup("prepare_data", params_json, tracking_uri)
    result = step.run(params, dataset.path)
    dataset.metadata["preset"] = params.data.preset
    record_run(dataset, result)
    log_metrics(metrics, result["counts"], prefix="count.")


def pretrained(
    params_json: str,
    tracking_uri: str,
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """components.pretrained: the verified backbone checkpoint every branch starts from."""
    from components import pretrained as step
    from pipelines.components import annotate_model, log_metrics, record_run, step_setup

    params = step_setup("pretrained", params_json, tracking_uri)
    info = step.run(params, dataset.path, model.path)
    annotate_model(model, params, "pretrained")
    record_run(model, info, version=info.get("registered_version"))
    log_metrics(metrics, {k: info[k] for k in ("batchnorm_layers", "parameters", "num_features")})


def convert_bn(
    params_json: str,
    tracking_uri: str,
    dataset: Input[Dataset],
    pretrained: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """components.convert_bn: DAFT's function-preserving BatchNorm conversion."""
    from components import convert_bn as step
    from pipelines.components import annotate_model, log_metrics, record_run, step_setup

    params = step_setup("convert_bn", params_json, tracking_uri)
    summary = step.run(params, pretrained.path, dataset.path, model.path)
    annotate_model(model, params, "bn_converted")
    record_run(model, summary, version=summary.get("registered_version"))
    log_metrics(metrics, summary)


def linear_probe(
    params_json: str,
    tracking_uri: str,
    dataset: Input[Dataset],
    pretrained: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """components.linear_probe: features once, logistic-regression C sweep on ID val."""
    from components import linear_probe as step
    from pipelines.components import annotate_model, log_metrics, record_run, step_setup

    params = step_setup("linear_probe", params_json, tracking_uri)
    summary = step.run(params, pretrained.path, dataset.path, model.path)
    annotate_model(model, params, "linear_probe")
    record_run(model, summary, version=summary.get("registered_version"))
    log_metrics(metrics, summary)


def finetune(
    tracking_uri: str,
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

    params = step_setup("finetune", params_json, tracking_uri, params_file)
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


def finetune_trainjob(
    tracking_uri: str,
    method: str,
    dataset: Input[Dataset],
    start: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    trainjob_json: str,
    params_json: str = "",
    params_file: Optional[Input[Artifact]] = None,  # noqa: UP045
    learning_rates: Optional[dict] = None,  # noqa: UP045
    lr: Optional[float] = None,  # noqa: UP045
    head_lr: Optional[float] = None,  # noqa: UP045
    backbone_lr: Optional[float] = None,  # noqa: UP045
) -> str:
    """finetune's contract (inputs, `model`, `metrics`, the JSON it returns), the training run as a
    distributed Kubeflow Trainer TrainJob (`trainjob_json`: pipelines.trainjob.TrainJobConfig) that this
    task launches, waits for, and whose model it downloads into `model`."""
    import json

    from pipelines.components import annotate_model, log_metrics, method_lrs, record_run, step_setup
    from pipelines.trainjob import TrainJobConfig, run_launcher

    params = step_setup("finetune", params_json, tracking_uri, params_file)
    lrs = method_lrs(method, learning_rates, lr=lr, head_lr=head_lr, backbone_lr=backbone_lr)
    params = params.with_method_lrs(method, **lrs)
    config = TrainJobConfig.from_json(trainjob_json)
    summary = run_launcher(config, params, method, dataset.path, start.path, model.path, tracking_uri)
    version = summary.get("registered_version") or ""
    info = {
        "method": method,
        "head_lr": summary["head_lr"],
        "backbone_lr": summary["backbone_lr"],
        "version": version,
        "best_val_accuracy": summary.get("best_val_accuracy"),
    }
    extra = {**info, "trainjob": summary["trainjob"], "nodes": config.nodes, "gpus": config.gpus_per_node}
    annotate_model(model, params, "finetune", method=method, version=version, extra=extra)
    record_run(model, summary, version=version)
    keys = ("best_epoch", "best_val_accuracy", "epochs")
    log_metrics(metrics, {k: summary[k] for k in keys if k in summary})
    return json.dumps(info, sort_keys=True)


def wise_ft(
    params_json: str,
    tracking_uri: str,
    method: str,
    dataset: Input[Dataset],
    finetuned: Input[Model],
    start: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """components.wise_ft for one method: its fine-tuned model mixed with the model its branch started
    from, α chosen on ID val. Returns a JSON string (the WiSE-FT row's name, α, registered version) that
    the evaluate step carries to the report, as finetune's does."""
    import json

    from components import wise_ft as step
    from pipelines.components import annotate_model, log_metrics, record_run, step_setup

    params = step_setup("wise_ft", params_json, tracking_uri)
    summary = step.run(params, method, finetuned.path, start.path, dataset.path, model.path)
    version = summary.get("registered_version") or ""
    info = {
        "method": summary["wise_method"],
        "alpha": summary["alpha"],
        "version": version,
        "best_val_accuracy": summary["val_accuracy"],
    }
    annotate_model(model, params, "wise_ft", method=summary["wise_method"], version=version, extra=info)
    record_run(model, summary, version=version)
    log_metrics(metrics, {"alpha": summary["alpha"], "val_accuracy": summary["val_accuracy"]})
    return json.dumps(info, sort_keys=True)


def evaluate(
    tracking_uri: str,
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

    params = step_setup("evaluate", params_json, tracking_uri, params_file)
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
    lp: Input[Artifact],
    report: Output[Artifact],
    metrics: Output[Metrics],
    report_md: Output[Markdown],
    confusion_matrix: Output[ClassificationMetrics],
    ft: Optional[Input[Artifact]] = None,  # noqa: UP045
    lp_ft: Optional[Input[Artifact]] = None,  # noqa: UP045
    daft: Optional[Input[Artifact]] = None,  # noqa: UP045
    daft_bn_only: Optional[Input[Artifact]] = None,  # noqa: UP045
    daft_fast_head_only: Optional[Input[Artifact]] = None,  # noqa: UP045
    wise_ft_ft: Optional[Input[Artifact]] = None,  # noqa: UP045
    wise_ft_lp_ft: Optional[Input[Artifact]] = None,  # noqa: UP045
    wise_ft_daft: Optional[Input[Artifact]] = None,  # noqa: UP045
    wise_ft_daft_bn_only: Optional[Input[Artifact]] = None,  # noqa: UP045
    wise_ft_daft_fast_head_only: Optional[Input[Artifact]] = None,  # noqa: UP045
):
    """components.report over every method's evaluation; it sets the `champion` alias.

    The report directory mirrors the DVC layout: ``metrics/methods/<method>.json`` and ``reports/``. For the
    KFP UI: `report_md` (the table and plots), `confusion_matrix` (the champion's, on ID test) and `metrics`
    (each method's accuracy on every set).
    """
    from pipelines.components import finish_report, step_setup

    params = step_setup("report", params_json, tracking_uri)
    given = {"lp": lp, "ft": ft, "lp_ft": lp_ft, "daft": daft}  # one input per catalogue method:
    given.update({"daft_bn_only": daft_bn_only, "daft_fast_head_only": daft_fast_head_only})  # KFP needs
    given.update({"wise_ft_ft": wise_ft_ft, "wise_ft_lp_ft": wise_ft_lp_ft, "wise_ft_daft": wise_ft_daft})
    given.update({"wise_ft_daft_bn_only": wise_ft_daft_bn_only})  # WiSE-FT rows: one per fine-tuned method
    given.update({"wise_ft_daft_fast_head_only": wise_ft_daft_fast_head_only})
    groups = {m: [a.path] for m, a in given.items() if a is not None}  # them named (tests check the list)
    finish_report(params, groups, report, metrics, report_md, confusion_matrix)


def select_best(
    params_json: str,
    tracking_uri: str,
    lp: Input[Artifact],
    report: Output[Artifact],
    metrics: Output[Metrics],
    report_md: Output[Markdown],
    confusion_matrix: Output[ClassificationMetrics],
    ft: Optional[Input[List[Artifact]]] = None,  # noqa: UP006, UP045
    lp_ft: Optional[Input[List[Artifact]]] = None,  # noqa: UP006, UP045
    daft: Optional[Input[List[Artifact]]] = None,  # noqa: UP006, UP045
    daft_bn_only: Optional[Input[List[Artifact]]] = None,  # noqa: UP006, UP045
    daft_fast_head_only: Optional[Input[List[Artifact]]] = None,  # noqa: UP006, UP045
):
    """The sweep's selection: per method the configuration with the best ID val accuracy gets the method's
    alias, then components.report gives the overall best (by ID val) the `champion` alias.

    ``metrics/sweep.json`` in the report directory lists every configuration tried. `report_md`,
    `confusion_matrix` and `metrics` as in :func:`report`.
    """
    from pipelines.components import finish_report, log_metrics, step_setup

    params = step_setup("report", params_json, tracking_uri)
    given = {"ft": ft, "lp_ft": lp_ft, "daft": daft}  # one input per fine-tuned catalogue method
    given.update({"daft_bn_only": daft_bn_only, "daft_fast_head_only": daft_fast_head_only})
    groups = {"lp": [lp.path], **{m: [a.path for a in arts] for m, arts in given.items() if arts}}
    summary = finish_report(params, groups, report, metrics, report_md, confusion_matrix)
    report.metadata["selected"] = summary["selected"]
    log_metrics(metrics, {"configurations": len(summary["sweep"])})


COMPONENT_FUNCTIONS = (
    resolve_params,
    prepare_data,
    pretrained,
    convert_bn,
    linear_probe,
    finetune,
    finetune_trainjob,
    wise_ft,
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

PIPELINE_ID_ENV = "DAFT_PIPELINE_RUN_ID"  # the KFP run id (pod label pipeline/runid; run-local sets it)
EXPECT_GPU_ENV = "DAFT_EXPECT_GPU"  # "1" on the tasks given a GPU
NODE_NAME_ENV = "DAFT_NODE_NAME"  # the pod's node (spec.nodeName), on the tasks given a GPU

# Each step's params: the sections (or single keys) its run() reads, as dvc.yaml lists them, plus what the
# step reads besides (pretrained seeds its init with finetune.seed, convert_bn runs on finetune.device,
# finetune evaluates each epoch with evaluate.batch_size, and every model-producing step describes its
# registered version with `model` and `data`: components.publish). Reading `model` / `data` costs no cache
# hit: a change there re-runs pretrained / prepare_data, whose new artifacts re-run every step below.
# Every step also gets COMMON_PARAMS. Order = the outputs of resolve_params.
# tests/pipelines/test_cache.py checks this against dvc.yaml and against what the code reads.
STEP_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare_data": ("data",),
    "pretrained": ("model", "data", "finetune.seed"),
    "convert_bn": ("convert_bn", "model", "data", "finetune.device"),
    "linear_probe": ("linear_probe", "model", "data"),
    "finetune": ("finetune", "evaluate.batch_size", "model", "data"),
    # WiSE-FT scores each α on ID val with evaluate's settings; finetune.methods: each branch's start
    "wise_ft": ("wise_ft", "finetune.methods", "evaluate", "model", "data"),
    "evaluate": ("evaluate",),
    "report": (),  # also select_best
}
COMMON_PARAMS = ("pipeline",)  # tracking, experiment, registered model: every step


def resolve_params_json(params_json: str, overrides: Mapping[str, Any], data_root: str = "") -> str:
    """The validated tree with the pipeline parameters applied; `data_root` sets ``data.root`` unless empty
    (blank means params.yaml's, so the parameter's default changes nothing)."""
    from components.params import apply_overrides, params_from_dict, params_to_json

    overrides = dict(overrides)
    if data_root.strip():
        overrides["data.root"] = data_root.strip()
    raw = apply_overrides(json.loads(params_json), overrides)
    return params_to_json(params_from_dict(raw, "pipeline parameters"))


def step_tree(tree: Mapping[str, Any], step: str) -> dict[str, Any]:
    """`step`'s slice of a params tree: its :data:`STEP_PARAMS` (whole sections or single keys) plus
    :data:`COMMON_PARAMS`; the other sections are left out (the step validates them to their defaults)."""
    out: dict[str, Any] = {}
    for dotted in (*COMMON_PARAMS, *STEP_PARAMS[step]):
        *parents, leaf = dotted.split(".")
        src, dst = tree, out
        for part in parents:
            src, dst = src.get(part, {}), dst.setdefault(part, {})
        if leaf in src:
            dst[leaf] = src[leaf]
    return out


def split_params(resolved_json: str) -> dict[str, str]:
    """Step -> its slice of the resolved tree (:func:`step_tree`) as canonical JSON, in STEP_PARAMS' order."""
    tree = json.loads(resolved_json)
    return {step: json.dumps(step_tree(tree, step), sort_keys=True) for step in STEP_PARAMS}


def step_setup(step: str, params_json: Any, tracking_uri: str, params_file: Any = None) -> "Params":
    """Environment for the step (tracking URI), logging, the GPU check, and the validated params.

    The params come from `params_json` (the step's slice of the tree, or a whole tree), or from the
    `params_file` artifact (resolve_params' JSON file: step -> slice) when given (the steps inside a sweep's
    ParallelFor). The KFP run id is read from ``DAFT_PIPELINE_RUN_ID`` by the tracking code; without it (a
    backend that does not label its pods ``pipeline/runid``) each step would start its own MLflow parent run,
    so a pod without it logs a WARNING. With ``DAFT_EXPECT_GPU=1`` and no CUDA device, DeviceError.
    """
    from components import storage
    from components.common import configure_logging
    from components.params import params_from_dict

    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    configure_logging()
    require_gpu_if_expected()
    if not os.environ.get(PIPELINE_ID_ENV, "").strip() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.warning(
            "%s is empty: this Kubeflow Pipelines backend did not give the pod's pipeline/runid label to the "
            "step (see docs/kubeflow.md, minimum backend), so its MLflow run gets a parent run of its own",
            PIPELINE_ID_ENV,
        )
    storage.install()  # s3:// checkpoints through the core's URI hook
    if params_file is not None:
        trees = json.loads(Path(params_file.path).read_text())
        return params_from_dict(trees[step], f"params_file ({step})")
    return params_from_dict(as_mapping(params_json), f"params_json ({step})")


def require_gpu_if_expected() -> None:
    """DeviceError (one line) when this task was given a GPU (``DAFT_EXPECT_GPU=1``) and torch sees none."""
    if os.environ.get(EXPECT_GPU_ENV, "").strip() != "1":
        return
    import torch

    from daft_core.errors import DeviceError

    if torch.cuda.is_available():
        return
    node = os.environ.get(NODE_NAME_ENV) or os.environ.get("HOSTNAME") or "this node"
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "unset")
    raise DeviceError(
        f"this step was given a GPU ({EXPECT_GPU_ENV}=1) but torch {torch.__version__} ({build}) finds no "
        f"CUDA device on node {node} (NVIDIA_VISIBLE_DEVICES={visible}). Check: the image is the CUDA build "
        "(TORCH_VARIANT=cuda, tag -cuda), the node has the NVIDIA driver and device plugin (nvidia-smi on "
        "the node; kubectl describe node: nvidia.com/gpu allocatable), and the pod got the GPU resource"
    )


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


def finish_report(
    params: "Params",
    groups: Mapping[str, list[str]],
    report: Any,
    metrics: Any,
    report_md: Any,
    confusion_matrix: Any,
) -> dict[str, Any]:
    """What report and select_best share: select and report (`assemble_report`), then the champion in the
    artifact's metadata, the KFP UI artifacts and every method's numbers on `metrics`."""
    summary = assemble_report(params, groups, report.path)
    report.metadata["champion"] = summary["champion"]
    record_champion(report, summary)
    publish_report_ui(report.path, summary, report_md, confusion_matrix)
    log_metrics(metrics, {"champion_id_val_accuracy": summary["champion_id_val_accuracy"]})
    log_metrics(metrics, {f"{m}.{k}": v for m, row in summary["methods"].items() for k, v in row.items()})
    return summary


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


# The report's plots in the Markdown artifact, in this order, with their captions.
REPORT_PLOTS = {
    "id_vs_ood.png": "ID vs OOD accuracy",
    "ood_accuracy.png": "Accuracy per set",
    "distortion.png": "Feature distortion",
}
MAX_CONFUSION_CLASSES = 100  # more would not be readable in the KFP UI (and bloats its metadata store)


def report_markdown(out_dir: str, summary: Mapping[str, Any]) -> str:
    """The report as one Markdown document for the KFP UI: the champion, ``reports/table.md`` and the plots
    embedded as base64 PNG data URIs (the UI shows the artifact's file alone; no links to other files)."""
    import base64

    reports = Path(out_dir) / "reports"
    champion = summary["champion"]
    line = f"**Champion: `{champion}`** (ID val {100 * summary['champion_id_val_accuracy']:.2f}%)"
    if summary.get("champion_version"):
        line += f", registered version {summary['champion_version']} (alias `champion`)"
    parts = ["# DAFT report", "", line + ".", ""]
    if summary.get("champion_note"):
        parts += [f"> {summary['champion_note']}", ""]
    parts += ["## Accuracy (%) and feature distortion", "", (reports / "table.md").read_text().strip(), ""]
    sweep = summary.get("sweep") or []
    if len(sweep) > len(summary.get("methods") or {}):
        n = len(sweep)
        parts += [f"Sweep: {n} configurations (`metrics/sweep.json`); the table has each method's best.", ""]
    for png, title in REPORT_PLOTS.items():
        path = reports / png
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts += [f"## {title}", "", f"![{title}](data:image/png;base64,{data})", ""]
    return "\n".join(parts)


def champion_confusion(out_dir: str, champion: str) -> tuple[list[str], list[list[int]]] | None:
    """The champion's confusion matrix on ID test (classes, rows: true, columns: predicted), from its
    evaluation details (``metrics/methods/<champion>.details.json``); None when they have none."""
    details = Path(out_dir) / "metrics" / "methods" / f"{champion}.details.json"
    if not details.is_file():
        return None
    cm = ((json.loads(details.read_text()).get("sets") or {}).get("id_test") or {}).get("confusion_matrix")
    if not isinstance(cm, Mapping) or not cm.get("classes"):
        return None
    return [str(c) for c in cm["classes"]], [[int(v) for v in row] for row in cm["matrix"]]


def publish_report_ui(out_dir: str, summary: Mapping[str, Any], report_md: Any, confusion: Any) -> None:
    """The report's KFP UI artifacts: `report_md` (:func:`report_markdown`) and, on `confusion` (a
    ClassificationMetrics), the champion's confusion matrix on ID test (:func:`champion_confusion`)."""
    md = Path(report_md.path)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(report_markdown(out_dir, summary), encoding="utf-8")
    champion = summary["champion"]
    found = champion_confusion(out_dir, champion)
    why = None
    if found is None:
        why = f"no confusion matrix in {champion}'s evaluation details"
    elif len(found[0]) > MAX_CONFUSION_CLASSES:
        why = f"{len(found[0])} classes (more than {MAX_CONFUSION_CLASSES}): see {champion}.details.json"
    confusion.metadata.update({"method": champion, "set": "id_test"})
    if why is not None:
        log.warning("confusion matrix not logged: %s", why)
        confusion.metadata["note"] = why
        return
    assert found is not None
    confusion.log_confusion_matrix(*found)


def _move_alias(params: "Params", method: str, version: Any) -> str | None:
    """Point `method`'s alias at the selected `version`; None when done, else why it could not be."""
    from components import tracking
    from components.tracking.retries import redact_uri
    from daft_core.methods import alias_for

    name = params.pipeline.registered_model
    if not version:
        return "the selected configuration has no registered version (its finetune step was not tracked)"
    missing = tracking.try_set_alias(name, alias_for(method), version)
    if missing is None:
        return None
    where = redact_uri(tracking.tracking_uri())
    return f"version {version} of {name} is not in the model registry at {where} ({missing})"
