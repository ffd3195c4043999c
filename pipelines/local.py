"""Pod isolation for ``run-local --isolated``: each kfp.local step runs as it would in its own pod.

kfp.local's SubprocessRunner starts every step as ``sh -c '... python -m kfp.dsl.executor_main ...'`` in the
caller's working directory, with the caller's environment. On a cluster a step has none of that: an empty
working directory, its own HOME and /tmp, only the environment the pod spec gives it, and nothing shared
with the other steps but its declared input and output artifacts. :func:`isolated_steps` makes the local run
behave so, so that a hidden assumption fails here rather than on the cluster:

- each step (each attempt of it) gets ``<pods root>/<NN>-<task>/{work,home,tmp}``: ``work`` is its working
  directory, ``home`` its HOME, ``tmp`` its TMPDIR; the pods root must not lie inside a project (a folder
  with params.yaml, dvc.yaml or .git above it), so nothing can find the repository from the cwd;
- the environment is a pod's: ``PATH``, locale, the image's settings (``MPLBACKEND``, caches under HOME),
  ``KUBERNETES_SERVICE_HOST`` (so a step refuses a local MLflow store), the variables a secret would give
  (``AWS_*``, ``MLFLOW_*``) and ``DAFT_*`` settings (less ``DAFT_ALLOW_LOCAL_TRACKING``), and the task's own
  variables from the pipeline; ``PYTHONPATH`` loses the repository, so the project is imported as the
  installed package;
- a step that leaves any file in its working directory fails: in a pod that file would be lost.

kfp.local offers no hook for a runner's working directory, so this replaces the module-level function its
subprocess task handler calls (``kfp.local.subprocess_task_handler.run_local_subprocess``, kfp 2.x) for
the duration of the run. Artifacts still pass by path under the pipeline root, the stand-in for the
artifact store.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Kubernetes sets these in every container; nothing here contacts the address (port 9: discard).
POD_MARKERS = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "9"}
KEEP_ENV = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
)
KEEP_PREFIXES = ("AWS_", "MLFLOW_", "DAFT_")
DROP_ENV = ("DAFT_ALLOW_LOCAL_TRACKING",)  # would let a step use a store that dies with its pod
PROJECT_MARKERS = ("params.yaml", "dvc.yaml", ".git")
REPO_ROOT = Path(__file__).resolve().parents[1]


class IsolationError(RuntimeError):
    """The isolated run cannot be set up as asked (message names the path and the fix)."""


@dataclass
class Isolation:
    """What an isolated run did: one record per step attempt, and the steps that broke isolation."""

    root: Path
    pods: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_pods_root(root: Path) -> None:
    """IsolationError when `root` (or a folder above it) looks like a project: a step could find it."""
    for d in (root, *root.parents):
        found = [m for m in PROJECT_MARKERS if (d / m).exists()]
        if found:
            raise IsolationError(
                f"{root} lies inside {d}, which holds {', '.join(found)}: a step could find the project from "
                "its working directory; choose a pods root outside any project (the default is a new "
                "temporary folder)"
            )


def pod_env(base: Mapping[str, str], task_env: Mapping[str, str], pod: Path) -> dict[str, str]:
    """A pod's environment: what the image and the pod spec would give, not the caller's whole shell."""
    env = {k: v for k, v in base.items() if k in KEEP_ENV or k.startswith(KEEP_PREFIXES)}
    for k in DROP_ENV:
        env.pop(k, None)
    paths = [
        p
        for p in base.get("PYTHONPATH", "").split(os.pathsep)
        if p and not _inside(Path(p), REPO_ROOT) and not _inside(REPO_ROOT, Path(p))
    ]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    home = pod / "home"
    env.update(
        {
            "HOME": str(home),
            "TMPDIR": str(pod / "tmp"),
            "PWD": str(pod / "work"),
            "MPLBACKEND": "Agg",
            "MPLCONFIGDIR": str(home / ".cache" / "matplotlib"),
            "TORCH_HOME": str(home / ".cache" / "torch"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            **POD_MARKERS,
        }
    )
    env.update(task_env)  # the task's own variables (set_env_variable), as in its pod spec
    return env


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _task_name(full_command: Sequence[str]) -> str:
    """The kfp.local task's name (its task root's folder), else the component function's name."""
    args = list(full_command)
    for flag in ("--executor_input", "--function_to_execute"):
        if flag in args[:-1]:
            value = args[args.index(flag) + 1]
            if flag == "--function_to_execute":
                return value
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return Path(json.loads(value)["outputs"]["outputFile"]).parent.name
    return "step"


def _left_files(work: Path) -> list[str]:
    return sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if not p.is_dir() or p.is_symlink())


@contextlib.contextmanager
def isolated_steps(root: str | os.PathLike[str]) -> Iterator[Isolation]:
    """While active, kfp.local's SubprocessRunner starts each step as a pod (module docstring)."""
    from kfp.local import subprocess_task_handler as handler

    pods_root = Path(root).resolve()
    check_pods_root(pods_root)
    pods_root.mkdir(parents=True, exist_ok=True)
    original = getattr(handler, "run_local_subprocess", None)
    if original is None:
        raise IsolationError(
            "this kfp version has no kfp.local.subprocess_task_handler.run_local_subprocess; "
            "run without --isolated"
        )
    state = Isolation(pods_root)
    counter = itertools.count(1)
    lock = threading.Lock()  # kfp.local runs independent tasks in threads
    base = dict(os.environ)

    def run_pod(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", _task_name(full_command))
        with lock:
            pod = pods_root / f"{next(counter):02d}-{name}"
        for sub in ("work", "home", "tmp"):
            (pod / sub).mkdir(parents=True)
        work = pod / "work"
        with lock:
            state.pods.append({"task": name, "dir": str(pod)})
        with subprocess.Popen(
            full_command,
            cwd=work,
            env=pod_env(base, env_vars or {}, pod),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        ) as proc:
            if proc.stdout:
                for line in iter(proc.stdout.readline, ""):
                    print(line, end="")
                print("\n")
            code = proc.wait()
        left = _left_files(work)
        if left:
            shown = ", ".join(left[:10]) + (f" (+{len(left) - 10} more)" if len(left) > 10 else "")
            problem = (
                f"step {name} left files in its working directory {work}: {shown}; in a pod they are lost "
                "with it (write results to the step's declared outputs)"
            )
            print(f"error: {problem}")
            with lock:
                state.problems.append(problem)
            return code or 1
        return code

    handler.run_local_subprocess = run_pod
    try:
        yield state
    finally:
        handler.run_local_subprocess = original
