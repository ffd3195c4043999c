"""Which tracking store and which pipeline run a step belongs to, derived without talking to anyone.

DVC starts every stage of one ``dvc repro`` as its own process and Kubeflow runs every step in its own pod,
so no process can hand a parent run id to the next. Each step therefore derives the same *pipeline run id*
on its own (:func:`pipeline_run_id`) and finds-or-creates the parent run tagged with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PIPELINE_ID_ENV = "DAFT_PIPELINE_RUN_ID"
PARENT_TAG = "daft.pipeline_run_id"
ROLE_TAG = "daft.role"
STEP_TAG = "daft.step"
METHOD_TAG = "daft.method"
DATA_DIGEST_TAG = "daft.data_digest"
# Directories/files whose uncommitted changes make a different pipeline id (code, not outputs).
SOURCE_PATHS = ("daft_core", "components", "pipelines", "dvc.yaml", "pyproject.toml")
ROOT_MARKERS = ("params.yaml", "dvc.yaml")


def repo_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The nearest directory holding params.yaml or dvc.yaml, from `start` (default cwd) upward; else cwd.

    Searched upward so a step run from a subdirectory still finds the project's store.
    """
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if any((d / m).is_file() for m in ROOT_MARKERS):
            return d
    return here


# `dvc exp run --temp` / `--queue` run the stages in a copy of the repository under this folder of the real
# one, and delete the copy afterwards.
DVC_EXP_WORKSPACES = (".dvc", "tmp", "exps")
DVC_EXP_ENV = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")  # set by DVC for the stages of an experiment


def store_root(start: str | os.PathLike[str] | None = None) -> Path:
    """Where the default tracking store lives: the repo root, or the *real* one when DVC runs the stage in
    a temporary experiment workspace (``dvc exp run --temp`` / ``--queue``).

    Those workspaces are copies at ``<root>/.dvc/tmp/exps/[standalone/]tmpXXXX``, deleted when the
    experiment ends: a store inside one would be deleted with it (runs, registered versions, artifacts
    lost). Detected from the path (DVC 3 layout), or from DVC's environment (``DVC_ROOT`` is the real
    root while ``DVC_EXP_NAME`` is set) when the layout changes.
    """
    root = repo_root(start)
    parts = root.parts
    n = len(DVC_EXP_WORKSPACES)
    for i in range(len(parts) - n, 0, -1):
        if parts[i : i + n] == DVC_EXP_WORKSPACES:
            real = Path(*parts[:i])
            if any((real / m).is_file() for m in ROOT_MARKERS):
                return real
    dvc_root = os.environ.get("DVC_ROOT", "").strip()
    if dvc_root and any(os.environ.get(k) for k in DVC_EXP_ENV):
        real = Path(dvc_root).resolve()
        if real != root and (real / ".dvc") in root.parents:
            return real
    return root


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<store root>/mlflow.db``.

    The default is anchored at the repo root, not the cwd, so every step of a repro shares one store; in a
    DVC experiment's temporary workspace, at the real repository's root (:func:`store_root`), so the
    experiment's runs outlive the workspace.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{(store_root() / 'mlflow.db').as_posix()}"


# A pod's file system goes with the pod: a local store there loses every run, model and alias of the step.
POD_ENV = "KUBERNETES_SERVICE_HOST"  # set by Kubernetes in every container of a pod
ALLOW_LOCAL_ENV = "DAFT_ALLOW_LOCAL_TRACKING"  # "1": a local store in a pod is fine (a persistent volume)
SERVER_SCHEMES = ("http", "https", "databricks")  # stores that outlive the process writing to them
LOCAL_SCHEMES = ("sqlite", "file")  # plus a plain path (no scheme)


def uri_scheme(uri: str) -> str:
    """The URI's scheme, lower case; "" for a plain path (a Windows drive letter is a path too)."""
    text = uri.strip()
    if text.lower() == "databricks":  # MLflow's bare "databricks" (the default profile)
        return "databricks"
    head, sep, _ = text.partition(":")
    if not sep or len(head) <= 1 or not head.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return ""
    return head.lower()


def is_local_store(uri: str) -> bool:
    """A store in this machine's file system: sqlite:, file:, or a plain path (MLflow's file store)."""
    return uri_scheme(uri) in ("", *LOCAL_SCHEMES)


def is_server_uri(uri: str) -> bool:
    """An MLflow tracking server (http(s)://...) or Databricks: a store every pod shares and that stays."""
    return uri_scheme(uri) in SERVER_SCHEMES


def in_pod() -> bool:
    """Running in a Kubernetes pod (Kubernetes sets ``KUBERNETES_SERVICE_HOST`` in every container)."""
    return bool(os.environ.get(POD_ENV, "").strip())


def local_store_allowed() -> bool:
    """``DAFT_ALLOW_LOCAL_TRACKING`` is set to 1 / true / yes / on."""
    return os.environ.get(ALLOW_LOCAL_ENV, "").strip().lower() in ("1", "true", "yes", "on")


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
    """HEAD commit, plus a digest of uncommitted source changes so edited code gets its own parent run.

    Files DVC writes during a repro (``dvc.lock``, data, models, metrics) are deliberately left out:
    otherwise each stage would see a different state and get its own parent.
    """
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
    """The id every step of one pipeline run derives independently, so they group under one parent.

    ``DAFT_PIPELINE_RUN_ID`` when set (Kubeflow sets it to its own run id; a person may set it to keep two
    ``dvc repro`` of the same code and params apart). Else a hex digest of the git state (see
    :func:`_git_state`) and of ``params_json``: re-running the same code and params continues the same
    parent run; any change of either starts a new one.
    """
    env = os.environ.get(PIPELINE_ID_ENV, "").strip()
    if env:
        return env
    state = _git_state(repo_root())
    params_sha = hashlib.sha256(params_json.encode()).hexdigest()
    return hashlib.sha256(f"{state}\n{params_sha}".encode()).hexdigest()[:32]


def data_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 over every ``sha256`` entry of a manifest (with its key path); else over the whole manifest.

    Built from the file hashes only, so the digest names the data, not incidental manifest fields or order.
    """
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
