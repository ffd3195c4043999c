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
(``epochs``, ``seed``, ``learning_rates`` — method -> {lr | head_lr | backbone_lr}, the MLflow experiment /
registered model / tracking switch, ``tracking_uri`` and ``data_root``: where the data is, a path in the pod
or ``s3://bucket/prefix``; empty keeps params.yaml's ``data.root``). The sweep pipeline adds one list
parameter per configured method (``<method>_lrs`` or ``<method>_grid``); its default grid comes from the
method catalogue (``daft_core.methods``).

Caching across runs: ``resolve_params`` hands each step only the params sections it reads
(``pipelines.components.STEP_PARAMS``, as dvc.yaml lists them, plus ``pipeline``), and the KFP run id reaches
the steps as the environment variable ``DAFT_PIPELINE_RUN_ID`` (from the pod's ``pipeline/runid`` label,
kfp-kubernetes ``use_field_path_as_env``), not as an input; so a step whose sections and upstream artifacts
did not change is a cache hit in the next run.

Platform settings come from :class:`PipelineOptions`: per-step CPU / memory requests and limits, a GPU for
the steps in ``gpu_steps`` (fine-tuning and feature extraction; the image must be the CUDA build), retries
with exponential back-off, caching (on by default), Kubernetes secrets as environment variables
(kfp-kubernetes), node selectors and tolerations, image pull secrets, per-step timeouts and scratch volumes
and, for data already on the cluster, a PVC mounted on the prepare_data task (``data_pvc``). ``local=True``
leaves out what only a cluster can honour (resources, accelerators, secrets, node selectors, tolerations,
volumes, timeouts, the run-id label); see docs/kubeflow.md.
"""

# No ``from __future__ import annotations``: KFP reads the pipeline functions' annotations as objects.
import inspect
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kfp import dsl, kubernetes

from daft_core.methods import FINETUNED_METHODS, METHODS
from pipelines import DEFAULT_CUDA_IMAGE, DEFAULT_IMAGE
from pipelines.components import EXPECT_GPU_ENV, NODE_NAME_ENV, PIPELINE_ID_ENV, make_components

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
    "wise_ft": {"cpu": "2", "memory": "4Gi", "cpu_limit": "4", "memory_limit": "8Gi"},  # ID val per α
    "report": {"cpu": "500m", "memory": "1Gi", "cpu_limit": "1", "memory_limit": "2Gi"},
    "select_best": {"cpu": "500m", "memory": "1Gi", "cpu_limit": "1", "memory_limit": "2Gi"},
}
# The finetune task when it launches a TrainJob (finetune.launcher: trainjob): it only stages and waits.
LAUNCHER_RESOURCES = {"cpu": "500m", "memory": "1Gi", "cpu_limit": "1", "memory_limit": "2Gi"}
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


def default_sweep() -> dict[str, Any]:
    """Each fine-tuned method's default sweep, from the method catalogue: a list of lrs ("lr" sweeps) or
    a list of {head_lr, backbone_lr} points ("grid" sweeps). Methods without a grid are not swept."""
    out: dict[str, Any] = {}
    for name in FINETUNED_METHODS:
        m = METHODS[name]
        if not m.grid:
            continue
        if m.sweep == "lr":
            out[name] = m.lr_list()
        else:
            out[name] = [{"head_lr": h, "backbone_lr": b} for h, b in m.grid]
    return out


DEFAULT_SWEEP: dict[str, Any] = default_sweep()
NO_SECRET_STEPS = ("resolve_params",)  # validates parameters only: no credentials in its pod
STEPS = tuple(s for s in DEFAULT_RESOURCES if s != "default")  # every step (task kind) of both pipelines
# The KFP API server labels every pod of a run with the run's id (KFP v2 backend, apiserver template:
# pod metadata label `pipeline/runid`). Each task reads it into DAFT_PIPELINE_RUN_ID through the downward API
# (kfp-kubernetes use_field_path_as_env), so the run id is no task input and a step's cache key is the same
# from one run to the next.
RUN_ID_LABEL = "pipeline/runid"
RUN_ID_FIELD_PATH = f"metadata.labels['{RUN_ID_LABEL}']"
NODE_NAME_FIELD_PATH = "spec.nodeName"  # the GPU steps name their node when they find no GPU
DEFAULT_SWEEP_PARALLELISM = 4  # sweep points of one method at once
SCRATCH_MOUNT = "/scratch"  # a scratch volume's default mount path
SCRATCH_VOLUME = "daft-scratch"
TARGETS = ("all", "gpu")  # node_selector / tolerations: every step, the GPU steps, or a step by name


def image_has_cuda(image: str) -> bool | None:
    """What an image's tag says about its torch build: False for a ``cpu`` token (``0.1.0-cpu``) or the
    project's CPU default, True for a ``cuda``/``gpu`` token (``0.1.0-cuda``, ``cuda12``), None when the tag
    says neither (a custom tag, a digest): trusted, since only its builder knows."""
    if image == DEFAULT_IMAGE:
        return False
    name = image.rsplit("/", 1)[-1]
    if "@" in name or ":" not in name:
        return None
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.split(":", 1)[1].lower()) if t]
    if "cpu" in tokens:
        return False
    if any(t.startswith(("cuda", "gpu")) for t in tokens):
        return True
    return None


@dataclass(frozen=True)
class PipelineOptions:
    """Compile-time options (the image, platform settings, the sweep); see docs/kubeflow.md."""

    # None: the CUDA build when GPUs are on (DEFAULT_CUDA_IMAGE), else the CPU build (DEFAULT_IMAGE)
    image: str | None = None
    # Whether `image` has CUDA torch; None: read from its tag (image_has_cuda). False refuses GPUs.
    image_has_cuda: bool | None = None
    sweep: bool = False
    sweep_grid: Mapping[str, Any] = field(default_factory=default_sweep)
    sweep_parallelism: int = DEFAULT_SWEEP_PARALLELISM  # at most this many points of a method at once (>= 1)
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
    # {"name": PVC, "mount_path": /data}: the user's data, mounted on the prepare_data task only
    data_pvc: Mapping[str, str] | None = None
    local: bool = False  # kfp.local: leave out resources, accelerators, secrets, node selectors, volumes
    resume_uri: str = ""  # s3://bucket/prefix: finetune's resumable checkpoint (DAFT_RESUME_URI), for retries

    # Scheduling and pod settings (kfp-kubernetes). Targets: "all", "gpu" (the GPU steps) or a step name.
    node_selector: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # target -> {label: value}
    tolerations: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)  # target -> list
    image_pull_secrets: Sequence[str] = ()  # every task
    timeouts: Mapping[str, int] = field(default_factory=dict)  # step or "default" -> seconds (pod deadline)
    # step -> {size, mount_path, storage_class}: a scratch volume (DAFT_WORKSPACE, TMPDIR point at it)
    scratch: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # The platform file's `finetune` section: launcher pod (default) | trainjob (pipelines/trainjob.py)
    finetune: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data_pvc is not None:
            check_data_pvc(self.data_pvc)
        if self.image is None:
            object.__setattr__(self, "image", DEFAULT_CUDA_IMAGE if self.wants_gpu else DEFAULT_IMAGE)
        sp = self.sweep_parallelism
        if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
            raise ValueError(f"sweep_parallelism must be a whole number >= 1 (points at once), got {sp!r}")
        for kind, targets in (("node_selector", self.node_selector), ("tolerations", self.tolerations)):
            unknown = sorted(set(targets) - {*TARGETS, *STEPS})
            if unknown:
                raise ValueError(f"{kind}: unknown target(s) {unknown}; use all, gpu or a step {list(STEPS)}")
        for kind, steps in (("timeouts", self.timeouts), ("scratch", self.scratch)):
            unknown = sorted(set(steps) - {"default", *STEPS})
            if unknown:
                raise ValueError(f"{kind}: unknown step(s) {unknown}; steps: {list(STEPS)} (or default)")
        if self.wants_gpu and not self.local:
            self._check_cuda_image()
        job = self.trainjob()
        cpu_job = job is not None and job.gpus_per_node > 0 and image_has_cuda(str(job.image)) is False
        if cpu_job and (job.image != self.image or self.image_has_cuda is not True):
            raise ValueError(
                f"finetune.launcher is trainjob with {job.gpus_per_node} GPU(s) per node but its image "
                f"{job.image} has CPU-only torch (its tag says cpu); set finetune.image to the CUDA build"
            )

    def trainjob(self):  # -> pipelines.trainjob.TrainJobConfig | None
        """The TrainJob launcher's settings (image and secrets filled in from these options) when the
        `finetune` section selects it on a cluster; None for the in-pod finetune (and for kfp.local, which
        cannot create cluster objects: run-local fine-tunes in its subprocess)."""
        from dataclasses import replace

        from pipelines.trainjob import TrainJobConfig

        config = TrainJobConfig(**dict(self.finetune))  # ValueError naming the key
        if not config.enabled or self.local:
            return None
        secrets = {name: dict(keys) for name, keys in self.secrets.items()}
        image = config.image or self.image
        return replace(config, image=image, secrets=secrets, secrets_optional=self.secrets_optional)

    @property
    def wants_gpu(self) -> bool:
        """GPUs are asked for: `gpu` on, `gpu_count` > 0 and at least one GPU step."""
        return bool(self.gpu and self.gpu_count > 0 and self.gpu_steps)

    def uses_gpu(self, step: str) -> bool:
        return self.wants_gpu and step in self.gpu_steps

    def _check_cuda_image(self) -> None:
        """ValueError (one line) when GPUs are asked for with an image whose torch is a CPU build."""
        has = self.image_has_cuda if self.image_has_cuda is not None else image_has_cuda(str(self.image))
        if has is not False:
            return
        if self.image_has_cuda is False:
            why = "the platform file says gpu.image_has_cuda: false"
        elif self.image == DEFAULT_IMAGE:
            why = "it is the project's CPU build"
        else:
            why = "its tag says cpu"
        raise ValueError(
            f"GPUs are requested ({self.gpu_count} x {self.gpu_type} for {', '.join(self.gpu_steps)}) but "
            f"the image {self.image} has CPU-only torch ({why}), so the steps would never use them. Fix: "
            f"pass the CUDA build (docker build --build-arg TORCH_VARIANT=cuda, tagged like "
            f"{DEFAULT_CUDA_IMAGE}) with --image, or compile with --no-gpu"
        )


DATA_PVC_STEP = "prepare_data"  # the one step that reads the user's data


def check_data_pvc(pvc: Mapping[str, Any]) -> None:
    """ValueError unless `pvc` is ``{"name": <PVC name>, "mount_path": <absolute path>}``."""
    if not isinstance(pvc, Mapping) or set(pvc) != {"name", "mount_path"}:
        raise ValueError(f"data_pvc must be {{name: PVC, mount_path: /absolute/path}}, got {pvc!r}")
    name, path = pvc["name"], pvc["mount_path"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"data_pvc.name must be the PersistentVolumeClaim's name, got {name!r}")
    if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
        raise ValueError(f"data_pvc.mount_path must be an absolute path other than /, got {path!r}")


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
    """Caching, retries and (on a cluster) resources, GPU, the run id, scheduling, volumes and secrets for
    one task."""
    task.set_caching_options(opts.caching)
    if opts.retries > 0:
        task.set_retry(
            num_retries=opts.retries,
            backoff_duration=opts.backoff_duration,
            backoff_factor=opts.backoff_factor,
            backoff_max_duration=opts.backoff_max_duration,
        )
    if step == "finetune" and opts.resume_uri:
        task.set_env_variable("DAFT_RESUME_URI", opts.resume_uri)
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
    # The run id, from the pod's label: an environment variable, not an input (inputs are the cache key).
    kubernetes.use_field_path_as_env(task, env_name=PIPELINE_ID_ENV, field_path=RUN_ID_FIELD_PATH)
    if opts.uses_gpu(step):
        task.set_accelerator_type(opts.gpu_type).set_accelerator_limit(opts.gpu_count)
        task.set_env_variable(EXPECT_GPU_ENV, "1")  # step_setup fails at once if torch finds no GPU
        kubernetes.use_field_path_as_env(task, env_name=NODE_NAME_ENV, field_path=NODE_NAME_FIELD_PATH)
    targets = ["all", *(["gpu"] if opts.uses_gpu(step) else []), step]  # later ones win on a label
    selector: dict[str, str] = {}
    for t in targets:
        selector.update(opts.gpu_node_selector if t == "gpu" else {})
        selector.update(opts.node_selector.get(t, {}))
    for key, value in selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in targets:
        for tol in opts.tolerations.get(t, ()):
            kubernetes.add_toleration(task, **{k: v for k, v in tol.items() if v is not None})
    if opts.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(opts.image_pull_secrets))
    timeout = opts.timeouts.get(step, opts.timeouts.get("default"))
    if timeout:
        kubernetes.set_timeout(task, int(timeout))
    scratch = opts.scratch.get(step, opts.scratch.get("default"))
    if scratch:
        _mount_scratch(task, scratch)
    if step not in NO_SECRET_STEPS:
        for name, keys in opts.secrets.items():
            kubernetes.use_secret_as_env(task, name, dict(keys), optional=opts.secrets_optional)
    if step == DATA_PVC_STEP and opts.data_pvc:
        kubernetes.mount_pvc(task, pvc_name=opts.data_pvc["name"], mount_path=opts.data_pvc["mount_path"])
    return task


def _mount_scratch(task: dsl.PipelineTask, spec: Mapping[str, Any]) -> None:
    """A scratch volume for the step's temporary files (prepare_data's download, TMPDIR).

    kfp 2.17.3 cannot set a container's ephemeral-storage request or limit (PipelineTask has no setter and
    the IR's ResourceSpec no field), so the space comes as a volume: with a `storage_class`, a generic
    ephemeral volume (a PVC of `size` created with the pod and deleted with it; kubernetes
    add_ephemeral_volume), else an emptyDir on the node's disk capped at `size` (empty_dir_mount).
    """
    path = spec.get("mount_path") or SCRATCH_MOUNT
    if spec.get("storage_class"):
        kubernetes.add_ephemeral_volume(
            task,
            volume_name=SCRATCH_VOLUME,
            mount_path=path,
            access_modes=["ReadWriteOnce"],
            size=str(spec["size"]),
            storage_class_name=spec["storage_class"],
        )
    else:
        kubernetes.empty_dir_mount(task, volume_name=SCRATCH_VOLUME, mount_path=path, size_limit=spec["size"])
    task.set_env_variable("DAFT_WORKSPACE", path)  # components.prepare_data downloads remote data there
    task.set_env_variable("TMPDIR", path)


# --------------------------------------------------------------------------------------------------
# Pipeline parameters (from params.yaml)
# --------------------------------------------------------------------------------------------------


def default_learning_rates(params: "Params") -> dict[str, dict[str, float]]:
    """``learning_rates``' default: each method's lr fields as params.yaml sets them."""
    return {
        method: {
            k: v for k, v in m.model_dump(include={"lr", "head_lr", "backbone_lr"}).items() if v is not None
        }
        for method, m in params.finetune.methods.items()
    }


def sweep_kind(method: str) -> str:
    return METHODS[method].sweep


def sweep_points(params: "Params", method: str, grid: Mapping[str, Any]) -> list[Any]:
    """The sweep list for `method`: from `grid` (the catalogue's by default), else the configured lrs."""
    kind = sweep_kind(method)
    spec = grid.get(method)
    if spec is None:  # not swept: its configured (or recipe default) learning rates, one point
        recipe = params.recipe(method)
        if kind == "lr":
            spec = [recipe.head_lr]
        else:
            spec = {"head_lr": [recipe.head_lr], "backbone_lr": [recipe.backbone_lr]}
    entry = params.finetune.methods.get(method)
    return grid_points(method, spec, variant=entry.variant if entry is not None else None)


def grid_points(method: str, spec: Any, variant: str | None = None, published: bool = True) -> list[Any]:
    """`method`'s sweep points from a grid as written (ValueError naming the method when malformed, or,
    with `published`, when a point cannot be the published method and the branch is not a variant)."""
    try:
        points = _grid_points(method, spec)
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"sweep for {method!r}: malformed grid {spec!r} ({type(e).__name__}: {e})") from None
    for p in points:
        head, backbone = (p, p) if not isinstance(p, Mapping) else (p["head_lr"], p["backbone_lr"])
        reason = METHODS[method].published_violation(head, backbone)
        if published and reason is not None and variant is None:
            raise ValueError(
                f"sweep for {method!r}: {reason}. Drop that point, or name the branch as a variant "
                f"(finetune.methods.{method}.variant in params)"
            )
    return points


