"""Fine-tuning as a distributed Kubeflow Trainer v2 ``TrainJob`` (N nodes x G GPUs), launched from a KFP task.

Why a launcher: a KFP task is one pod, so one node. With ``finetune.launcher: trainjob`` in the platform file
the pipeline's finetune task (:func:`pipelines.components.finetune_trainjob`) instead

1. uploads its inputs (the prepared dataset, the start model) under the run's results prefix,
   ``<results_uri>/<run id>/<method>/<point key>/`` (:func:`job_prefix`),
2. creates a ``TrainJob`` (trainer.kubeflow.org/v1alpha1) on a ``ClusterTrainingRuntime`` such as
   ``torch-distributed`` (:func:`trainjob_spec`), whose every node runs :func:`container_command`:
   ``python -m pipelines.trainjob node`` downloads the inputs, runs ``torchrun ... -m components.finetune``
   (the same CLI ``dvc repro`` runs; torchrun reads the node rank and master address from the ``PET_*``
   variables the Trainer's torch plugin sets) and, on node 0, uploads the model folder, then a marker,
3. polls the job's conditions (``Complete``/``Succeeded``: done; ``Failed``: :class:`TrainJobFailed`, with
   the job's reason and message; no verdict within the timeout: :class:`TrainJobTimeout`, the job deleted),
4. downloads the model folder into the task's ``Output[Model]``: the layout the in-pod finetune writes, so
   evaluate and report work unchanged.

Why Trainer v2 and not the v1 ``PyTorchJob``: the Training Operator v1 is in maintenance mode and Kubeflow
Trainer v2 replaces it; a ``TrainJob`` names a runtime the cluster's admin owns (image defaults, NCCL
settings, scheduling), so this spec stays small. Only the fields that v2.0 - v2.2 share are used (no
``podTemplateOverrides``/``runtimePatches``, whose shape changed in v2.2). See docs/kubeflow.md.

The ``kubernetes`` client (a kfp dependency) talks to the API server; ``components.storage`` to S3.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.common import StepError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_RUNTIME = "torch-distributed"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_TIMEOUT_S = 24 * 3600
DEFAULT_POLL_S = 30
JOB_WORKDIR = "/tmp/daft-trainjob"  # in each node's container: the inputs and node 0's output
COMPLETE_MARKER = "_DAFT_COMPLETE.json"  # written last under a prefix: the upload is whole
SUCCESS_CONDITIONS = ("Complete", "Succeeded")  # TrainJob says Complete; Succeeded for JobSet-like kinds
FAILURE_CONDITIONS = ("Failed",)
LABEL_PREFIX = "daft.pipeline"
NAMESPACE_ENV = "DAFT_POD_NAMESPACE"  # the launcher pod's namespace (downward API), where the job goes
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RFC1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_QUANTITY = re.compile(r"^[0-9.]+[A-Za-z]*$")
_RESOURCE_KEYS = ("cpu", "memory", "cpu_limit", "memory_limit")


class TrainJobError(StepError):
    """The distributed fine-tuning job could not run or its result cannot be read; one line saying why (a
    StepError: the steps' CLI prints it as one ``error:`` line)."""


class TrainJobFailed(TrainJobError):
    """The TrainJob reported ``Failed``; the message carries its reason and message."""


class TrainJobTimeout(TrainJobError):
    """The TrainJob reached no verdict within the launcher's timeout."""


# --------------------------------------------------------------------------------------------------
# Configuration (the platform file's `finetune` section)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainJobConfig:
    """What the platform file's ``finetune:`` section says about the launcher (validated on creation)."""

    launcher: str = "pod"  # pod: the in-pod finetune task; trainjob: this module
    nodes: int = 1
    gpus_per_node: int = 1
    runtime: str = DEFAULT_RUNTIME  # a ClusterTrainingRuntime (or, with runtime_kind, a TrainingRuntime)
    runtime_kind: str = "ClusterTrainingRuntime"
    image: str | None = None  # None: the pipeline's image
    resources: Mapping[str, str] = field(default_factory=dict)  # per node: cpu, memory, *_limit
    gpu_resource: str = DEFAULT_GPU_RESOURCE
    results_uri: str | None = None  # s3://bucket/prefix: inputs and the model travel through it
    namespace: str | None = None  # None: the launcher pod's namespace
    timeout: int = DEFAULT_TIMEOUT_S  # seconds the launcher waits for a verdict
    poll_interval: int = DEFAULT_POLL_S
    env: Mapping[str, str] = field(default_factory=dict)  # extra variables (NCCL_DEBUG, NCCL_SOCKET_IFNAME)
    # Filled by the pipeline from its own options: the pods' secrets (secret -> {key: variable}).
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    secrets_optional: bool = False

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def enabled(self) -> bool:
        return self.launcher == "trainjob"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainJobConfig:
        return cls(**json.loads(text))


def _whole(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"finetune.{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def check_name(value: Any, what: str, pattern: re.Pattern[str] = _RFC1123, limit: int = 253) -> str:
    """`value` as a Kubernetes name, else ValueError naming `what` and the rule."""
    if not isinstance(value, str) or len(value) > limit or not pattern.match(value):
        rule = "RFC 1035 label" if pattern is _RFC1035 else "RFC 1123 name"
        raise ValueError(
            f"{what} must be a Kubernetes name ({rule}: lowercase letters, digits and '-', at most {limit} "
            f"characters), got {value!r}"
        )
    return value


def check_config(c: TrainJobConfig) -> None:
    """ValueError (one line, naming the key) for a launcher setting the cluster would refuse or misread."""
    if c.launcher not in ("pod", "trainjob"):
        raise ValueError(f"finetune.launcher must be pod or trainjob, got {c.launcher!r}")
    _whole(c.nodes, "nodes", 1)
    _whole(c.gpus_per_node, "gpus_per_node", 0)
    _whole(c.timeout, "timeout", 1)
    _whole(c.poll_interval, "poll_interval", 1)
    check_name(c.runtime, "finetune.runtime")
    if c.runtime_kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
        raise ValueError(
            f"finetune.runtime_kind must be ClusterTrainingRuntime or TrainingRuntime, got {c.runtime_kind!r}"
        )
    if c.namespace is not None:
        check_name(c.namespace, "finetune.namespace", _RFC1123, 63)
    if c.image is not None and (not isinstance(c.image, str) or not c.image.strip() or " " in c.image):
        raise ValueError(f"finetune.image must be an image reference like registry/repo:tag, got {c.image!r}")
    if not isinstance(c.gpu_resource, str) or "/" not in c.gpu_resource:
        raise ValueError(
            "finetune.gpu_resource must be an extended resource name like nvidia.com/gpu, "
            f"got {c.gpu_resource!r}"
        )
    unknown = sorted(set(c.resources) - set(_RESOURCE_KEYS))
    if unknown:
        raise ValueError(f"finetune.resources: unknown key(s) {unknown}; known: {list(_RESOURCE_KEYS)}")
    for key, value in c.resources.items():
        if not isinstance(value, str) or not _QUANTITY.match(value):
            raise ValueError(f"finetune.resources.{key} must be a quantity like 8 or 32Gi, got {value!r}")
    for key in c.env:
        if not _ENV_NAME.match(str(key)):
            raise ValueError(f"finetune.env: {key!r} is not an environment variable name")
    if c.results_uri is not None and not re.match(r"^s3://[^/\s]+(/\S*)?$", str(c.results_uri)):
        raise ValueError(f"finetune.results_uri must be s3://bucket/prefix, got {c.results_uri!r}")
    if c.enabled and not c.results_uri:
        raise ValueError(
            "finetune.launcher is trainjob but finetune.results_uri is not set; give an s3://bucket/prefix "
            "every training node and the launcher can reach (the inputs and the model travel through it)"
        )


# --------------------------------------------------------------------------------------------------
# Names, paths and the command every node runs
# --------------------------------------------------------------------------------------------------


def safe_segment(value: str) -> str:
    """`value` usable as one S3 key segment and in a log line."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", value) or "_"


def job_prefix(results_uri: str, run_id: str, method: str, point: str) -> str:
    """``<results_uri>/<run id>/<method>/<point key>``: where this fine-tuning's inputs and model live."""
    return "/".join(
        [results_uri.rstrip("/"), safe_segment(run_id), safe_segment(method), safe_segment(point)]
    )


def job_name(run_id: str, method: str, point: str) -> str:
    """A TrainJob name (RFC 1035, <= 63 chars) that is the same for every retry of one fine-tuning, so a
    retried launcher finds the job it started instead of starting a second one."""
    digest = hashlib.sha256(f"{run_id}\0{method}\0{point}".encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-")[:40] or "m"
    return check_name(f"daft-ft-{stem}-{digest}", "TrainJob name", _RFC1035, 63)


def label_value(value: str) -> str:
    """`value` as a Kubernetes label value (<= 63 chars, alphanumeric at both ends)."""
    v = re.sub(r"[^A-Za-z0-9._-]", "-", value)[:63].strip("-._")
    return v


def finetune_args(
    params_json: str, method: str, model: str, data: str, out: str, resume: str = "auto"
) -> list[str]:
    """``components.finetune``'s CLI arguments (the ones ``dvc repro`` and the in-pod task use)."""
    return [
        "--params-json",
        params_json,
        "--method",
        method,
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--resume",
        resume,
    ]


def torchrun_command(nodes: int, procs_per_node: int, args: Sequence[str]) -> list[str]:
    """``torchrun --nnodes N --nproc-per-node G -m components.finetune <args>``.

    The node rank and the master's address and port are not given: torchrun reads them from
    ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``, which the Trainer's torch plugin sets
    (on one machine the defaults, rank 0 on 127.0.0.1, apply). Run it locally as is, e.g. on CPU with
    ``procs_per_node=2`` and local paths in `args`.
    """
    _whole(nodes, "nodes", 1)
    _whole(procs_per_node, "nproc_per_node", 1)
    return [
        "torchrun",
        "--nnodes",
        str(nodes),
        "--nproc-per-node",
        str(procs_per_node),
        "-m",
        "components.finetune",
        *args,
    ]


def container_command(
    config: TrainJobConfig,
    prefix: str,
    params_json: str,
    method: str,
    workdir: str = JOB_WORKDIR,
    python: str = "python",
) -> list[str]:
    """What every node's container runs: the node wrapper (stage in, torchrun, node 0 uploads the model).

    The inputs are read from ``<prefix>/inputs/{data,model}``, the model written to ``<prefix>/model``.
    With ``gpus_per_node: 0`` (a CPU job) each node runs one process.
    """
    work = Path(workdir)
    args = finetune_args(
        params_json,
        method,
        str(work / "inputs" / "model"),
        str(work / "inputs" / "data"),
        str(work / "model"),
    )
    return [
        python,
        "-m",
        "pipelines.trainjob",
        "node",
        "--data-uri",
        f"{prefix}/inputs/data",
        "--model-uri",
        f"{prefix}/inputs/model",
        "--out-uri",
        f"{prefix}/model",
        "--workdir",
        str(work),
        "--",
        *torchrun_command(config.nodes, max(config.gpus_per_node, 1), args),
    ]


# --------------------------------------------------------------------------------------------------
# The TrainJob spec
# --------------------------------------------------------------------------------------------------


def secret_env(secrets: Mapping[str, Mapping[str, str]], optional: bool = False) -> list[dict[str, Any]]:
    """The pods' secrets (secret -> {secret key: variable}) as container env entries (secretKeyRef)."""
    out = []
    for secret, keys in sorted(secrets.items()):
        check_name(secret, f"secret name {secret!r}")
        for key, var in sorted(keys.items(), key=lambda kv: kv[1]):
            ref: dict[str, Any] = {"name": secret, "key": key}
            if optional:
                ref["optional"] = True
            out.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return out


def node_resources(config: TrainJobConfig) -> dict[str, dict[str, str]]:
    """``resourcesPerNode``: cpu / memory requests and limits, and the GPUs (a limit, as Kubernetes wants
    for extended resources; the request defaults to it)."""
    r = config.resources
    requests = {k: r[k] for k in ("cpu", "memory") if r.get(k)}
    limits = {k: r[f"{k}_limit"] for k in ("cpu", "memory") if r.get(f"{k}_limit")}
    if config.gpus_per_node > 0:
        limits[config.gpu_resource] = str(config.gpus_per_node)
    out: dict[str, dict[str, str]] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def trainjob_spec(
    config: TrainJobConfig,
    *,
    name: str,
    namespace: str,
    image: str,
    command: Sequence[str],
    env: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob object to create: `config.nodes` nodes of `config.gpus_per_node` GPUs, one process per
    GPU, every node running `command` in `image` with `env`, the config's env and the pods' secrets."""
    check_name(name, "TrainJob name", _RFC1035, 63)
    check_name(namespace, "namespace", _RFC1123, 63)
    if not image or not isinstance(image, str):
        raise ValueError(f"the TrainJob needs an image, got {image!r}")
    variables = {**dict(env or {}), **dict(config.env)}
    if config.gpus_per_node > 0:
        variables.setdefault("DAFT_EXPECT_GPU", "1")  # a node without CUDA fails at once, not on the CPU
    from_secrets = secret_env(config.secrets, config.secrets_optional)
    secret_vars = {e["name"] for e in from_secrets}  # a secret's variable wins over a plain value (the
    env_list: list[dict[str, Any]] = [  # API refuses a name twice: env is a map keyed by name)
        {"name": k, "value": str(v)} for k, v in sorted(variables.items()) if k not in secret_vars
    ]
    env_list += from_secrets
    trainer: dict[str, Any] = {
        "image": image,
        "command": list(command),
        "env": env_list,
        "numNodes": config.nodes,
        "numProcPerNode": max(config.gpus_per_node, 1),
    }
    resources = node_resources(config)
    if resources:
        trainer["resourcesPerNode"] = resources
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {k: label_value(v) for k, v in sorted((labels or {}).items())},
        },
        "spec": {
            "runtimeRef": {"name": config.runtime, "apiGroup": GROUP, "kind": config.runtime_kind},
            "trainer": trainer,
        },
    }


# --------------------------------------------------------------------------------------------------
# Create, wait, read the verdict (kubernetes CustomObjectsApi)
# --------------------------------------------------------------------------------------------------


def job_outcome(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``("succeeded" | "failed" | "running", why)`` from a job's status conditions."""
    conditions = ((obj.get("status") or {}).get("conditions")) or []
    for c in conditions:
        if c.get("type") in FAILURE_CONDITIONS and str(c.get("status")) == "True":
            reason, message = c.get("reason") or "", c.get("message") or ""
            return "failed", ": ".join(p for p in (reason, message) if p) or "no message"
    for c in conditions:
        if c.get("type") in SUCCESS_CONDITIONS and str(c.get("status")) == "True":
            return "succeeded", c.get("message") or ""
    state = ", ".join(f"{c.get('type')}={c.get('status')}" for c in conditions) or "no conditions yet"
    return "running", state


def _api(api_client: Any = None) -> Any:
    from kubernetes import client, config

    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()  # a workstation: ~/.kube/config
        api_client = client.ApiClient()
    return client.CustomObjectsApi(api_client)


def _api_error(e: Exception, what: str, name: str, namespace: str) -> TrainJobError:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", "") or type(e).__name__
    body = str(getattr(e, "body", "") or "")
    with contextlib.suppress(ValueError, AttributeError):
        body = json.loads(body).get("message", body)
    hint = ""
    if status == 403:
        hint = (
            f"; the launcher's service account may not {what} trainjobs.{GROUP} in {namespace}: add the "
            "Role and RoleBinding of docs/kubeflow.md"
        )
    elif status == 404:
        hint = f"; is Kubeflow Trainer v2 installed (the {PLURAL}.{GROUP} CRD)? See docs/kubeflow.md"
    code = f"HTTP {status} " if status else ""
    return TrainJobError(f"cannot {what} TrainJob {namespace}/{name}: {code}{reason} {body}".strip() + hint)


def create_or_attach(api: Any, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Create the TrainJob; if one of that name exists (a retried launcher), attach to it, unless it failed:
    then delete it and create it again, so a retry retrains."""
    from kubernetes.client.exceptions import ApiException

    name, ns = spec["metadata"]["name"], spec["metadata"]["namespace"]
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, dict(spec))
    except ApiException as e:
        if e.status != 409:
            raise _api_error(e, "create", name, ns) from None
    existing = get_job(api, name, ns)
    outcome, why = job_outcome(existing)
    if outcome != "failed":
        log.info("TrainJob %s/%s exists (%s): waiting for it", ns, name, outcome)
        return existing
    log.warning("TrainJob %s/%s exists and failed (%s): deleting it and starting again", ns, name, why)
    delete_job(api, name, ns)
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, dict(spec))
    except ApiException as e:
        raise _api_error(e, "create", name, ns) from None


def get_job(api: Any, name: str, namespace: str) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        raise _api_error(e, "read", name, namespace) from None


def delete_job(api: Any, name: str, namespace: str) -> None:
    """Delete the job and (background propagation) its pods; one already gone is fine."""
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
        )
    except ApiException as e:
        if e.status != 404:
            raise _api_error(e, "delete", name, namespace) from None


def wait_for_job(
    api: Any,
    name: str,
    namespace: str,
    timeout: float,
    poll: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    delete_on_timeout: bool = True,
) -> dict[str, Any]:
    """Poll until the job succeeds (its object returned), fails (:class:`TrainJobFailed`) or `timeout`
    seconds pass (:class:`TrainJobTimeout`; the job is deleted so it frees its GPUs)."""
    deadline = clock() + timeout
    last = ""
    while True:
        obj = get_job(api, name, namespace)
        outcome, why = job_outcome(obj)
        if outcome == "succeeded":
            log.info("TrainJob %s/%s succeeded", namespace, name)
            return obj
        if outcome == "failed":
            raise TrainJobFailed(
                f"TrainJob {namespace}/{name} failed: {why}. See its pods' logs: kubectl -n {namespace} logs "
                f"-l jobset.sigs.k8s.io/jobset-name={name} --tail 100"
            )
        if why != last:
            log.info("TrainJob %s/%s: %s", namespace, name, why)
            last = why
        if clock() >= deadline:
            if delete_on_timeout:
                delete_job(api, name, namespace)
            raise TrainJobTimeout(
                f"TrainJob {namespace}/{name} reached no verdict within {timeout:g} s (last: {why})"
                + ("; it was deleted" if delete_on_timeout else "")
                + ". Raise finetune.timeout, or check that the runtime exists and that the cluster has "
                f"{'GPU ' if 'gpu' in json.dumps(obj).lower() else ''}nodes to schedule it on "
                f"(kubectl -n {namespace} describe trainjob {name})"
            )
        sleep(poll)


# --------------------------------------------------------------------------------------------------
# Moving folders through S3
# --------------------------------------------------------------------------------------------------


def put_tree(local_dir: str | os.PathLike[str], uri_prefix: str, workers: int = 8) -> dict[str, str]:
    """Upload every file under `local_dir` to ``<uri_prefix>/<relative path>``, then the marker
    (:data:`COMPLETE_MARKER`: the files and their sha256) last, so a reader never takes a partial upload
    for a whole one. Returns {relative path: sha256}."""
    from components import storage

    root = Path(local_dir)
    if not root.is_dir():
        raise TrainJobError(f"cannot upload {root}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    hashes = storage.tree_hashes(root, files)
    prefix = uri_prefix.rstrip("/")

    def put(p: Path) -> None:
        storage.put_file(p, f"{prefix}/{p.relative_to(root).as_posix()}")

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files) or 1))) as pool:
        list(pool.map(put, files))
    marker = root.parent / f".{root.name}.{COMPLETE_MARKER}"
    marker.write_text(json.dumps({"files": hashes}, sort_keys=True))
    try:
        storage.put_file(marker, f"{prefix}/{COMPLETE_MARKER}")
    finally:
        marker.unlink(missing_ok=True)
    return hashes


def fetch_complete_tree(uri_prefix: str, dest: str | os.PathLike[str]) -> dict[str, str]:
    """Download what :func:`put_tree` uploaded to `uri_prefix` into the new folder `dest` (replaced whole,
    never half-written), checking every file against the marker. TrainJobError if the upload is not whole."""
    from components import storage

    prefix = uri_prefix.rstrip("/")
    dest = Path(dest)
    part = dest.parent / f".{dest.name}.download"
    shutil.rmtree(part, ignore_errors=True)
    try:
        if not storage.exists(f"{prefix}/{COMPLETE_MARKER}"):
            raise TrainJobError(
                f"{prefix}: no {COMPLETE_MARKER}, so no whole upload there (the job's node 0 writes it last, "
                "after the model); see the job's logs"
            )
        storage.fetch_tree(prefix, part)
        expected = json.loads((part / COMPLETE_MARKER).read_text())["files"]
        (part / COMPLETE_MARKER).unlink()
        got = storage.tree_hashes(part, [p for p in part.rglob("*") if p.is_file()])
        missing = sorted(set(expected) - set(got))
        changed = sorted(k for k in expected if k in got and got[k] != expected[k])
        if missing or changed:
            raise TrainJobError(
                f"{prefix}: the download does not match its marker (missing {missing}, changed {changed}); "
                "was the prefix written by two jobs at once?"
            )
        for extra in sorted(set(got) - set(expected)):  # a leftover of an earlier upload: not ours
            (part / extra).unlink()
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(part, dest)
        return expected
    finally:
        shutil.rmtree(part, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The launcher (the KFP task's body: pipelines.components.finetune_trainjob)
# --------------------------------------------------------------------------------------------------


def pod_namespace() -> str:
    """The launcher pod's namespace: ``DAFT_POD_NAMESPACE`` (downward API), else the service account's."""
    ns = os.environ.get(NAMESPACE_ENV, "").strip()
    if not ns and Path(SA_NAMESPACE_FILE).is_file():
        ns = Path(SA_NAMESPACE_FILE).read_text().strip()
    if not ns:
        raise TrainJobError(
            f"cannot tell the namespace for the TrainJob: set finetune.namespace in the platform file "
            f"(or {NAMESPACE_ENV})"
        )
    return ns


def job_env(tracking_uri: str) -> dict[str, str]:
    """The variables the launcher hands on to every node: the tracking server, the KFP run id (so the
    node's MLflow run hangs under the pipeline's parent run) and the resume store."""
    env = {}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    for var in ("DAFT_PIPELINE_RUN_ID", "DAFT_RESUME_URI", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
        value = os.environ.get(var, "").strip()
        if value and var not in env:
            env[var] = value
    return env


def run_launcher(
    config: TrainJobConfig,
    params: Any,
    method: str,
    dataset_dir: str,
    start_dir: str,
    model_dir: str,
    tracking_uri: str = "",
    *,
    image: str | None = None,
    api_client: Any = None,
    run_id: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Stage the inputs, run the TrainJob to its end, fetch its model into `model_dir`; the summary the
    in-pod task would return (method, lrs, best epoch / val accuracy, version, the job's name and prefix)."""
    from components.finetune import point_key
    from components.params import params_to_json

    if not config.enabled or not config.results_uri:
        raise TrainJobError("run_launcher needs finetune.launcher: trainjob and finetune.results_uri")
    recipe = params.recipe(method)
    point = point_key(recipe)
    run_id = run_id or os.environ.get("DAFT_PIPELINE_RUN_ID", "").strip() or "no-run-id"
    prefix = job_prefix(config.results_uri, run_id, method, point)
    name = job_name(run_id, method, point)
    namespace = config.namespace or pod_namespace()
    image = image or config.image
    if not image:
        raise TrainJobError("no image for the TrainJob: set finetune.image (the pipeline fills in its own)")
    api = _api(api_client)

    log.info("staging the inputs under %s", prefix)
    put_tree(dataset_dir, f"{prefix}/inputs/data")
    put_tree(start_dir, f"{prefix}/inputs/model")
    command = container_command(config, prefix, params_to_json(params), method)
    labels = {f"{LABEL_PREFIX}/run-id": run_id, f"{LABEL_PREFIX}/method": method}
    spec = trainjob_spec(
        config, name=name, namespace=namespace, image=image, command=command, env=job_env(tracking_uri),
        labels=labels,
    )  # fmt: skip
    log.info(
        "TrainJob %s/%s: %d node(s) x %d GPU(s), runtime %s, image %s",
        namespace, name, config.nodes, config.gpus_per_node, config.runtime, image,
    )  # fmt: skip
    create_or_attach(api, spec)
    wait_for_job(api, name, namespace, config.timeout, config.poll_interval, sleep=sleep)
    fetch_complete_tree(f"{prefix}/model", model_dir)
    summary_path = Path(model_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(
        method=method,
        head_lr=recipe.head_lr,
        backbone_lr=recipe.backbone_lr,
        trainjob=f"{namespace}/{name}",
        results_prefix=prefix,
    )
    if params.pipeline.tracking:
        summary.update(find_run(params.pipeline.experiment, run_id, method, recipe))
    summary.setdefault("registered_version", None)
    return summary


def find_run(experiment: str, run_id: str, method: str, recipe: Any) -> dict[str, Any]:
    """The job's MLflow finetune run (by the KFP run id, step and method; in a sweep, by its learning
    rates too) and its registered version: ``mlflow_run_id``, ``registered_version``. Best effort: {} and a
    warning when it cannot be told (the evaluate step then records no version)."""
    try:
        import mlflow

        from components.tracking.identity import METHOD_TAG, PARENT_TAG, STEP_TAG

        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise LookupError(f"no experiment {experiment!r}")
        runs = client.search_runs(
            [exp.experiment_id],
            f"tags.`{PARENT_TAG}` = '{run_id}' and tags.`{STEP_TAG}` = 'finetune' "
            f"and tags.`{METHOD_TAG}` = '{method}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        want = (float(recipe.head_lr), float(recipe.backbone_lr))

        def lrs(r: Any) -> tuple[float, float] | None:
            p = r.data.params
            try:
                return float(p["recipe.head_lr"]), float(p["recipe.backbone_lr"])
            except (KeyError, ValueError):
                return None

        matching = [r for r in runs if lrs(r) in (want, None)]
        if not matching:
            raise LookupError(f"no finished finetune run of {method} in run {run_id}")
        run = matching[0]
        version = run.data.tags.get("daft.model_version.finetune")
        return {"mlflow_run_id": run.info.run_id, "registered_version": version}
    except Exception as e:  # best effort: the model itself is already fetched
        log.warning("could not find the TrainJob's MLflow run (%s); the version stays unrecorded", e)
        return {}


# --------------------------------------------------------------------------------------------------
# The node wrapper (every node's container: `python -m pipelines.trainjob node ... -- torchrun ...`)
# --------------------------------------------------------------------------------------------------


def node_rank() -> int:
    """This node's rank: torchrun's ``PET_NODE_RANK`` (Trainer v2), else the Job's completion index."""
    for var in ("PET_NODE_RANK", "JOB_COMPLETION_INDEX"):
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def run_node(
    data_uri: str, model_uri: str, out_uri: str, workdir: str | os.PathLike[str], command: Sequence[str]
) -> int:
    """Download the inputs into `workdir`, run `command` (torchrun), and on node 0, after it succeeded,
    upload ``<workdir>/model`` to `out_uri`. Returns the command's exit status (SIGTERM is passed on)."""
    from components import storage

    work = Path(workdir)
    inputs = work / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)  # a restarted container starts from the store
    storage.fetch_tree(data_uri, inputs / "data")
    storage.fetch_tree(model_uri, inputs / "model")
    (inputs / "data" / COMPLETE_MARKER).unlink(missing_ok=True)
    (inputs / "model" / COMPLETE_MARKER).unlink(missing_ok=True)
    rank = node_rank()
    log.info("node %d: running %s", rank, " ".join(command[:6]))
    proc = subprocess.Popen(list(command))
    # The pod's SIGTERM (deletion, deadline) reaches torchrun, which stops its workers (main thread only).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)) if main else None
    try:
        code = proc.wait()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if code != 0:
        log.error("node %d: the training command exited with %d", rank, code)
        return code
    if rank == 0:
        out = work / "model"
        if not (out / "model.pt").is_file():
            log.error("node 0: the training command succeeded but wrote no %s", out / "model.pt")
            return 1
        put_tree(out, out_uri)
        log.info("node 0: uploaded %s to %s", out, out_uri)
    return 0


def _node_main(argv: Sequence[str] | None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.trainjob node", description=run_node.__doc__)
    p.add_argument("--data-uri", required=True)
    p.add_argument("--model-uri", required=True)
    p.add_argument("--out-uri", required=True)
    p.add_argument("--workdir", default=JOB_WORKDIR)
    p.add_argument("command", nargs=argparse.REMAINDER, help="after --: the training command")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ValueError("no training command after --")
    code = run_node(args.data_uri, args.model_uri, args.out_uri, args.workdir, command)
    if code:
        raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.trainjob node ...`` with the steps' error convention (one ``error:`` line)."""
    from components.common import cli

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["node"]:
        print("usage: python -m pipelines.trainjob node --data-uri ... -- torchrun ...", file=sys.stderr)
        return 2
    return cli(_node_main)(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
