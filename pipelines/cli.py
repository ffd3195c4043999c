"""`python -m pipelines <command>` (console script `daft-pipelines`): compile, run-local, submit.

    compile     the pipeline (or the sweep pipeline) to a deterministic YAML package
    run-local   the whole DAG here with kfp.local.SubprocessRunner(use_venv=False); the outputs land where
                `dvc repro` puts them (metrics/methods/*.json, reports/) under --out
    submit      compile and create a run on a Kubeflow Pipelines host (kfp.Client; KF_PIPELINES_ENDPOINT);
                with tracking on, refused (before contacting the host) without an MLflow tracking server;
                --pipeline-name uploads a pipeline version, --wait follows the run (pipelines/submit.py)

Exit status: 0 on success, 2 on a usage / connection / authentication / pipeline error (one clear line,
credentials masked), 130 on Ctrl-C, 1 on an unexpected error (a bug: traceback shown), 3 when
`submit --wait` sees the run end other than SUCCEEDED.

A tracking URI carrying credentials (``http://user:pass@host``, ``?token=...``) is refused: the compiled YAML,
the run's arguments on the Kubeflow server and kfp.local's files would store it in plain text. The steps
read MLflow credentials from the ``daft-mlflow-credentials`` Kubernetes secret
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, wired as environment variables).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines import DEFAULT_CUDA_IMAGE, DEFAULT_IMAGE

log = logging.getLogger("pipelines")

HOST_ENV = "KF_PIPELINES_ENDPOINT"  # the variable kfp.Client itself reads
TOKEN_ENV = "KF_PIPELINES_TOKEN"  # ours: keeps the token out of the process list / shell history
DEFAULT_PACKAGE = "daft_pipeline.yaml"
HEALTHZ_PATH = "/apis/v2beta1/healthz"
IMAGE_ENV = "DAFT_IMAGE"  # an explicit base image, like --image


class CliError(RuntimeError):
    """A user-facing failure: printed as one `error:` line, exit status 2."""


# --------------------------------------------------------------------------------------------------
# Options shared by every command
# --------------------------------------------------------------------------------------------------


def _add_build_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline")
    g.add_argument("--params", default="params.yaml", help="params file giving the defaults (%(default)s)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value of it")
    g.add_argument("--sweep", action="store_true", help="the learning-rate sweep pipeline (ParallelFor)")
    g.add_argument(
        "--image",
        default=None,
        help=f"base image (default ${IMAGE_ENV}, else {DEFAULT_CUDA_IMAGE} with GPUs, {DEFAULT_IMAGE} "
        "with --no-gpu); a CPU image (tag ...-cpu) with GPUs is refused",
    )
    g.add_argument("--tracking-uri", default="", help="default of the tracking_uri pipeline parameter")
    g.add_argument(
        "--platform",
        default=None,
        metavar="YAML",
        help="platform settings: resources, gpu, secrets, retries, node_selector, tolerations, timeouts, "
        "... (docs/kubeflow.md)",
    )
    g.add_argument(
        "--gpu", action=argparse.BooleanOptionalAction, default=True, help="GPU for finetune + probe"
    )
    g.add_argument("--gpu-type", default=None, help="accelerator type (default nvidia.com/gpu)")
    g.add_argument("--gpu-count", type=int, default=None, help="accelerators per GPU step (default 1)")
    g.add_argument("--retries", type=int, default=None, help="retries per task (default 2; run-local: 0)")
    g.add_argument(
        "--cache", action=argparse.BooleanOptionalAction, default=None, help="task caching (default on)"
    )
    g.add_argument(
        "--sweep-parallelism",
        type=int,
        default=None,
        help="max sweep points of a method at once, >= 1 (default: the platform file's, else 4)",
    )


def _load_yaml(path: str) -> dict[str, Any]:
    """The platform file, validated (pipelines.platform: unknown keys, types and step names are errors)."""
    import yaml

    from pipelines.platform import PlatformError, validate_platform

    p = Path(path)
    if not p.is_file():
        raise CliError(f"{path} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise CliError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    try:
        return validate_platform(data, path)
    except PlatformError as e:
        raise CliError(str(e)) from None


MLFLOW_SECRET = "daft-mlflow-credentials"


def refuse_credentials(uri: str, where: str, *, local: bool = False) -> None:
    """CliError when the tracking URI `uri` (given as `where`) carries credentials."""
    from components.tracking.redaction import has_credentials
    from components.tracking.retries import redact_uri

    if not uri or not has_credentials(uri):
        return
    if local:
        fix = (
            "export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead"
        )
    else:
        fix = (
            f"put them in the Kubernetes secret `{MLFLOW_SECRET}` (keys MLFLOW_TRACKING_USERNAME, "
            "MLFLOW_TRACKING_PASSWORD; every step already reads it as environment variables)"
        )
    raise CliError(
        f"{where} {redact_uri(uri)} contains credentials, which would be stored in plain text in the "
        f"pipeline; pass the URI without them and {fix}"
    )


def build_options(args: argparse.Namespace, *, local: bool = False):  # -> PipelineOptions
    from pipelines.pipeline import (
        DEFAULT_SWEEP,
        DEFAULT_SWEEP_PARALLELISM,
        PipelineOptions,
        merge_resources,
    )
    from pipelines.platform import DATA_PVC_MOUNT

    refuse_credentials(args.tracking_uri, "--tracking-uri", local=local)
    platform = _load_yaml(args.platform) if args.platform else {}
    gpu = platform.get("gpu") or {}
    retries = platform.get("retries") or {}
    kw: dict[str, Any] = {
        # None: PipelineOptions picks the CUDA build with GPUs, the CPU build without
        "image": args.image or os.environ.get(IMAGE_ENV) or None,
        "image_has_cuda": gpu.get("image_has_cuda"),
        "sweep": args.sweep,
        "sweep_grid": {**DEFAULT_SWEEP, **(platform.get("sweep") or {})},
        "sweep_parallelism": (
            args.sweep_parallelism
            if args.sweep_parallelism is not None
            else platform.get("sweep_parallelism") or DEFAULT_SWEEP_PARALLELISM
        ),
        "tracking_uri": args.tracking_uri,
        "resources": merge_resources(platform.get("resources")),
        "gpu": args.gpu and gpu.get("enabled", True),
        "local": local,
    }
    settings = (
        "node_selector",
        "tolerations",
        "image_pull_secrets",
        "timeouts",
        "scratch",
        "resume_uri",
        "finetune",  # the launcher option: a TrainJob per fine-tune (pipelines/trainjob.py)
    )
    for section in settings:
        if platform.get(section):
            kw[section] = platform[section]
    if "secrets" in platform:
        kw["secrets"] = platform["secrets"] or {}
    for src, dst in (
        ("type", "gpu_type"),
        ("count", "gpu_count"),
        ("steps", "gpu_steps"),
        ("node_selector", "gpu_node_selector"),
    ):
        if gpu.get(src) is not None:
            kw[dst] = gpu[src]
    if args.gpu_type:
        kw["gpu_type"] = args.gpu_type
    if args.gpu_count is not None:
        kw["gpu_count"] = args.gpu_count
    for src, dst in (
        ("count", "retries"),
        ("backoff", "backoff_duration"),
        ("factor", "backoff_factor"),
        ("max_backoff", "backoff_max_duration"),
    ):
        if retries.get(src) is not None:
            kw[dst] = retries[src]
    if args.retries is not None:
        kw["retries"] = args.retries
    elif local:
        kw["retries"] = 0  # fail fast on this machine; a cluster retries (pod evictions, flaky nodes)
    if platform.get("caching") is not None:
        kw["caching"] = platform["caching"]
    if platform.get("data") is not None:  # validated: {pvc, mount_path}
        data = platform["data"]
        kw["data_pvc"] = {"name": data["pvc"], "mount_path": data.get("mount_path", DATA_PVC_MOUNT)}
    if args.cache is not None:
        kw["caching"] = args.cache
    try:
        return PipelineOptions(**kw)
    except (TypeError, ValueError) as e:
        raise CliError(f"invalid platform settings: {e}" if isinstance(e, TypeError) else str(e)) from None


def load_params_for(args: argparse.Namespace):  # -> Params
    from components.params import load_params, parse_overrides

    return load_params(args.params, parse_overrides(args.set))


def parse_pipeline_args(
    pairs: Sequence[str], signature: inspect.Signature, *, local: bool = False
) -> dict[str, Any]:
    """`--param k=v` against the pipeline's parameters: strings stay strings, others are parsed as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise CliError(f"--param {pair!r} must look like name=value")
        name, raw = (s.strip() for s in pair.split("=", 1))
        if name not in signature.parameters:
            known = ", ".join(signature.parameters)
            raise CliError(f"--param {name!r} is not a pipeline parameter; parameters: {known}")
        annotation = signature.parameters[name].annotation
        if annotation is str:
            out[name] = raw
            continue
        value = yaml.safe_load(raw)
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if annotation is not Any and not isinstance(value, annotation):
            raise CliError(f"--param {name}: expected {annotation.__name__}, got {raw!r}")
        out[name] = value
    if isinstance(out.get("tracking_uri"), str):
        refuse_credentials(out["tracking_uri"], "--param tracking_uri", local=local)
    return out


