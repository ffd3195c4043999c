"""Warm start for local pipeline runs: steps forked from an interpreter that has already imported torch.

Each `dvc repro` stage is a new Python process, and each spends 4-5 s importing torch, torchvision (through
timm, which pulls in ``torch._dynamo``) and MLflow's SQL store before it does 1-15 s of work: a third of a
cold default repro. Under DVC (``DVC_STAGE`` is set) a step therefore hands its command line to a per-user
server that holds those third-party modules imported and forks one worker per step, the way PyTorch's
DataLoader forks workers. The worker takes the client's stdin/stdout/stderr (passed over a Unix socket),
working directory, environment, ``sys.path``, ``sys.argv`` and umask, imports the project's own code fresh
(the server never imports ``components``' steps or ``daft_core``, so an edited step is always the edited
step), runs the step as ``python -m`` would, and its exit status (128 + N for a signal) becomes the
client's. Ctrl-C, SIGTERM and SIGHUP sent to the client are passed on to the worker; a client that dies
takes its worker with it.

The first stage starts the server in the background and runs in-process itself; later stages use the
server. A server serves only clients whose interpreter, ``sys.path``, environment (apart from DVC's
per-stage variables) and installed packages equal its own; any difference starts another. A server exits
after ``DAFT_WARM_IDLE`` seconds (default 60) without a step. Anything that goes wrong before a worker
starts (no server yet, an unusable socket folder, a refused connection) runs the step in-process, as
without warm start.

Switches: ``DAFT_WARM_START=0`` never uses a server; ``DAFT_WARM_START=1`` also outside DVC, and on macOS
(off there by default: its system frameworks are not fork-safe). Never in a Kubernetes pod (one step per
pod) or under torchrun. ``DAFT_WARM_DIR`` is the socket folder (default
``$XDG_RUNTIME_DIR/daft-warm`` or ``<tmp>/daft-warm-<uid>``; it must be owned by the user and closed to
others). ``python -m components.warm_start status|stop`` lists or stops the servers there.

This module imports only the standard library: it runs before any heavy import.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PROTOCOL = 1
SWITCH = "DAFT_WARM_START"
DIR_VAR = "DAFT_WARM_DIR"
IDLE_VAR = "DAFT_WARM_IDLE"
WORKER_VAR = "DAFT_WARM_WORKER"  # set in a worker: a step it starts runs in-process, never recursively
DEFAULT_IDLE_S = 60.0
# What every model-building step imports before its first line of work (~4.5 s on the 2-core machine).
PRELOAD = (
    "numpy",
    "torch",
    "torchvision",
    "timm",
    "PIL.Image",
    "yaml",
    "pydantic",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.pytorch",
)
# The project's own packages: imported by each worker from the client's sys.path, never kept warm.
OWN_PACKAGES = ("components", "daft_core", "pipelines", "benchmarks", "tests")
# Environment variables that differ between the stages of one run, or between shells, and matter to no
# import (DVC_* and DAFT_WARM_* are left out too). Every other variable must match the server's.
_PER_STAGE_ENV = (
    *("PWD", "OLDPWD", "SHLVL", "_"),
    *("PS1", "PS2", "PS3", "PS4", "PROMPT_COMMAND", "COLUMNS", "LINES"),
)
_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct("!I")
HANDSHAKE_S = 30.0  # a server that has not taken a request by then is stopped or swamped: run in-process
HANDSHAKE_VAR = "DAFT_WARM_HANDSHAKE_S"
_MAX_REQUEST = 16 << 20


# --------------------------------------------------------------------------------------------------
# When, and which server
# --------------------------------------------------------------------------------------------------


def enabled(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether this step process should try a warm server (see the module docstring for the rules)."""
    switch = environ.get(SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return False
    if environ.get(WORKER_VAR) or environ.get("KUBERNETES_SERVICE_HOST"):
        return False
    if environ.get("TORCHELASTIC_RUN_ID") or environ.get("LOCAL_RANK") is not None:
        return False
    if not (hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")):
        return False
    if switch in ("1", "true", "yes", "on"):
        return True
    # By default on Linux only: macOS system frameworks are not fork-safe once initialised (the reason
    # multiprocessing spawns there), so a forked worker could crash where a fresh process would not.
    return "DVC_STAGE" in environ and sys.platform.startswith("linux")


def socket_dir(environ: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    if environ.get(DIR_VAR):
        return Path(environ[DIR_VAR])
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "daft-warm"
    return Path(tempfile.gettempdir()) / f"daft-warm-{os.getuid()}"


def _private_dir(path: Path) -> Path:
    """`path`, created 0700 if missing; an error if it is a link, someone else's, or open to others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path):
        raise OSError(f"{path} is not a folder")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{path} must be owned by uid {os.getuid()} and closed to others (chmod 700)")
    return path


def server_key(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """What a server must share with a client: interpreter, sys.path, environment, installed packages."""
    env = {
        k: v for k, v in environ.items() if not (k.startswith(("DVC_", "DAFT_WARM_")) or k in _PER_STAGE_ENV)
    }
    packages = {}
    for name in PRELOAD:
        try:
            spec = importlib.util.find_spec(name.split(".")[0])
        except (ImportError, ValueError):
            spec = None
        origin = spec.origin if spec is not None else None
        packages[name] = [origin, os.stat(origin).st_mtime_ns if origin and os.path.exists(origin) else None]
    identity = {
        "protocol": PROTOCOL,
        "server_code": os.stat(__file__).st_mtime_ns,
        "executable": sys.executable,
        "version": sys.version,
        "flags": [repr(sys.flags), sys.warnoptions, sorted(map(str, sys._xoptions.items()))],
        "path": sys.path[1:],  # [0] is the client's own folder (python -m), set per worker
        "env": sorted(env.items()),
        "packages": packages,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------------
# Client: the step process that DVC started
# --------------------------------------------------------------------------------------------------


def delegate(module: str | None = None) -> int | None:
    """Run this process's step in a warm worker and return its exit status, or None to run it here.

    For processes started as ``python -m <module>`` (the steps' ``main``); returns None whenever no worker
    could be started.
    """
    if not enabled():
        return None
    if module is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = getattr(spec, "name", None)
    if not module:
        return None
    try:
        directory = _private_dir(socket_dir())
        key = server_key()
    except OSError:
        return None
    path = directory / f"{key}.sock"
    sock = _connect(path)
    if sock is None:
        _start_server(directory, key)
        return None
    with sock:
        return _run_in_worker(sock, module)


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _send_message(sock: socket.socket, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _run_in_worker(sock: socket.socket, module: str) -> int | None:
    request = {
        "op": "run",
        "module": module,
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "path": sys.path,
        "umask": _current_umask(),
    }
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    # Ctrl-C, SIGTERM and SIGHUP are for the step: held from here until the worker's pid is known, then
    # passed on; replayed here if the step ends up running in this process after all.
    worker: list[int] = []
    pending: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if not worker:
            pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker[0], signum)

    previous = {}
    for signum in _FORWARDED_SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            previous[signum] = signal.signal(signum, forward)
    try:
        code = _handshake_and_wait(sock, request, worker, pending)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if code is None:
        for signum in pending:  # the step will run here: as if these had arrived now
            signal.raise_signal(signum)
    return code


def _handshake_and_wait(
    sock: socket.socket, request: dict[str, Any], worker: list[int], pending: list[int]
) -> int | None:
    # Until "go" is sent, the step can still run here (a stopped or overloaded server times out); after it,
    # it runs in the worker only, so it never runs twice.
    module = request["module"]
    try:
        sock.settimeout(float(os.environ.get(HANDSHAKE_VAR, HANDSHAKE_S)))
        _send_message(sock, request)
        lines = _lines(sock)
        if next(lines, "") != "ready":
            return None
        if pending:
            return None  # interrupted before anything started: let it take effect here
        # The standard streams travel with "go" only: a server that never reads them must not hold them
        # open (a pipe's reader would wait for its end-of-file as long as the server keeps the message).
        socket.send_fds(sock, [b"go\n"], [0, 1, 2])
        sock.settimeout(None)
    except OSError:
        return None
    try:
        first = next(lines, "")
        if not first.startswith("started "):
            return _lost(module, None)
        worker.append(int(first.split()[1]))
        for signum in pending:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker[0], signum)
        pending.clear()
        for line in lines:
            if line.startswith("exit "):
                return int(line.split()[1])
    except OSError:
        pass
    return _lost(module, worker[0] if worker else None)


def _lost(module: str, pid: int | None) -> int:
    where = f"its worker {pid}" if pid else "before it started a worker"
    print(
        f"error: the warm-start server went away while running {module} ({where}); its outcome is unknown. "
        f"Fix: rerun the step; set {SWITCH}=0 to run steps without warm start.",
        file=sys.stderr,
        flush=True,
    )
    return 1


def _lines(sock: socket.socket) -> Iterator[str]:
    """Newline-terminated messages from the server, retrying reads interrupted by a forwarded signal."""
    buf = b""
    while True:
        while b"\n" not in buf:
            try:
                chunk = sock.recv(4096)
            except InterruptedError:
                continue
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        yield line.decode()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _start_server(directory: Path, key: str) -> None:
    """Start the server for `key` in the background (it deduplicates itself through a lock)."""
    with contextlib.suppress(OSError):
        log = open(directory / f"{key}.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            flags = subprocess._args_from_interpreter_flags()  # -O, -X, -W ...: the same interpreter
            subprocess.Popen(
                [sys.executable, *flags, "-m", __spec__.name, "serve", "--dir", str(directory), "--key", key],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # not in DVC's process group: Ctrl-C on the repro is not for it
                close_fds=True,
            )


# --------------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------------


class _Server:
    def __init__(self, directory: Path, key: str, idle_s: float) -> None:
        self.directory, self.key, self.idle_s = directory, key, idle_s
        self.path = directory / f"{key}.sock"
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        # pid -> (client connection, pidfd or None, module, start time) of each running worker
        self.children: dict[int, tuple[socket.socket, int | None, str, float]] = {}
        self.last_active = time.monotonic()
        self.stopping = False
        self.lock: io.TextIOWrapper | None = None

    # -- lifetime --------------------------------------------------------------------------------
    def serve(self) -> int:
        lock = self.lock = open(self.directory / f"{self.key}.lock", "a")  # noqa: SIM115 - held while serving
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # another server for this key is starting or running
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        if server_key() != self.key:  # not the interpreter, path or environment its clients have
            print(
                "warm start: this process does not match the key it was started for; not serving", flush=True
            )
            return 1
        started = time.monotonic()
        _preload()
        import threading

        if threading.active_count() != 1:  # a Python thread would be lost (and its locks held) in a fork
            print(f"warm start: {threading.active_count()} threads after preloading; not serving", flush=True)
            return 1
        own = sorted(m for m in sys.modules if m.split(".")[0] in ("daft_core", "pipelines"))
        if own:
            print(f"warm start: the preload imported project modules {own[:3]}; not serving", flush=True)
            return 1
        tmp = self.path.with_name(f"{self.key}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(tmp))
        self.listener.listen(16)
        os.replace(tmp, self.path)  # clients only ever see a listening socket
        ino = os.stat(self.path).st_ino
        (self.directory / f"{self.key}.pid").write_text(f"{os.getpid()}\n")
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.last_active = time.monotonic()  # idle from now, not from before the preload
        preload_s = time.monotonic() - started
        print(f"warm start: serving {self.path} (preloaded in {preload_s:.1f} s)", flush=True)
        try:
            self._loop()
        finally:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == ino:
                    self.path.unlink()
            with contextlib.suppress(OSError):
                (self.directory / f"{self.key}.pid").unlink()
        return 0

    def _loop(self) -> None:
        while True:
            if self.stopping and not self.children:
                return
            if not self.children and time.monotonic() - self.last_active > self.idle_s:
                return
            polled = any(child[1] is None for child in self.children.values())
            for key, _ in self.selector.select(timeout=0.05 if polled else 0.5):
                kind = key.data
                if kind == "accept":
                    if not self.stopping:
                        self._accept()
                elif kind[0] == "exit":
                    self._reap(kind[1])
                elif kind[0] == "client":
                    self._client_readable(kind[1], key.fileobj)
            for pid in [p for p, child in self.children.items() if child[1] is None]:
                self._reap(pid, block=False)  # no pidfd on this system: poll

    # -- one step --------------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            if hasattr(socket, "SO_PEERCRED"):
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                if struct.unpack("3i", creds)[1] != os.getuid():
                    raise OSError("a client of another user")
            conn.settimeout(HANDSHAKE_S)
            request = _receive_request(conn)
            if request.get("op") != "run":
                raise ValueError(f"unknown request {request.get('op')!r}")
            conn.sendall(b"ready\n")
            go, fds, _, _ = socket.recv_fds(conn, 3, 3)
            if not go.endswith(b"\n"):  # a stream may deliver "go\n" in pieces
                go += _read_line(conn)
            if len(fds) != 3 or go.strip() != b"go":
                raise OSError("the client gave up before the step started")
            conn.settimeout(None)
        except (OSError, ValueError) as err:
            print(f"warm start: dropped a client: {err}", flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                code = _worker(self, conn, request, fds)
            except BaseException:  # a worker must never return into the server's loop
                traceback.print_exc()
                code = 1
            os._exit(code)
        for fd in fds:
            os.close(fd)
        self.last_active = time.monotonic()
        print(f"warm start: worker {pid} runs {request['module']} in {request['cwd']}", flush=True)
        with contextlib.suppress(OSError):
            conn.sendall(f"started {pid}\n".encode())
        pidfd = None
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
                self.selector.register(pidfd, selectors.EVENT_READ, ("exit", pid))
        self.selector.register(conn, selectors.EVENT_READ, ("client", pid))
        self.children[pid] = (conn, pidfd, request["module"], time.monotonic())

    def _client_readable(self, pid: int, conn: Any) -> None:
        try:
            data = conn.recv(1024)
        except OSError:
            data = b""
        if not data and pid in self.children:  # the client is gone: so must its worker be
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            self.selector.unregister(conn)

    def _reap(self, pid: int, block: bool = True) -> None:
        try:
            done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 1 << 8
        if done == 0:
            return
        conn, pidfd, module, t0 = self.children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it
        took = time.monotonic() - t0
        print(f"warm start: worker {pid} ({module}) exit {code} after {took:.1f} s", flush=True)
        with contextlib.suppress(OSError):
            conn.sendall(f"exit {code}\n".encode())
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()
        if pidfd is not None:
            self.selector.unregister(pidfd)
            os.close(pidfd)
        self.last_active = time.monotonic()


def _read_line(conn: socket.socket, limit: int = 64) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(1)
        if not chunk:
            break
        data += chunk
    return data.strip()


def _preload() -> None:
    """Import PRELOAD as a step would: after it configured logging. A step sets up the root logger first
    thing, so a library's import-time ``logging.basicConfig`` (mlflow.pytorch's Lightning autolog module
    calls ``basicConfig(level=ERROR)``) is a no-op in a plain step process; undone here so that a worker
    starts from the root logger a fresh process has."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for name in PRELOAD:
        __import__(name)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def _receive_request(conn: socket.socket) -> dict[str, Any]:
    head = _recv_exactly(conn, _HEADER.size)
    (size,) = _HEADER.unpack(head)
    if size > _MAX_REQUEST:
        raise ValueError(f"request of {size} bytes")
    return json.loads(_recv_exactly(conn, size))


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("truncated request")
        data += chunk
    return data


def _worker(server: _Server, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> int:
    """In the forked child: become the client's process, run its step, return its exit status."""
    server.selector.close()
    if server.lock is not None:
        server.lock.close()  # the lock is the server's: a new server may start while this step runs
    for c, pidfd, _, _ in server.children.values():
        c.close()
        if pidfd is not None:
            os.close(pidfd)
    if server.listener is not None:
        server.listener.close()
    conn.close()
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    _adopt_stdio(fds)
    os.chdir(request["cwd"])
    os.umask(int(request["umask"]))
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[WORKER_VAR] = "1"
    sys.path[:] = request["path"]
    sys.argv[:] = request["argv"]
    for name in [m for m in sys.modules if m.split(".")[0] in OWN_PACKAGES]:
        del sys.modules[name]
    sys.path_importer_cache.clear()  # folder listings cached by the server may predate files added since
    importlib.invalidate_caches()
    import runpy

    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = _exit_code(done.code)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except BaseException:  # as the interpreter would: traceback, status 1
        traceback.print_exc()
        code = 1
    # A normal interpreter exit runs atexit handlers and flushes; os._exit (by the caller) does neither.
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _adopt_stdio(fds: list[int]) -> None:
    """The client's stdin/stdout/stderr become fds 0-2 under the interpreter's own ``sys.std*`` objects, so
    everything bound to them at import time (a logging handler, say) writes to the client; stdout is then
    buffered as a fresh interpreter would buffer it (line by line only on a terminal)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()  # what the server wrote stays in its log
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(line_buffering=os.isatty(1))


# --------------------------------------------------------------------------------------------------
# Command line: serve (started by a client), status, stop
# --------------------------------------------------------------------------------------------------


def _servers(directory: Path) -> list[tuple[str, int | None, bool]]:
    """(key, server pid, alive) for each server that left a pid file in `directory`."""
    found = []
    for pid_file in sorted(directory.glob("*.pid")):
        try:
            pid: int | None = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        found.append((pid_file.stem, pid, pid is not None and alive(pid)))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Whether process `pid` ended within `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_servers(directory: Path, timeout_s: float = 10.0) -> int:
    """Ask every server in `directory` to exit (each finishes its running steps first); how many."""
    pids = [pid for _, pid, alive in _servers(directory) if alive and pid is not None]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        wait_gone(pid, max(0.0, deadline - time.monotonic()))
    return len(pids)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m components.warm_start", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a server (clients start it; not for use by hand)")
    serve.add_argument("--dir", required=True)
    serve.add_argument("--key", required=True)
    for name in ("status", "stop"):
        s = sub.add_parser(name, help=f"{name} the servers in the socket folder")
        s.add_argument("--dir", default=None, help="socket folder (default: $DAFT_WARM_DIR, else per user)")
    args = p.parse_args(argv)
    if args.command == "serve":
        idle = float(os.environ.get(IDLE_VAR, DEFAULT_IDLE_S))
        return _Server(Path(args.dir), args.key, idle).serve()
    directory = Path(args.dir) if args.dir else socket_dir()
    if not directory.is_dir():
        print(f"no warm-start servers: {directory} does not exist")
        return 0
    if args.command == "status":
        servers = _servers(directory)
        for key, pid, alive in servers:
            print(f"{key}  pid {pid}  {'running' if alive else 'gone'}")
        if not servers:
            print(f"no warm-start servers in {directory}")
        return 0
    print(f"stopped {stop_servers(directory)} warm-start server(s) in {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