def _grid_points(method: str, spec: Any) -> list[Any]:
    kind = sweep_kind(method)
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
    return f"{method}_lrs" if sweep_kind(method) == "lr" else f"{method}_grid"


# --------------------------------------------------------------------------------------------------
# The DAG
# --------------------------------------------------------------------------------------------------


def build_pipeline(params: "Params", opts: "PipelineOptions | None" = None):  # -> kfp GraphComponent
    """The pipeline for `params` (its defaults) and `opts` (image, platform settings, sweep)."""
    from components.params import params_to_json
    from components.tracking.redaction import has_credentials

    opts = opts or PipelineOptions()
    if has_credentials(opts.tracking_uri):  # it would be stored in plain text in the compiled pipeline
        raise ValueError(
            "the tracking URI carries credentials; pass it without them and put them in the Kubernetes "
            "secret daft-mlflow-credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
        )
    if not params.finetune.methods:
        raise ValueError("finetune.methods is empty: the pipeline needs at least one fine-tuning method")
    if opts.sweep and params.wise_ft.methods:  # which configuration to mix is known only in select_best
        raise ValueError(
            "wise_ft.methods is not supported by the sweep pipeline; compile without --sweep, or set "
            "wise_ft.methods: [] in params"
        )
    dag = _Dag(params, opts)
    p = params.pipeline
    lr_defaults = default_learning_rates(params)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="DAFT vs FT / LP-FT / LP: prepare data, pretrained, BN conversion, probe, fine-tune, "
        "evaluate.",
    )
    def daft_pipeline(
        params_json: str = params_to_json(params),
        tracking_uri: str = opts.tracking_uri,
        tracking: bool = p.tracking,
        experiment: str = p.experiment,
        registered_model: str = p.registered_model,
        epochs: int = params.finetune.epochs,
        seed: int = params.finetune.seed,
        data_root: str = "",  # a path in the pod or s3://bucket/prefix; empty: params.yaml's data.root
        learning_rates: dict = lr_defaults,  # method -> {lr | head_lr | backbone_lr}
    ) -> dsl.Artifact:
        stages = dag.stages(
            params_json, tracking_uri, tracking, experiment, registered_model, epochs, seed, data_root
        )
        evaluations = {
            method: dag.branch(stages, method, {"learning_rates": learning_rates}).outputs["evaluation"]
            for method in params.finetune.methods
        }
        for method in params.wise_ft.methods:  # optional WiSE-FT rows: `wise_ft_<method>`
            evaluations[f"wise_ft_{method}"] = dag.wise(stages, method)
        return dag.final(stages, "report", evaluations)

    if not opts.sweep:
        return daft_pipeline

    # Generated, because it cannot be static: KFP's ParallelFor iterates a pipeline parameter, so the sweep
    # needs one list parameter per configured method (`<method>_lrs` / `<method>_grid`), after the plain
    # pipeline's parameters (less `learning_rates`: a sweep point sets a method's lrs).
    base = [
        q
        for q in inspect.signature(daft_pipeline.pipeline_func).parameters.values()
        if q.name != "learning_rates"
    ]
    sweep_names = [sweep_parameter_name(m) for m in params.finetune.methods]

    def daft_sweep_pipeline(*args: Any) -> dsl.Artifact:
        """DAFT learning-rate sweep: per method a ParallelFor over its lrs; the best by ID val is selected."""
        # KFP passes the parameters positionally, in the order of the signature set below.
        stages = dag.stages(*args[: len(base)])
        sweeps = dict(zip(sweep_names, args[len(base) :], strict=True))
        evaluations: dict[str, Any] = {}
        for method in params.finetune.methods:
            with dsl.ParallelFor(
                sweeps[sweep_parameter_name(method)],
                parallelism=opts.sweep_parallelism,
                name=f"sweep-{method}",
            ) as point:
                if sweep_kind(method) == "lr":
                    lrs = {"lr": point}
                else:
                    lrs = {"head_lr": point.head_lr, "backbone_lr": point.backbone_lr}
                ev = dag.branch(stages, method, lrs, in_loop=True)
            evaluations[method] = dsl.Collected(ev.outputs["evaluation"])
        return dag.final(stages, "select_best", evaluations)

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    lists = [
        inspect.Parameter(name, kind, default=sweep_points(params, m, opts.sweep_grid), annotation=list)
        for name, m in zip(sweep_names, params.finetune.methods, strict=True)
    ]
    daft_sweep_pipeline.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        base + lists, return_annotation=dsl.Artifact
    )
    return dsl.pipeline(name=SWEEP_PIPELINE_NAME, description=daft_sweep_pipeline.__doc__)(
        daft_sweep_pipeline
    )


