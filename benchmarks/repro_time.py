"""Wall time of a cold `dvc repro` (every stage runs), in a temporary copy of a working tree.

    python -m benchmarks.repro_time [--source .] [--runs 3] [--warm on|off|both] [--keep] [--json out.json]

Each run copies `--source`'s working tree as it is (tracked and untracked, not ignored files, so uncommitted
changes are measured too) into a fresh temporary git repository, runs `dvc repro` there with a fresh
sqlite MLflow store and ``PYTHONPATH`` set to the copy (the venv's editable install points elsewhere), and
times each stage from the moment DVC prints ``Running stage`` to the next one (the last stage ends with the
command). Prints one line per run and the medians per stage and in total, so interleaved runs of two trees
(`--source A`, `--source B`) can be compared on a busy machine.

Wall time on a shared machine measures the neighbours as much as the pipeline, so each stage's CPU time
(user + system, all threads) is reported too: a ``sitecustomize`` module on the stages' ``PYTHONPATH`` (in
a folder of its own, outside the copy) records every Python process's CPU time when it exits, and a
stage's CPU is that of its ``components.*`` process; ``cpu_total`` is every process's, DVC's included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGE_LINE = re.compile(r"Running stage '([^']+)'")

# Loaded by every Python process of the run (DVC, the stages): one JSON line per process at exit.
SITECUSTOMIZE = """
import atexit, json, os, resource, sys, time
def _record():
    r = resource.getrusage(resource.RUSAGE_SELF)
    line = {"end": time.time(), "cpu": r.ru_utime + r.ru_stime, "argv": sys.argv[:3]}
    with open(os.environ["REPRO_TIME_CPU_LOG"], "a") as f:
        f.write(json.dumps(line) + "\\n")
atexit.register(_record)
"""


def copy_tree(source: Path, dest: Path) -> None:
    """`source`'s working tree (not its ignored files) as a fresh one-commit git repository at `dest`."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, files):
        rel = os.fsdecode(raw)
        src = source / rel
        if not src.is_file():  # deleted in the working tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "bench"]):
        subprocess.run([*git, *cmd], cwd=dest, check=True, capture_output=True)


def timed_repro(source: Path, keep: bool, warm: bool = True) -> dict[str, float]:
    """One cold `dvc repro` of a copy of `source`: seconds per stage and ``total``.

    With ``warm``, the stages use warm start (components/warm_start.py) with a socket folder of this run's
    own, so no server from an earlier run is reused; the server is stopped at the end and its CPU time
    (the imports it did once for all stages) is reported as ``cpu:warm-start server``. Without, every
    stage imports everything itself (``DAFT_WARM_START=0``).
    """
    tmp = Path(tempfile.mkdtemp(prefix="repro_time_"))
    hook = Path(tempfile.mkdtemp(prefix="repro_time_hook_"))
    try:
        copy_tree(source, tmp)
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        cpu_log = hook / "cpu.jsonl"
        bindir = str(Path(sys.executable).parent)  # the stages' `python` is this interpreter's
        env = {
            **os.environ,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": os.pathsep.join([str(tmp), str(hook)]),
            "REPRO_TIME_CPU_LOG": str(cpu_log),
            "DAFT_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",  # DVC and the stages write through a pipe: timestamp lines as they come
            "DAFT_WARM_START": "" if warm else "0",
            "DAFT_WARM_DIR": str(hook / "warm"),
        }
        env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own sqlite:///mlflow.db, empty
        dvc = str(Path(bindir) / "dvc")
        times: dict[str, float] = {}
        starts: list[tuple[str, float]] = []  # (stage, epoch seconds) in order
        current: tuple[str, float] | None = None
        t0 = time.perf_counter()
        with open(tmp / "repro.log", "w") as log:
            proc = subprocess.Popen(
                [dvc, "repro"], cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                now = time.perf_counter()
                log.write(f"{now - t0:8.2f} {line}")
                m = STAGE_LINE.search(line)
                if m:
                    if current is not None:
                        times[current[0]] = now - current[1]
                    current = (m.group(1), now)
                    starts.append((m.group(1), time.time()))
            rc = proc.wait()
        end = time.perf_counter()
        if (hook / "warm").is_dir():  # the server's CPU is recorded when it exits
            from components.warm_start import stop_servers

            stop_servers(hook / "warm")
        if current is not None:
            times[current[0]] = end - current[1]
        if rc != 0:
            raise SystemExit(f"dvc repro failed (exit {rc}); see {tmp / 'repro.log'}")
        times["total"] = end - t0
        times.update(_stage_cpu(cpu_log, starts))
        return times
    finally:
        shutil.rmtree(hook, ignore_errors=True)
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _stage_cpu(cpu_log: Path, starts: list[tuple[str, float]]) -> dict[str, float]:
    """``cpu:<stage>`` (CPU seconds of the stage's components.* process) and ``cpu_total`` (all processes)."""
    out: dict[str, float] = {}
    total = 0.0
    for line in cpu_log.read_text().splitlines() if cpu_log.is_file() else []:
        rec = json.loads(line)
        total += rec["cpu"]
        if not any("components" in str(a) for a in rec["argv"]):
            continue
        if any("warm_start" in str(a) for a in rec["argv"]):
            out["cpu:warm-start server"] = out.get("cpu:warm-start server", 0.0) + rec["cpu"]
            continue
        stage = [name for name, t in starts if t <= rec["end"]]
        if stage:
            out[f"cpu:{stage[-1]}"] = out.get(f"cpu:{stage[-1]}", 0.0) + rec["cpu"]
    out["cpu_total"] = total
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", action="append", default=None, help="working tree to time (repeatable)")
    p.add_argument("--runs", type=int, default=3, help="cold repros per source, interleaved")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies (and their repro.log)")
    p.add_argument("--json", default=None, help="write all runs and medians here")
    p.add_argument(
        "--warm",
        choices=("on", "off", "both"),
        default="on",
        help="warm start for the stages (the default under DVC); both: interleave runs with and without",
    )
    args = p.parse_args(argv)
    sources = [Path(s).resolve() for s in (args.source or ["."])]
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.warm]
    variants = [(s, w, f"{s} (warm start {'on' if w else 'off'})") for s in sources for w in modes]
    runs: dict[str, list[dict[str, float]]] = {name: [] for _, _, name in variants}
    for i in range(args.runs):
        for s, warm, name in variants:
            t = timed_repro(s, args.keep, warm)
            runs[name].append(t)
            print(f"{name} run {i + 1}: total {t['total']:.1f} s, CPU {t['cpu_total']:.1f} s", flush=True)
    result = {}
    for s, rs in runs.items():
        stages = list(dict.fromkeys(k for r in rs for k in r))
        med = {k: round(statistics.median(r[k] for r in rs if k in r), 2) for k in stages}
        result[s] = {"runs": rs, "median": med}
        print(f"\n{s}: median of {len(rs)}")
        print(f"  {'stage':24s} {'wall':>7s} {'cpu':>7s}")
        for k, v in med.items():
            if not k.startswith("cpu"):
                cpu = med["cpu_total"] if k == "total" else med.get(f"cpu:{k}", 0.0)
                print(f"  {k:24s} {v:7.1f} {cpu:7.1f}")
        if "cpu:warm-start server" in med:
            print(f"  {'(warm-start server)':24s} {'':>7s} {med['cpu:warm-start server']:7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