# --------------------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------------------


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.pipeline import compile_pipeline

    params = load_params_for(args)
    out = compile_pipeline(params, build_options(args), args.output)
    print(f"compiled {'sweep ' if args.sweep else ''}pipeline to {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# run-local
# --------------------------------------------------------------------------------------------------


def run_local(
    params: Any,
    opts: Any,
    *,
    pipeline_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    arguments: Mapping[str, Any] | None = None,
    cache: bool = False,
    isolated: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run the whole DAG with kfp.local's SubprocessRunner (this interpreter, no venv, no containers).

    Copies the report step's output to `out_dir` in DVC's layout (metrics/methods/*.json, reports/, and
    metrics/sweep.json for a sweep) and returns reports/summary.json. With `isolated` (a pods root outside
    any project), each step runs as in its own pod (`pipelines.local`): own empty working directory, HOME
    and TMPDIR, a pod's environment, the project only as the installed package.
    """
    from kfp import local

    from pipelines.pipeline import build_pipeline

    if isolated is not None:
        from pipelines.local import IsolationError, check_pods_root

        try:
            check_pods_root(Path(isolated).resolve())  # before anything is written
        except IsolationError as e:
            raise CliError(str(e)) from None
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if isolated is None:
        _project_on_pythonpath()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=cache,
    )
    pipeline = build_pipeline(params, replace(opts, local=True))
    with contextlib.ExitStack() as stack:
        stack.enter_context(local_run_id())  # the steps' DAFT_PIPELINE_RUN_ID (no pod label here)
        pods = None
        if isolated is not None:
            from pipelines.local import IsolationError, isolated_steps

            try:
                pods = stack.enter_context(isolated_steps(isolated))
            except IsolationError as e:
                raise CliError(str(e)) from None
        task = _run_pipeline(pipeline, arguments, pods)
    summary = _copy_report(Path(task.output.path), Path(out_dir))
    if pods is not None:
        summary["pods_root"] = str(pods.root)
    return summary


def _run_pipeline(pipeline: Any, arguments: Mapping[str, Any] | None, pods: Any = None) -> Any:
    with warnings.catch_warnings():
        # The base image is irrelevant here (the subprocess runs this interpreter); resources are left out.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        try:
            return pipeline(**dict(arguments or {}))
        except RuntimeError as e:
            if pods is not None and pods.problems:
                raise CliError(f"local pipeline run failed: {'; '.join(pods.problems)}") from None
            raise CliError(f"local pipeline run failed: {e}") from None


def _copy_report(report_dir: Path, out: Path) -> dict[str, Any]:
    """The report artifact in DVC's layout under `out`; returns reports/summary.json."""
    methods = out / "metrics" / "methods"
    methods.mkdir(parents=True, exist_ok=True)
    for f in sorted((report_dir / "metrics" / "methods").glob("*.json")):
        shutil.copy2(f, methods / f.name)
    if (report_dir / "metrics" / "sweep.json").is_file():
        shutil.copy2(report_dir / "metrics" / "sweep.json", out / "metrics" / "sweep.json")
    if (out / "reports").exists():
        shutil.rmtree(out / "reports")
    shutil.copytree(report_dir / "reports", out / "reports")
    summary = json.loads((out / "reports" / "summary.json").read_text())
    summary["report_dir"] = str(report_dir)
    return summary


@contextlib.contextmanager
def local_run_id() -> Iterator[str]:
    """``DAFT_PIPELINE_RUN_ID`` for one local run, in this process's environment while it runs: kfp.local's
    SubprocessRunner starts the steps with it, so they group under one MLflow parent run (on a cluster the
    pods read it from their ``pipeline/runid`` label). A value already set is kept (the caller's choice)."""
    import uuid

    from pipelines.components import PIPELINE_ID_ENV

    before = os.environ.get(PIPELINE_ID_ENV)
    run_id = (before or "").strip() or f"local-{uuid.uuid4().hex}"
    os.environ[PIPELINE_ID_ENV] = run_id
    try:
        yield run_id
    finally:
        if before is None:
            os.environ.pop(PIPELINE_ID_ENV, None)
        else:
            os.environ[PIPELINE_ID_ENV] = before


def _project_on_pythonpath() -> None:
    """Let the step subprocesses import this project from any working directory.

    They run this interpreter (``use_venv=False``), where the project is normally pip-installed; an editable
    install made before a package existed does not map it, so the source root goes on PYTHONPATH too.
    """
    root = str(Path(__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


def cmd_run_local(args: argparse.Namespace) -> int:
    from pipelines.pipeline import build_pipeline

    params = load_params_for(args)
    opts = build_options(args, local=True)
    signature = inspect.signature(build_pipeline(params, replace(opts, local=True)).pipeline_func)
    arguments = parse_pipeline_args(args.param, signature, local=True)
    pods_root, temporary = args.pods_root, False
    if args.isolated and pods_root is None:
        pods_root, temporary = tempfile.mkdtemp(prefix="daft-pods-"), True
    try:
        summary = run_local(
            params,
            opts,
            pipeline_root=args.pipeline_root,
            out_dir=args.out,
            arguments=arguments,
            cache=bool(args.cache),
            isolated=pods_root if args.isolated else None,
        )
    except BaseException:
        if args.isolated:
            log.error("the steps' working directories are kept in %s", pods_root)
        raise
    if temporary:
        shutil.rmtree(pods_root, ignore_errors=True)
    print(
        f"local run finished: champion {summary['champion']} "
        f"(ID val {summary['champion_id_val_accuracy']:.4f}); outputs in {Path(args.out).resolve()}"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# submit (pipelines/submit.py)
# --------------------------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.submit import cmd_submit as submit_command

    return submit_command(args)


# --------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile the pipeline to YAML")
    _add_build_options(c)
    c.add_argument("--output", "-o", default=DEFAULT_PACKAGE, help="YAML package to write (%(default)s)")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run-local", help="run the whole DAG here (kfp.local SubprocessRunner)")
    _add_build_options(r)
    r.add_argument("--pipeline-root", default="kfp_local", help="kfp.local artifact root (%(default)s)")
    r.add_argument("--out", default=".", help="where metrics/methods/ and reports/ go (%(default)s)")
    r.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline argument")
    r.add_argument(
        "--isolated",
        action="store_true",
        help="run each step as in its own pod: an empty working directory, its own HOME and TMPDIR, a pod's "
        "environment (KUBERNETES_SERVICE_HOST set: a local MLflow store is refused), no repository in reach",
    )
    r.add_argument(
        "--pods-root",
        default=None,
        metavar="DIR",
        help="with --isolated: where the steps' folders go, outside any project (default: a temporary "
        "folder, removed after a successful run)",
    )
    r.set_defaults(func=cmd_run_local)

    from pipelines import submit as kfp_submit

    s = sub.add_parser("submit", help="create a run on a Kubeflow Pipelines host")
    _add_build_options(s)
    s.add_argument(
        "--host",
        default=None,
        help=f"KFP API endpoint (default ${HOST_ENV}; in a pod: {kfp_submit.IN_CLUSTER_HOST})",
    )
    s.add_argument(
        "--token",
        default=None,
        help=f"bearer token (default ${TOKEN_ENV}; in a pod: the service account's token)",
    )
    s.add_argument(
        "--cookie",
        default=None,
        help=f"session cookie of an SSO login (Dex) in front of the API, e.g. authservice_session=... "
        f"(default ${kfp_submit.COOKIE_ENV})",
    )
    s.add_argument("--namespace", default=None, help="Kubernetes namespace (multi-user deployments)")
    s.add_argument("--experiment", default=None, help="KFP experiment (default: pipeline.experiment)")
    s.add_argument("--run-name", default=None, help="run display name")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline argument")
    s.add_argument("--package", default=None, help="submit this compiled YAML instead of compiling")
    s.add_argument("--pipeline-root", default=None, help="artifact root (default: the deployment's)")
    s.add_argument("--service-account", default=None, help="Kubernetes service account for the run")
    s.add_argument(
        "--pipeline-name",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="upload the package as a new version of this pipeline (created if missing; NAME defaults to "
        "the pipeline's own name) and run that version (default: the spec inline in the run)",
    )
    s.add_argument(
        "--version-name", default=None, help="with --pipeline-name: the version's name (default: hash-time)"
    )
    s.add_argument(
        "--wait",
        action="store_true",
        help=f"wait for the run to end: exit 0 on SUCCEEDED, {kfp_submit.EXIT_RUN_FAILED} otherwise",
    )
    s.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="with --wait: stop waiting after this"
    )
    s.add_argument(
        "--poll-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="with --wait: seconds between state checks (%(default)s)",
    )
    s.set_defaults(func=cmd_submit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from components.common import (
        EXIT_BUG,
        EXIT_ERROR,
        EXIT_INTERRUPTED,
        describe_error,
        print_error,
        report_bug,
    )
    from components.tracking.redaction import install_log_redaction

    logging.basicConfig(level=os.environ.get("DAFT_LOG_LEVEL", "INFO").upper(), stream=sys.stderr)
    install_log_redaction()
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print_error("interrupted. Fix: rerun the command.")
        return EXIT_INTERRUPTED
    except CliError as e:
        print_error(str(e))
        return EXIT_ERROR
    except Exception as e:
        message = describe_error(e, list(argv) if argv is not None else sys.argv[1:])
        if message is None:
            report_bug(e)
            return EXIT_BUG
        print_error(message)
        return EXIT_ERROR
