"""Warm start (components/warm_start.py) with real processes: a real server, real forks, real signals.

A probe module (written per test session into a temporary folder, run as ``python -m``) calls
``warm_start.delegate()`` exactly as the steps' ``main`` does and reports where and how it ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.warm_start import socket_dir, stop_servers, wait_gone
from tests.tiny_params import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, os, sys, time
from components import warm_start

def main():
    code = warm_start.delegate()
    if code is not None:
        return code
    out, mode = sys.argv[1], sys.argv[2]
    mask = os.umask(0); os.umask(mask)
    facts = {
        "version": VERSION, "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv,
        "stage": os.environ.get("DVC_STAGE"), "worker": os.environ.get("DAFT_WARM_WORKER"),
        "torch_preloaded": "torch" in sys.modules, "umask": mask, "path0": sys.path[0],
    }
    with open(out, "w") as f:
        json.dump(facts, f)
    print("out-line")
    print("err-line", file=sys.stderr)
    if mode == "sleep":
        time.sleep(120)
    if mode == "raise":
        raise ValueError("boom from the probe")
    return int(mode)

if __name__ == "__main__":
    raise SystemExit(main())
"""


def write_probe(folder: Path, version: int = 1) -> None:
    (folder / "warm_probe.py").write_text(PROBE.replace("VERSION", str(version)))


@pytest.fixture(scope="module")
def probe_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folder = tmp_path_factory.mktemp("probe")
    write_probe(folder)
    warm = tmp_path_factory.mktemp("warm")
    os.chmod(warm, 0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAFT_", "DVC_", "KUBERNETES_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(folder), str(ROOT)]),
        DAFT_WARM_DIR=str(warm),
        DAFT_WARM_IDLE="120",
        DVC_STAGE="stage-a",
        PROBE_FOLDER=str(folder),
    )
    yield env
    stop_servers(warm)