class _Dag:
    """The tasks both pipelines share; each call adds tasks to the pipeline being built."""

    def __init__(self, params: "Params", opts: PipelineOptions) -> None:
        self.params, self.opts = params, opts
        self.c = make_components(opts.image)
        self.trainjob = opts.trainjob()

    def launcher_task(self, method: str, inputs: Mapping[str, Any]) -> dsl.PipelineTask:
        """finetune as a TrainJob launcher: finetune's inputs, retries, timeout, secrets and resume store,
        but a small pod without a GPU (the job's nodes have them) that knows its namespace."""
        from dataclasses import replace

        from pipelines.trainjob import NAMESPACE_ENV

        assert self.trainjob is not None
        task = self.c.finetune_trainjob(**inputs, trainjob_json=self.trainjob.to_json())
        task.set_display_name(f"finetune-{method}")
        opts = replace(
            self.opts,
            gpu_steps=tuple(s for s in self.opts.gpu_steps if s != "finetune"),
            resources={**self.opts.resources, "finetune": dict(LAUNCHER_RESOURCES)},
        )
        configure_task(task, "finetune", opts)
        if not opts.local:
            kubernetes.use_field_path_as_env(task, env_name=NAMESPACE_ENV, field_path="metadata.namespace")
        return task

    def task(self, step: str, factory: Callable[..., dsl.PipelineTask], name: str | None = None, **kw: Any):
        task = factory(**kw)
        if name:
            task.set_display_name(name)
        return configure_task(task, step, self.opts)

    def stages(
        self, params_json, tracking_uri, tracking, experiment, registered_model, epochs, seed, data_root
    ):
        """resolve_params -> prepare_data -> pretrained -> {convert_bn, linear_probe}; LP's evaluation."""
        c = self.c
        resolved = self.task(
            "resolve_params",
            c.resolve_params,
            params_json=params_json,
            tracking=tracking,
            experiment=experiment,
            registered_model=registered_model,
            epochs=epochs,
            seed=seed,
            data_root=data_root,
        )
        # The run id is no input (it reaches the pods as DAFT_PIPELINE_RUN_ID, see configure_task), and each
        # step gets only its own params sections (resolve_params' output named after it): a step's inputs,
        # hence its cache key, change only when what it reads changes.
        s: dict[str, Any] = {"resolved": resolved, "run": {"tracking_uri": tracking_uri}}

        def inputs(step: str, **kw: Any) -> dict[str, Any]:
            return {"params_json": resolved.outputs[step], **s["run"], **kw}

        s["inputs"] = inputs
        dataset = self.task("prepare_data", c.prepare_data, **inputs("prepare_data")).outputs["dataset"]
        pretrained_task = self.task("pretrained", c.pretrained, **inputs("pretrained", dataset=dataset))
        pretrained = pretrained_task.outputs["model"]
        models = {"dataset": dataset, "pretrained": pretrained}
        s["dataset"], s["pretrained"] = dataset, pretrained
        converted = self.task("convert_bn", c.convert_bn, **inputs("convert_bn", **models))
        probe = self.task("linear_probe", c.linear_probe, **inputs("linear_probe", **models))
        s["starts"] = {
            "pretrained": pretrained,
            "bn_converted": converted.outputs["model"],
            "linear_probe": probe.outputs["model"],
        }
        s["lp"] = self.task(
            "evaluate",
            c.evaluate,
            name="evaluate-lp",
            **inputs("evaluate"),
            method="lp",
            dataset=dataset,
            model=s["starts"]["linear_probe"],
            reference=pretrained,
        ).outputs["evaluation"]
        return s

    def branch(self, s: dict[str, Any], method: str, lrs: Mapping[str, Any], in_loop: bool = False):
        """finetune[method] -> evaluate[method], starting from the model params.yaml names."""

        # Inside a ParallelFor the params travel as resolve_params' JSON artifact (every step's sections;
        # each step reads its own): kfp.local (2.17.3) replaces every task-output *parameter* entering a loop
        # with the loop item. Same content; on a cluster the artifact is the same one as long as
        # resolve_params is a cache hit, so a loop's steps re-run whenever any pipeline parameter changes.
        def src(step: str) -> dict[str, Any]:
            if in_loop:
                return {"params_file": s["resolved"].outputs["params"]}
            return {"params_json": s["resolved"].outputs[step]}

        start = s["starts"][self.params.method(method).start]
        inputs = {**s["run"], **src("finetune"), "method": method, "dataset": s["dataset"], "start": start}
        if self.trainjob is None:
            ft = self.task("finetune", self.c.finetune, name=f"finetune-{method}", **inputs, **lrs)
        else:
            ft = self.launcher_task(method, {**inputs, **lrs})
        s.setdefault("finetuned", {})[method] = ft.outputs["model"]  # what wise() mixes with its start
        return self.evaluate(s, method, ft, src("evaluate"))

    def evaluate(self, s: dict[str, Any], method: str, producer: Any, params_src: Mapping[str, Any]):
        """evaluate[method] of `producer`'s model (its summary output travels as ``finetune_info``)."""
        return self.task(
            "evaluate",
            self.c.evaluate,
            name=f"evaluate-{method}",
            **s["run"],
            **params_src,
            method=method,
            dataset=s["dataset"],
            model=producer.outputs["model"],
            reference=s["pretrained"],
            finetune_info=producer.outputs["Output"],
        )

    def wise(self, s: dict[str, Any], method: str):
        """wise_ft[method] -> evaluate[wise_ft_<method>]: the branch's fine-tuned model mixed with its start
        (after :meth:`branch` for `method`); the evaluation artifact."""
        name = f"wise_ft_{method}"  # components.wise_ft.wise_method
        start = s["starts"][self.params.method(method).start]
        mix = self.task(
            "wise_ft",
            self.c.wise_ft,
            name=f"wise_ft-{method}",
            **s["inputs"]("wise_ft", method=method, dataset=s["dataset"], start=start),
            finetuned=s["finetuned"][method],
        )
        return self.evaluate(s, name, mix, {"params_json": s["resolved"].outputs["evaluate"]}).outputs[
            "evaluation"
        ]

    def final(self, s: dict[str, Any], step: str, evaluations: Mapping[str, Any]):
        # report and select_best read the same sections (STEP_PARAMS["report"]: only `pipeline`)
        task = self.task(step, getattr(self.c, step), **s["inputs"]("report", lp=s["lp"], **evaluations))
        return task.outputs["report"]


def compile_pipeline(params: "Params", opts: PipelineOptions, output: str) -> str:
    """Compile to `output` (YAML). The same params and options give byte-identical files."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(params, opts), package_path=str(output))
    return str(output)
