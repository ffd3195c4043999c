"""`python -m pipelines <command>` (console script `daft-pipelines`): compile, run-local, submit.

    compile     the pipeline (or the sweep pipeline) to a deterministic YAML package
    run-local   the whole DAG here with kfp.local.SubprocessRunner(use_venv=False); the outputs land where
                `dvc repro` puts them (metrics/methods/*.json, reports/) under --out
    submit      compile and create a run on a Kubeflow Pipelines host (kfp.Client; KF_PIPELINES_ENDPOINT);
                with tracking on, refused (before contacting the host) without an MLflow tracking server

Exit status: 0 on success, 2 on a usage / connection / authentication / pipeline error (one clear line,
credentials masked), 130 on Ctrl-C, 1 on an unexpected error (a bug: traceback shown).

A tracking URI carrying credentials (``http://user:pass@host``, ``?token=...``) is refused: the compiled YAML,
the run's arguments on the Kubeflow server and kfp.local's files would store it in plain text. The steps
read MLflow credentials from the ``daft-mlflow-credentials`` Kubernetes secret
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, wired as environment variables).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines import DEFAULT_IMAGE

log = logging.getLogger("pipelines")

HOST_ENV = "KF_PIPELINES_ENDPOINT"  # the variable kfp.Client itself reads
TOKEN_ENV = "KF_PIPELINES_TOKEN"  # ours: keeps the token out of the process list / shell history
DEFAULT_PACKAGE = "daft_pipeline.yaml"
HEALTHZ_PATH = "/apis/v2beta1/healthz"
PLATFORM_SECTIONS = {"resources", "gpu", "secrets", "retries", "sweep", "caching", "data"}
DATA_PVC_MOUNT = "/data"  # the platform file's `data.mount_path` default


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
        "--image", default=os.environ.get("DAFT_IMAGE", DEFAULT_IMAGE), help="base image (%(default)s)"
    )
    g.add_argument("--tracking-uri", default="", help="default of the tracking_uri pipeline parameter")
    g.add_argument(
        "--platform", default=None, metavar="YAML", help="resources / gpu / secrets / retries / sweep"
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
    g.add_argument("--sweep-parallelism", type=int, default=0, help="max sweep points at once (0: all)")


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CliError(f"{path} not found")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise CliError(f"{path} must hold a mapping")
    unknown = set(data) - PLATFORM_SECTIONS
    if unknown:
        raise CliError(f"{path}: unknown section(s) {sorted(unknown)}; known: {sorted(PLATFORM_SECTIONS)}")
    return data


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
    from pipelines.pipeline import DEFAULT_SWEEP, PipelineOptions, merge_resources

    refuse_credentials(args.tracking_uri, "--tracking-uri", local=local)
    platform = _load_yaml(args.platform) if args.platform else {}
    gpu = platform.get("gpu") or {}
    retries = platform.get("retries") or {}
    kw: dict[str, Any] = {
        "image": args.image,
        "sweep": args.sweep,
        "sweep_grid": {**DEFAULT_SWEEP, **(platform.get("sweep") or {})},
        "sweep_parallelism": args.sweep_parallelism,
        "tracking_uri": args.tracking_uri,
        "resources": merge_resources(platform.get("resources")),
        "gpu": args.gpu and gpu.get("enabled", True),
        "local": local,
    }
    if "secrets" in platform:
        kw["secrets"] = platform["secrets"] or {}
    for src, dst in (("type", "gpu_type"), ("count", "gpu_count"), ("steps", "gpu_steps")):
        if src in gpu:
            kw[dst] = gpu[src]
    if "node_selector" in gpu:
        kw["gpu_node_selector"] = gpu["node_selector"]
    if args.gpu_type:
        kw["gpu_type"] = args.gpu_type
    if args.gpu_count is not None:
        kw["gpu_count"] = args.gpu_count
    for src, dst in (("count", "retries"), ("backoff", "backoff_duration"), ("factor", "backoff_factor")):
        if src in retries:
            kw[dst] = retries[src]
    if "max_backoff" in retries:
        kw["backoff_max_duration"] = retries["max_backoff"]
    if args.retries is not None:
        kw["retries"] = args.retries
    elif local:
        kw["retries"] = 0  # fail fast on this machine; a cluster retries (pod evictions, flaky nodes)
    if "caching" in platform:
        kw["caching"] = bool(platform["caching"])
    if platform.get("data") is not None:
        kw["data_pvc"] = _data_pvc(platform["data"], args.platform)
    if args.cache is not None:
        kw["caching"] = args.cache
    try:
        return PipelineOptions(**kw)
    except TypeError as e:
        raise CliError(f"invalid platform settings: {e}") from None


def _data_pvc(section: Any, path: str) -> dict[str, str]:
    """The platform file's ``data: {pvc: NAME, mount_path: /data}`` as PipelineOptions.data_pvc."""
    from pipelines.pipeline import check_data_pvc

    where = f"{path}: data"
    if not isinstance(section, Mapping):
        raise CliError(f"{where} must be a mapping like {{pvc: my-data, mount_path: {DATA_PVC_MOUNT}}}")
    unknown = set(section) - {"pvc", "mount_path"}
    if unknown:
        raise CliError(f"{where}: unknown key(s) {sorted(unknown)}; known: ['mount_path', 'pvc']")
    if "pvc" not in section:
        raise CliError(f"{where}: `pvc` (the PersistentVolumeClaim holding the data) is required")
    pvc = {"name": section["pvc"], "mount_path": section.get("mount_path", DATA_PVC_MOUNT)}
    try:
        check_data_pvc(pvc)
    except ValueError as e:
        raise CliError(f"{where}: {e}") from None
    return pvc


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
) -> dict[str, Any]:
    """Run the whole DAG with kfp.local's SubprocessRunner (this interpreter, no venv, no containers).

    Copies the report step's output to `out_dir` in DVC's layout (metrics/methods/*.json, reports/, and
    metrics/sweep.json for a sweep) and returns reports/summary.json.
    """
    from kfp import local

    from pipelines.pipeline import build_pipeline

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    _project_on_pythonpath()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=cache,
    )
    pipeline = build_pipeline(params, replace(opts, local=True))
    with warnings.catch_warnings():
        # The base image is irrelevant here (the subprocess runs this interpreter); resources are left out.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        try:
            task = pipeline(**dict(arguments or {}))
        except RuntimeError as e:
            raise CliError(f"local pipeline run failed: {e}") from None
    report_dir = Path(task.output.path)
    out = Path(out_dir)
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
    summary = run_local(
        params,
        opts,
        pipeline_root=args.pipeline_root,
        out_dir=args.out,
        arguments=arguments,
        cache=bool(args.cache),
    )
    print(
        f"local run finished: champion {summary['champion']} "
        f"(ID val {summary['champion_id_val_accuracy']:.4f}); outputs in {Path(args.out).resolve()}"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# submit
# --------------------------------------------------------------------------------------------------


def check_host(host: str, token: str | None, timeout: float = 10.0) -> None:
    """One GET of the KFP healthz endpoint, so an unreachable host or a refused token fails in seconds.

    (kfp.Client itself retries healthz 5 times, 5 s apart, and then raises a bare TimeoutError.)
    """
    url = host.rstrip("/") + HEALTHZ_PATH
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise CliError(
                f"authentication failed at Kubeflow Pipelines host {host} (HTTP {e.code}); pass a valid "
                f"--token (or {TOKEN_ENV}) for that host"
            ) from None
        raise CliError(f"Kubeflow Pipelines host {host} answered HTTP {e.code} on {HEALTHZ_PATH}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise CliError(
            f"cannot reach Kubeflow Pipelines host {host} ({reason}); check --host (or {HOST_ENV}), "
            "the port-forward / ingress, and the network"
        ) from None


def submit(
    package: str,
    *,
    host: str,
    token: str | None,
    namespace: str | None,
    experiment: str,
    run_name: str,
    arguments: Mapping[str, Any],
    pipeline_root: str | None = None,
    service_account: str | None = None,
) -> str:
    """Create a run of `package` on `host`; returns the run id."""
    import kfp
    from kfp_server_api.exceptions import ApiException

    check_host(host, token)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "This client only works with KFP v2.0.0-beta.2+"
        try:
            client = kfp.Client(host=host, existing_token=token or None, namespace=namespace or "kubeflow")
            result = client.create_run_from_pipeline_package(
                package,
                arguments=dict(arguments),
                run_name=run_name,
                experiment_name=experiment,
                namespace=namespace or None,
                pipeline_root=pipeline_root,
                service_account=service_account,
            )
        except ApiException as e:
            if e.status in (401, 403):
                raise CliError(
                    f"authentication failed at Kubeflow Pipelines host {host} (HTTP {e.status}): {e.reason}"
                ) from None
            raise CliError(
                f"Kubeflow Pipelines host {host} refused the run (HTTP {e.status}): {e.body}"
            ) from None
        except TimeoutError as e:
            raise CliError(f"cannot reach Kubeflow Pipelines host {host} ({e})") from None
    return result.run_id


TRACKING_SERVER_EXAMPLE = "http://mlflow.mlflow.svc.cluster.local:5000"


URI_ENV = "MLFLOW_TRACKING_URI"


def _package_docs(package: str) -> list[Any]:
    import yaml

    try:
        return [d for d in yaml.safe_load_all(Path(package).read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError):
        return []


def _package_defaults(docs: list[Any]) -> dict[str, Any]:
    """The pipeline parameters' defaults compiled into a package ({} when it has none)."""
    try:
        parameters = docs[0]["root"]["inputDefinitions"]["parameters"]
        return {k: v["defaultValue"] for k, v in parameters.items() if "defaultValue" in v}
    except (IndexError, KeyError, TypeError, AttributeError):
        return {}


def _package_secret_envs(docs: list[Any]) -> set[str]:
    """The environment variables a package's steps get from Kubernetes secrets."""
    try:
        executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        return {
            k.get("envVar", "")
            for ex in executors.values()
            for secret in ex.get("secretAsEnv", [])
            for k in secret.get("keyToEnv", [])
        }
    except (IndexError, KeyError, TypeError, AttributeError):
        return set()


def require_tracking_server(
    args: argparse.Namespace, params: Any, opts: Any, arguments: dict[str, Any]
) -> None:
    """CliError when the run would track to no server: with tracking on (the `tracking` parameter, else
    the package's default, else params' ``pipeline.tracking``), the tracking URI (``--param tracking_uri``,
    else ``--tracking-uri``, else the package's default) must be an http(s) or Databricks server, or, left
    empty, the pods must get ``MLFLOW_TRACKING_URI`` from a secret (the platform file's ``secrets:``).
    Otherwise each pod would log to its own sqlite store, lost with the pod (and the steps refuse to start).

    With ``--package``, ``--tracking-uri`` is passed as the ``tracking_uri`` argument (it cannot change
    the compiled default).
    """
    from components.tracking.identity import is_server_uri
    from components.tracking.retries import redact_uri

    docs = _package_docs(args.package) if args.package else []
    defaults = _package_defaults(docs)
    if args.package and args.tracking_uri and "tracking_uri" not in arguments:
        arguments["tracking_uri"] = args.tracking_uri
    tracking = arguments.get("tracking", defaults.get("tracking", params.pipeline.tracking))
    if not tracking:
        return
    if "tracking_uri" in arguments:
        uri, where = str(arguments["tracking_uri"] or ""), "--param tracking_uri"
    elif args.tracking_uri:
        uri, where = args.tracking_uri, "--tracking-uri"
    else:
        uri, where = str(defaults.get("tracking_uri") or ""), "the package's tracking_uri"
    if is_server_uri(uri):
        return
    if not uri.strip():
        envs = (
            _package_secret_envs(docs)
            if args.package
            else {env for keys in opts.secrets.values() for env in keys.values()}
        )
        if URI_ENV in envs:
            return  # the pods' own MLFLOW_TRACKING_URI, from a secret (the steps check it is a server)
    given = f"{where} {redact_uri(uri)} is a local store" if uri.strip() else "no tracking server is given"
    raise CliError(
        f"tracking is on but {given}: each pod would log to its own store, lost when the pod ends (and "
        f"the steps refuse to start). Fix: pass --param tracking_uri={TRACKING_SERVER_EXAMPLE} (or "
        f"--tracking-uri; or map {URI_ENV} from a secret in the platform file), or turn tracking off with "
        "--param tracking=false"
    )


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.pipeline import build_pipeline, compile_pipeline

    host = args.host or os.environ.get(HOST_ENV)
    if not host:
        raise CliError(f"no Kubeflow Pipelines host: pass --host URL or set {HOST_ENV}")
    token = args.token or os.environ.get(TOKEN_ENV)
    params = load_params_for(args)
    opts = build_options(args)
    signature = inspect.signature(build_pipeline(params, opts).pipeline_func)
    arguments = parse_pipeline_args(args.param, signature)
    require_tracking_server(args, params, opts, arguments)  # before contacting the host
    with tempfile.TemporaryDirectory(prefix="daft-kfp-") as tmp:
        package = args.package or compile_pipeline(params, opts, str(Path(tmp) / DEFAULT_PACKAGE))
        run_name = args.run_name or f"{params.pipeline.experiment}-{'sweep' if args.sweep else 'run'}"
        run_id = submit(
            package,
            host=host,
            token=token,
            namespace=args.namespace,
            experiment=args.experiment or params.pipeline.experiment,
            run_name=run_name,
            arguments=arguments,
            pipeline_root=args.pipeline_root,
            service_account=args.service_account,
        )
    print(f"submitted run {run_id} ({run_name}) to {host}")
    return 0


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
    r.set_defaults(func=cmd_run_local)

    s = sub.add_parser("submit", help="create a run on a Kubeflow Pipelines host")
    _add_build_options(s)
    s.add_argument("--host", default=None, help=f"KFP API endpoint (default ${HOST_ENV})")
    s.add_argument("--token", default=None, help=f"bearer token (default ${TOKEN_ENV})")
    s.add_argument("--namespace", default=None, help="Kubernetes namespace (multi-user deployments)")
    s.add_argument("--experiment", default=None, help="KFP experiment (default: pipeline.experiment)")
    s.add_argument("--run-name", default=None, help="run display name")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="pipeline argument")
    s.add_argument("--package", default=None, help="submit this compiled YAML instead of compiling")
    s.add_argument("--pipeline-root", default=None, help="artifact root (default: the deployment's)")
    s.add_argument("--service-account", default=None, help="Kubernetes service account for the run")
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