def run_probe(
    env: dict[str, str], out: Path, mode: str = "0", stage: str = "stage-a", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "warm_probe", str(out), mode],
        env={**env, "DVC_STAGE": stage},
        cwd=cwd or out.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def server_pid(env: dict[str, str]) -> int | None:
    """The running server's pid once it is listening (its socket is renamed into place when ready)."""
    folder = Path(env["DAFT_WARM_DIR"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        socks, pids = list(folder.glob("*.sock")), list(folder.glob("*.pid"))
        if socks and pids:
            return int(pids[0].read_text())
        time.sleep(0.1)
    return None


def warm_facts(
    env: dict[str, str], out: Path, mode: str = "0", **kw: str
) -> tuple[dict, subprocess.CompletedProcess]:
    res = run_probe(env, out, mode, **kw)
    return json.loads(out.read_text()), res


@pytest.fixture(scope="module")
def server(probe_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> int:
    """The first probe runs in-process and starts the server; returns the server's pid."""
    out = tmp_path_factory.mktemp("first") / "facts.json"
    facts, res = warm_facts(probe_env, out)
    assert res.returncode == 0, res.stderr
    assert facts["worker"] is None and facts["torch_preloaded"] is False  # ran here, cold
    pid = server_pid(probe_env)
    assert pid is not None, "the first run did not start a server"
    return pid


def test_a_step_runs_in_a_forked_worker_as_the_client(probe_env, server: int, tmp_path: Path) -> None:
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    out = run_dir / "facts.json"
    proc = subprocess.run(
        [sys.executable, "-m", "warm_probe", str(out), "3"],
        env={**probe_env, "DVC_STAGE": "stage-b"},
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(0o027),
    )
    facts = json.loads(out.read_text())
    assert facts["worker"] == "1" and facts["torch_preloaded"] is True
    assert facts["ppid"] == server  # a child of the server
    assert facts["cwd"] == str(run_dir) and facts["path0"] == str(run_dir)
    assert facts["argv"][1:] == [str(out), "3"] and facts["stage"] == "stage-b"
    assert facts["umask"] == 0o027
    assert proc.returncode == 3  # the worker's exit status is the client's
    assert proc.stdout == "out-line\n" and "err-line" in proc.stderr  # through the client's own pipes
    log = next(Path(probe_env["DAFT_WARM_DIR"]).glob("*.log")).read_text()
    pid = facts["pid"]
    assert f"worker {pid} runs warm_probe" in log and f"worker {pid} (warm_probe) exit 3" in log


def test_an_exception_is_a_traceback_and_status_1(probe_env, server: int, tmp_path: Path) -> None:
    facts, res = warm_facts(probe_env, tmp_path / "facts.json", "raise")
    assert facts["worker"] == "1"
    assert res.returncode == 1
    assert "ValueError: boom from the probe" in res.stderr and "Traceback" in res.stderr


def test_edited_code_is_what_runs(probe_env, server: int, tmp_path: Path) -> None:
    folder = Path(probe_env["PROBE_FOLDER"])
    write_probe(folder, version=2)
    try:
        facts, res = warm_facts(probe_env, tmp_path / "facts.json")
        assert res.returncode == 0 and facts["worker"] == "1"
        assert facts["version"] == 2
    finally:
        write_probe(folder, version=1)


def _start_sleeping(env: dict[str, str], out: Path) -> tuple[subprocess.Popen[str], dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "warm_probe", str(out), "sleep"],
        env=env,
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not out.exists() or not out.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the probe did not start"
        time.sleep(0.05)
    time.sleep(0.2)  # past the write: in its sleep
    return proc, json.loads(out.read_text())


def test_ctrl_c_reaches_the_worker(probe_env, server: int, tmp_path: Path) -> None:
    proc, facts = _start_sleeping(probe_env, tmp_path / "facts.json")
    assert facts["worker"] == "1"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130  # KeyboardInterrupt in the worker, as in a plain process
    assert wait_gone(facts["pid"], 20)


def test_a_killed_client_takes_its_worker_with_it(probe_env, server: int, tmp_path: Path) -> None:
    proc, facts = _start_sleeping(probe_env, tmp_path / "facts.json")
    assert facts["worker"] == "1"
    proc.kill()
    proc.wait(timeout=30)
    assert wait_gone(facts["pid"], 20), "the worker outlived its client"


def test_a_different_environment_gets_its_own_server(probe_env, server: int, tmp_path: Path) -> None:
    other = {**probe_env, "SOME_SETTING": "different"}
    facts, res = warm_facts(other, tmp_path / "facts.json")
    assert res.returncode == 0 and facts["worker"] is None  # no server for this environment yet: here
    folder = Path(probe_env["DAFT_WARM_DIR"])
    deadline = time.monotonic() + 60
    while len(list(folder.glob("*.sock"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(folder.glob("*.sock"))) == 2
    facts, _ = warm_facts(other, tmp_path / "facts2.json")
    assert facts["worker"] == "1" and facts["ppid"] != server


def test_switch_off_and_unsafe_folders_run_in_process(probe_env, tmp_path: Path) -> None:
    facts, res = warm_facts({**probe_env, "DAFT_WARM_START": "0"}, tmp_path / "a.json")
    assert res.returncode == 0 and facts["worker"] is None
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    facts, res = warm_facts({**probe_env, "DAFT_WARM_DIR": str(open_dir)}, tmp_path / "b.json")
    assert res.returncode == 0 and facts["worker"] is None
    assert list(open_dir.iterdir()) == []  # nothing started from a folder others could write to
    facts, res = warm_facts({**probe_env, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}, tmp_path / "c.json")
    assert facts["worker"] is None
    no_dvc = {k: v for k, v in probe_env.items() if k != "DVC_STAGE"}
    res = subprocess.run(
        [sys.executable, "-m", "warm_probe", str(tmp_path / "d.json"), "0"],
        env=no_dvc,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads((tmp_path / "d.json").read_text())["worker"] is None  # outside DVC: plain


def own_server(probe_env: dict[str, str], folder: Path, **settings: str) -> tuple[dict[str, str], int]:
    """A server of its own in `folder` (started by a first, in-process run): (environment, server pid)."""
    folder.mkdir(mode=0o700)
    env = {**probe_env, "DAFT_WARM_DIR": str(folder), **settings}
    warm_facts(env, folder.parent / f"{folder.name}-first.json")
    pid = server_pid(env)
    assert pid is not None
    return env, pid


def test_an_idle_server_exits_and_cleans_up(probe_env, tmp_path: Path) -> None:
    folder = tmp_path / "idle"
    _, pid = own_server(probe_env, folder, DAFT_WARM_IDLE="3")
    assert wait_gone(pid, 60)
    assert list(folder.glob("*.sock")) == [] and list(folder.glob("*.pid")) == []


def test_status_and_stop(probe_env, server: int) -> None:
    cmd = [sys.executable, "-m", "components.warm_start"]
    env = {**probe_env, "PYTHONPATH": str(ROOT)}
    status = subprocess.run([*cmd, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and f"pid {server}  running" in status.stdout


def _digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_a_real_step_writes_the_same_outputs_warm_and_cold(probe_env, server: int, tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params())
    env = {**probe_env, "PYTHONPATH": os.pathsep.join([probe_env["PROBE_FOLDER"], str(ROOT)])}
    outs, logs = {}, {}
    for mode in ("0", ""):
        out = tmp_path / f"prepared-{mode or 'warm'}"
        res = subprocess.run(
            [sys.executable, "-m", "components.prepare_data", "--params", str(params), "--out", str(out)],
            env={**env, "DAFT_WARM_START": mode},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        outs[mode] = _digest(out)
        assert ("warm start: running in worker" in res.stderr) == (mode == ""), res.stderr  # says where
        lines = res.stderr.replace(str(out), "OUT").splitlines()
        logs[mode] = [re.sub(r"[\d.]+", "#", line) for line in lines if "warm start" not in line]
    assert outs["0"] == outs[""] and outs[""]
    # The same log lines, numbers aside, as a plain process (a library's import-time logging setup in the
    # server once silenced every INFO line of the workers).
    assert logs["0"] == logs[""] and len(logs[""]) >= 2
    logs = "".join(p.read_text() for p in Path(probe_env["DAFT_WARM_DIR"]).glob("*.log"))
    assert "(components.prepare_data) exit 0" in logs
    bad = subprocess.run(
        [sys.executable, "-m", "components.prepare_data", "--params", str(tmp_path / "no.yml"), "--out", "o"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "no.yml" in bad.stderr


def test_default_folder_is_private_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DAFT_WARM_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert socket_dir() == tmp_path / "daft-warm"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert socket_dir().name == f"daft-warm-{os.getuid()}"


def test_a_stopped_server_times_out_and_the_step_runs_once_here(probe_env, tmp_path: Path) -> None:
    folder = tmp_path / "stopped"
    env, pid = own_server(probe_env, folder, DAFT_WARM_HANDSHAKE_S="2")
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        facts, res = warm_facts(env, tmp_path / "facts.json")
        assert res.returncode == 0 and facts["worker"] is None  # gave up on the server, ran here
        assert time.monotonic() - t0 < 60
    finally:
        os.kill(pid, signal.SIGCONT)
    # The server, resumed, finds the client gone before "go": it drops the request instead of running it.
    log = next(folder.glob("*.log"))
    deadline = time.monotonic() + 30
    while "dropped a client" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "dropped a client" in log.read_text() and "runs warm_probe" not in log.read_text()
    stop_servers(folder)
