"""The DAFT pipeline for Kubeflow: the same DAG as dvc.yaml, built from params.yaml.

::

    resolve_params -> prepare_data -> pretrained ─┬─> convert_bn ───> finetune[daft]  ─> evaluate[daft]  ─┐
                                                  ├─> linear_probe ─> finetune[lp_ft] ─> evaluate[lp_ft] ─┤
                                                  │               └─────────────────> evaluate[lp]    ─┼─>
                                                  └───────────────> finetune[ft]    ─> evaluate[ft]    ─┘
                                                                                                  report

One branch per entry of ``finetune.methods`` (its ``start`` picks the upstream model), as DVC's ``foreach``.
With ``sweep=True`` every branch is a ``dsl.ParallelFor`` over learning rates (the paper's protocol: head lr
x backbone lr for DAFT, one lr for FT / LP-FT), each point fine-tuned and evaluated, the evaluations
``dsl.Collected`` into ``select_best``, which picks the best ID val per method and overall (``champion``).

Pipeline parameters default to params.yaml: ``params_json`` (the whole tree) plus the usual knobs
(``epochs``, ``seed``, the methods' learning rates or sweep lists, the MLflow experiment / registered model /
tracking switch and ``tracking_uri``). The signature is built from the params file, so a method that is not
configured has no parameters.

Platform settings come from :class:`PipelineOptions`: per-step CPU / memory requests and limits, a GPU for
the steps in ``gpu_steps`` (fine-tuning and feature extraction), retries with exponential back-off, caching
(on by default) and Kubernetes secrets as environment variables (kfp-kubernetes). ``local=True`` leaves out
what only a cluster can honour (resources, accelerators, secrets, node selectors); see docs/kubeflow.md.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kfp import dsl, kubernetes

from pipelines import DEFAULT_IMAGE
from pipelines.components import make_components

if TYPE_CHECKING:
    from components.params import Params

PIPELINE_NAME = "daft"
SWEEP_PIPELINE_NAME = "daft-sweep"

# Step -> resources. Keys: cpu / memory (requests), cpu_limit / memory_limit. "default" fills the gaps.
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "default": {"cpu": "1", "memory": "2Gi", "cpu_limit": "2", "memory_limit": "4Gi"},
    "resolve_params": {"cpu": "100m", "memory": "256Mi", "cpu_limit": "500m", "memory_limit": "512Mi"},
    "prepare_data": {"cpu": "1", "memory": "2Gi", "cpu_limit": "2", "memory_limit": "4Gi"},
    "pretrained": {"cpu": "1", "memory": "2Gi", "cpu_limit": "2", "memory_limit": "4Gi"},
    "convert_bn": {"cpu": "2", "memory": "4Gi", "cpu_limit": "4", "memory_limit": "8Gi"},
    "linear_probe": {"cpu": "2", "memory": "4Gi", "cpu_limit": "4", "memory_limit": "8Gi"},
    "finetune": {"cpu": "4", "memory": "8Gi", "cpu_limit": "8", "memory_limit": "16Gi"},
    "evaluate": {"cpu": "2", "memory": "4Gi", "cpu_limit": "4", "memory_limit": "8Gi"},
    "report": {"cpu": "500m", "memory": "1Gi", "cpu_limit": "1", "memory_limit": "2Gi"},
    "select_best": {"cpu": "500m", "memory": "1Gi", "cpu_limit": "1", "memory_limit": "2Gi"},
}
# Fine-tuning and feature extraction (the probe's features) get a GPU.
DEFAULT_GPU_STEPS = ("finetune", "linear_probe")
DEFAULT_GPU_TYPE = "nvidia.com/gpu"
# Secret name -> {secret key: environment variable}. Never pipeline parameters.
DEFAULT_SECRETS: dict[str, dict[str, str]] = {
    "daft-s3-credentials": {
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    },
    "daft-mlflow-credentials": {
        "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
    },
}
# The paper's protocol: one lr for FT / LP-FT; head lr (0.1-10) x backbone lr (1e-6-1e-4) for DAFT.
DEFAULT_SWEEP: dict[str, Any] = {
    "ft": [1e-3, 3e-3, 1e-2, 3e-2],
    "lp_ft": [1e-4, 3e-4, 1e-3, 3e-3],
    "daft": {"head_lr": [0.1, 1.0, 10.0], "backbone_lr": [1e-6, 1e-5, 1e-4]},
}
# How each method is swept: "lr" (one lr for both groups, a list of floats) or "grid" (head x backbone).
SWEEP_KIND = {"ft": "lr", "lp_ft": "lr", "daft_bn_only": "lr", "daft": "grid", "daft_fast_head_only": "grid"}
NO_SECRET_STEPS = ("resolve_params",)  # validates parameters only: no credentials in its pod


@dataclass(frozen=True)
class PipelineOptions:
    """Compile-time options (the image, platform settings, the sweep); see docs/kubeflow.md."""

    image: str = DEFAULT_IMAGE
    sweep: bool = False
    sweep_grid: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_SWEEP))
    sweep_parallelism: int = 0  # 0: all points at once
    tracking_uri: str = ""  # default of the `tracking_uri` pipeline parameter
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    gpu: bool = True
    gpu_type: str = DEFAULT_GPU_TYPE
    gpu_count: int = 1
    gpu_steps: Sequence[str] = DEFAULT_GPU_STEPS
    gpu_node_selector: Mapping[str, str] = field(default_factory=dict)
    retries: int = 2
    backoff_duration: str = "30s"
    backoff_factor: float = 2.0
    backoff_max_duration: str = "600s"
    caching: bool = True
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: dict(DEFAULT_SECRETS))
    secrets_optional: bool = False
    local: bool = False  # kfp.local: leave out resources, accelerators, secrets and node selectors


def merge_resources(overrides: Mapping[str, Mapping[str, str]] | None) -> dict[str, dict[str, str]]:
    """DEFAULT_RESOURCES with `overrides` (step -> {cpu, memory, cpu_limit, memory_limit}) merged in."""
    out = {k: dict(v) for k, v in DEFAULT_RESOURCES.items()}
    allowed = {"cpu", "memory", "cpu_limit", "memory_limit"}
    for step, values in (overrides or {}).items():
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"resources.{step}: unknown key(s) {sorted(unknown)}; known: {sorted(allowed)}")
        out.setdefault(step, {}).update({k: str(v) for k, v in values.items()})
    return out


def step_resources(opts: PipelineOptions, step: str) -> dict[str, str]:
    return {**opts.resources.get("default", {}), **opts.resources.get(step, {})}


def configure_task(task: dsl.PipelineTask, step: str, opts: PipelineOptions) -> dsl.PipelineTask:
    """Caching, retries and (on a cluster) resources, GPU and secrets for one task."""
    task.set_caching_options(opts.caching)
    if opts.retries > 0:
        task.set_retry(
            num_retries=opts.retries,
            backoff_duration=opts.backoff_duration,
            backoff_factor=opts.backoff_factor,
            backoff_max_duration=opts.backoff_max_duration,
        )
    if opts.local:
        return task
    res = step_resources(opts, step)
    if res.get("cpu"):
        task.set_cpu_request(res["cpu"])
    if res.get("cpu_limit"):
        task.set_cpu_limit(res["cpu_limit"])
    if res.get("memory"):
        task.set_memory_request(res["memory"])
    if res.get("memory_limit"):
        task.set_memory_limit(res["memory_limit"])
    if opts.gpu and step in opts.gpu_steps and opts.gpu_count > 0:
        task.set_accelerator_type(opts.gpu_type).set_accelerator_limit(opts.gpu_count)
        for key, value in opts.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
    if step not in NO_SECRET_STEPS:
        for name, keys in opts.secrets.items():
            kubernetes.use_secret_as_env(task, name, dict(keys), optional=opts.secrets_optional)
    return task


# --------------------------------------------------------------------------------------------------
# Pipeline parameters (from params.yaml)
# --------------------------------------------------------------------------------------------------


def _param(name: str, annotation: type, default: Any) -> inspect.Parameter:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Parameter(name, kind, default=default, annotation=annotation)


def method_lr_parameters(params: Params) -> dict[str, tuple[str, str]]:
    """Pipeline parameter -> (method, "lr" | "head_lr" | "backbone_lr") for each value params.yaml sets."""
    out: dict[str, tuple[str, str]] = {}
    for method, m in params.finetune.methods.items():
        for attr in ("lr", "head_lr", "backbone_lr"):
            if getattr(m, attr) is not None:
                out[f"{method}_{attr}"] = (method, attr)
    return out


def sweep_points(params: Params, method: str, grid: Mapping[str, Any]) -> list[Any]:
    """The sweep list for `method`: from `grid` (DEFAULT_SWEEP by default), else the configured lrs."""
    kind = SWEEP_KIND.get(method, "grid")
    spec = grid.get(method)
    if spec is None:  # not swept: its configured (or recipe default) learning rates, one point
        from components.finetune import recipe_for

        recipe = recipe_for(params, method)
        if kind == "lr":
            spec = [recipe.head_lr]
        else:
            spec = {"head_lr": [recipe.head_lr], "backbone_lr": [recipe.backbone_lr]}
    if kind == "lr":
        if not isinstance(spec, list | tuple) or not spec:
            raise ValueError(f"sweep for {method!r} must be a non-empty list of learning rates, got {spec!r}")
        return [float(x) for x in spec]
    if isinstance(spec, Mapping):
        heads, backs = list(spec.get("head_lr") or []), list(spec.get("backbone_lr") or [])
        if not heads or not backs:
            raise ValueError(f"sweep for {method!r} needs non-empty head_lr and backbone_lr lists")
        return [{"head_lr": float(h), "backbone_lr": float(b)} for h, b in itertools.product(heads, backs)]
    if isinstance(spec, list | tuple) and spec and all(isinstance(p, Mapping) for p in spec):
        return [{"head_lr": float(p["head_lr"]), "backbone_lr": float(p["backbone_lr"])} for p in spec]
    raise ValueError(f"sweep for {method!r}: give {{head_lr: [...], backbone_lr: [...]}} or a list of points")


def sweep_parameter_name(method: str) -> str:
    return f"{method}_lrs" if SWEEP_KIND.get(method, "grid") == "lr" else f"{method}_grid"


def pipeline_signature(params: Params, opts: PipelineOptions) -> inspect.Signature:
    from components.params import params_to_json

    p = params.pipeline
    items = [
        _param("params_json", str, params_to_json(params)),
        _param("tracking_uri", str, opts.tracking_uri),
        _param("tracking", bool, p.tracking),
        _param("experiment", str, p.experiment),
        _param("registered_model", str, p.registered_model),
        _param("epochs", int, params.finetune.epochs),
        _param("seed", int, params.finetune.seed),
    ]
    if opts.sweep:
        items += [
            _param(sweep_parameter_name(m), list, sweep_points(params, m, opts.sweep_grid))
            for m in params.finetune.methods
        ]
    else:
        for name, (method, attr) in method_lr_parameters(params).items():
            items.append(_param(name, float, getattr(params.finetune.methods[method], attr)))
    return inspect.Signature(items, return_annotation=dsl.Artifact)


# --------------------------------------------------------------------------------------------------
# The DAG
# --------------------------------------------------------------------------------------------------


def build_pipeline(params: Params, opts: PipelineOptions | None = None):  # -> kfp GraphComponent
    """The pipeline for `params` (its defaults) and `opts` (image, platform settings, sweep)."""
    opts = opts or PipelineOptions()
    if not params.finetune.methods:
        raise ValueError("finetune.methods is empty: the pipeline needs at least one fine-tuning method")
    c = make_components(opts.image)
    sig = pipeline_signature(params, opts)
    names = list(sig.parameters)
    lr_params = method_lr_parameters(params)
    methods = dict(params.finetune.methods)

    def dag(*args: Any) -> Any:
        kw = dict(zip(names, args, strict=True))

        def common(params_json: Any) -> dict[str, Any]:
            return {
                "params_json": params_json,
                "tracking_uri": kw["tracking_uri"],
                "pipeline_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            }

        resolved = c.resolve_params(
            params_json=kw["params_json"],
            tracking=kw["tracking"],
            experiment=kw["experiment"],
            registered_model=kw["registered_model"],
            epochs=kw["epochs"],
            seed=kw["seed"],
        )
        configure_task(resolved, "resolve_params", opts)
        pj = resolved.outputs["Output"]
        prep = configure_task(c.prepare_data(**common(pj)), "prepare_data", opts)
        dataset = prep.outputs["dataset"]
        pre = configure_task(c.pretrained(**common(pj), dataset=dataset), "pretrained", opts)
        pretrained_model = pre.outputs["model"]
        conv = configure_task(
            c.convert_bn(**common(pj), dataset=dataset, pretrained=pretrained_model), "convert_bn", opts
        )
        probe = configure_task(
            c.linear_probe(**common(pj), dataset=dataset, pretrained=pretrained_model), "linear_probe", opts
        )
        starts = {
            "pretrained": pretrained_model,
            "bn_converted": conv.outputs["model"],
            "linear_probe": probe.outputs["model"],
        }

        def branch(method: str, lrs: Mapping[str, Any], in_loop: bool = False) -> dsl.PipelineTask:
            # Inside a ParallelFor the params travel as resolve_params' JSON artifact: kfp.local (2.17.3)
            # replaces every task-output *parameter* entering a loop with the loop item. Same content.
            src = {"params_file": resolved.outputs["params"]} if in_loop else {"params_json": pj}
            run_args = {k: v for k, v in common(pj).items() if k != "params_json"}
            start = starts[methods[method].start]
            ft = c.finetune(**run_args, **src, method=method, dataset=dataset, start=start, **lrs)
            configure_task(ft.set_display_name(f"finetune-{method}"), "finetune", opts)
            ev = c.evaluate(
                **run_args,
                **src,
                method=method,
                dataset=dataset,
                model=ft.outputs["model"],
                reference=pretrained_model,
                finetune_info=ft.outputs["Output"],
            )
            return configure_task(ev.set_display_name(f"evaluate-{method}"), "evaluate", opts)

        ev_lp = c.evaluate(
            **common(pj),
            method="lp",
            dataset=dataset,
            model=probe.outputs["model"],
            reference=pretrained_model,
        )
        configure_task(ev_lp.set_display_name("evaluate-lp"), "evaluate", opts)

        evaluations: dict[str, Any] = {}
        for method in methods:
            if not opts.sweep:
                lrs = {attr: kw[name] for name, (m, attr) in lr_params.items() if m == method}
                evaluations[method] = branch(method, lrs).outputs["evaluation"]
                continue
            with dsl.ParallelFor(
                kw[sweep_parameter_name(method)], parallelism=opts.sweep_parallelism, name=f"sweep-{method}"
            ) as point:
                if SWEEP_KIND.get(method, "grid") == "lr":
                    lrs = {"lr": point}
                else:
                    lrs = {"head_lr": point.head_lr, "backbone_lr": point.backbone_lr}
                ev = branch(method, lrs, in_loop=True)
            evaluations[method] = dsl.Collected(ev.outputs["evaluation"])

        final_step = "select_best" if opts.sweep else "report"
        final = getattr(c, final_step)(**common(pj), lp=ev_lp.outputs["evaluation"], **evaluations)
        configure_task(final, final_step, opts)
        return final.outputs["report"]

    dag.__signature__ = sig  # type: ignore[attr-defined]
    dag.__name__ = "daft_sweep_pipeline" if opts.sweep else "daft_pipeline"
    dag.__doc__ = (
        "DAFT learning-rate sweep: per method a ParallelFor over its lrs; the best by ID val is selected."
        if opts.sweep
        else "DAFT vs FT / LP-FT / LP: prepare data, pretrained, BN conversion, probe, fine-tune, evaluate."
    )
    name = SWEEP_PIPELINE_NAME if opts.sweep else PIPELINE_NAME
    return dsl.pipeline(name=name, description=dag.__doc__)(dag)


def compile_pipeline(params: Params, opts: PipelineOptions, output: str) -> str:
    """Compile to `output` (YAML). The same params and options give byte-identical files."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(params, opts), package_path=str(output))
    return str(output)
