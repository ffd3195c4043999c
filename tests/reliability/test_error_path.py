"""The one error path (`components.common.cli`): every foreseeable failure of a step is ONE `error:` line on
stderr that names the path or setting and the fix, exit status 2, no traceback; Ctrl-C is one line and
exit 130; an unexpected exception says "this is a bug" and shows its traceback (exit 1).

The steps run in-process (their `main(argv)`, as `python -m components.<step>` calls it) on a tiny
params file; the file-system failures are real where the machine allows (a read-only or 64 KiB tmpfs
mount as root, chmod otherwise) and simulated in-process where it does not.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components import convert_bn, finetune, prepare_data, pretrained
from components.common import MAX_ERROR_CHARS, cli
from components.params import params_from_dict
from tests.tiny_params import tiny_params, write_params

ROOT = Path(__file__).resolve().parents[2]
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_one_error(rc: int, err: str, *needles: str, status: int = 2) -> str:
    """Exit `status`; exactly one `error:` line, holding every needle, within the bound; no traceback."""
    assert rc == status, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = lines[0]
    assert len(line) <= MAX_ERROR_CHARS + len("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A params file (tracking off), prepared data and a pretrained model, made once."""
    import torch

    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("errpath")
    params_file = write_params(wd / "params.yaml", tiny_params())
    params = params_from_dict(tiny_params())
    prepare_data.run(params, wd / "data")
    pretrained.run(params, wd / "data", wd / "pretrained")
    return {"wd": wd, "params": params_file, "data": wd / "data", "model": wd / "pretrained"}


def _pretrained_argv(tiny: dict[str, Path], out: Path) -> list[str]:
    return ["--params", str(tiny["params"]), "--data", str(tiny["data"]), "--out", str(out)]


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs at `path` with `options` (root only); yields whether it is mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield False
        return
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, timeout=30
    )
    if res.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[str]:
    """`path` made unwritable: chmod 555 where that restricts (not root), else a read-only tmpfs mount."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    try:
        probe = path / ".probe"
        try:
            probe.touch()
        except OSError:
            yield "chmod"
            return
        probe.unlink()
        path.chmod(0o755)
        with tmpfs(path, "ro,size=64k") as mounted:
            if not mounted:
                pytest.skip("cannot make a read-only folder here (root without mount privileges)")
            yield "mount"
    finally:
        with contextlib.suppress(OSError):
            path.chmod(0o755)


# --------------------------------------------------------------------------------------------------
# File system
# --------------------------------------------------------------------------------------------------


def test_read_only_output_folder(tiny, tmp_path: Path, capsys) -> None:
    parent = tmp_path / "locked"
    with read_only_folder(parent) as how:
        rc = pretrained.main(_pretrained_argv(tiny, parent / "model"))
        line = assert_one_error(rc, capsys.readouterr().err, str(parent), "Fix:")
    expected = "permission denied" if how == "chmod" else "read-only file system"
    assert expected in line and ("writable" in line)
    assert not (parent / "model").exists()


def test_output_under_a_file(tiny, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    rc = pretrained.main(_pretrained_argv(tiny, blocker / "sub" / "model"))
    assert_one_error(rc, capsys.readouterr().err, str(blocker))


def test_disk_full(tiny, tmp_path: Path, capsys, monkeypatch) -> None:
    """A real full file system where possible (64 KiB tmpfs, filled but for one page, as root), else
    torch.save raising ENOSPC in-process."""
    full = tmp_path / "full"
    with tmpfs(full, "size=64k") as mounted:
        if mounted:
            (full / "filler").write_bytes(b"\0" * 60 * 1024)
        else:
            import torch

            def no_space(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(torch, "save", no_space)
        out = full / "model"
        rc = pretrained.main(_pretrained_argv(tiny, out))
        assert_one_error(rc, capsys.readouterr().err, "no space left", str(out), "free space")
        assert not out.exists()
        assert [p.name for p in full.iterdir()] == (["filler"] if mounted else [])  # no temp files left


def test_torch_save_unexpected_pos_is_a_full_disk(tiny, tmp_path: Path, capsys, monkeypatch) -> None:
    """torch's writer reports a full disk as RuntimeError('... unexpected pos N vs M') (no OSError chained
    when it writes to a path)."""
    import torch

    def truncated_write(*args, **kwargs):
        raise RuntimeError(TORCH_FULL_DISK)

    monkeypatch.setattr(torch, "save", truncated_write)
    out = tmp_path / "model"
    rc = pretrained.main(_pretrained_argv(tiny, out))
    assert_one_error(rc, capsys.readouterr().err, "unexpected pos", "full", str(out), "free space")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


def _truncated(tiny) -> bytes:
    good = (tiny["model"] / "model.pt").read_bytes()
    return good[: len(good) // 2]


def _not_a_daft_model(tiny) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(_truncated, id="truncated"),
        pytest.param(_not_a_daft_model, id="not-a-daft-model"),
        pytest.param(lambda tiny: b"this is not a torch checkpoint" * 10, id="garbage"),
    ],
)
def test_bad_checkpoint(tiny, tmp_path: Path, capsys, content) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(content(tiny))
    argv = ["--params", str(tiny["params"]), "--model", str(bad), "--data", str(tiny["data"])]
    rc = convert_bn.main([*argv, "--out", str(tmp_path / "out")])
    assert_one_error(rc, capsys.readouterr().err, str(bad / "model.pt"))
    assert not (tmp_path / "out").exists()


def test_non_finite_loss(tiny, tmp_path: Path, capsys) -> None:
    params = write_params(
        tmp_path / "params.yaml",
        tiny_params(finetune={"methods": {"ft": {"start": "pretrained", "lr": 1e30}}}),
    )
    out = tmp_path / "ft"
    argv = ["--params", str(params), "--method", "ft", "--model", str(tiny["model"])]
    rc = finetune.main([*argv, "--data", str(tiny["data"]), "--out", str(out)])
    assert_one_error(rc, capsys.readouterr().err, "non-finite training loss", "lower the learning rates")
    assert not out.exists()


def test_echoed_input_is_truncated(tiny, tmp_path: Path, capsys) -> None:
    huge = "x" * 20_000
    rc = prepare_data.main(["--params", str(tiny["params"]), "--set", f"data.preset={huge}", "--out", "o"])
    assert_one_error(rc, capsys.readouterr().err, "data.preset")
    long_path = tmp_path / ("d" * 5000) / "model"  # ENAMETOOLONG, its message echoes the whole path
    rc = pretrained.main(_pretrained_argv(tiny, long_path))
    assert_one_error(rc, capsys.readouterr().err, "Fix:")


# --------------------------------------------------------------------------------------------------
# A tracking "server" that is not MLflow
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def html_server(status: int) -> Iterator[str]:
    """A loopback web server answering every request with an HTML page (a proxy, a UI, a wrong port)."""
    body = b"<html><body><h1>Welcome</h1>" + b"<p>lorem ipsum</p>" * 400 + b"</body></html>"

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [404, 200])
def test_not_an_mlflow_server(tmp_path: Path, capsys, monkeypatch, status: int) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params(pipeline={"tracking": True}))
    with html_server(status) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        t0 = time.monotonic()
        rc = prepare_data.main(["--params", str(params), "--out", str(tmp_path / "out")])
        seconds = time.monotonic() - t0
    line = assert_one_error(
        rc, capsys.readouterr().err, uri, "not answer like an MLflow", "MLFLOW_TRACKING_URI"
    )
    assert "lorem ipsum" * 10 not in line  # the page is not dumped into the message
    assert seconds < 15  # not retried: retrying cannot turn a web page into MLflow
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# The wrapper itself: each kind of exception
# --------------------------------------------------------------------------------------------------


def _raising(exc: BaseException):
    def run_main(argv):
        raise exc

    return cli(run_main)


def _mlflow_exception() -> BaseException:
    from mlflow.exceptions import MlflowException

    return MlflowException("RESOURCE_DOES_NOT_EXIST: Registered Model with name=x not found")


def _requests_exception() -> BaseException:
    import requests

    return requests.exceptions.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=9): refused")


def _validation_error() -> BaseException:
    from pydantic import BaseModel, ValidationError

    class M(BaseModel):
        epochs: int

    try:
        M.model_validate({"epochs": "many"})
    except ValidationError as e:
        return e
    raise AssertionError("unreachable")


def _nonfinite() -> BaseException:
    from daft_core.training import NonFiniteLossError

    return NonFiniteLossError("non-finite training loss (nan) at epoch 1, step 2; lower the learning rates")


def _storage() -> BaseException:
    from components.storage import StorageError

    return StorageError("s3://bucket/model.pt: no such key; check the URI")


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (_mlflow_exception, ("rejected a request", "MLFLOW_TRACKING_URI")),
        (_requests_exception, ("unreachable", "pipeline.tracking: false")),
        (_validation_error, ("epochs", "params.yaml")),
        (_nonfinite, ("training stopped", "lower the learning rates")),
        (_storage, ("s3://bucket/model.pt",)),
        (lambda: PermissionError(errno.EACCES, "Permission denied", "/data/out"), ("/data/out", "writable")),
        (lambda: OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), ("/mnt/ro/x", "read-only")),
    ],
)
def test_each_known_error_is_one_line(make, needles, capsys) -> None:
    rc = _raising(make())([])
    assert_one_error(rc, capsys.readouterr().err, *needles)


def test_unknown_exception_is_a_bug_with_traceback(capsys) -> None:
    rc = _raising(ZeroDivisionError("division by zero"))([])
    err = capsys.readouterr().err
    assert rc == 1
    first = err.splitlines()[0]
    assert first.startswith("error: ZeroDivisionError") and "this is a bug" in first
    assert "Traceback (most recent call last)" in err


def test_keyboard_interrupt_in_process(capsys) -> None:
    rc = _raising(KeyboardInterrupt())([])
    assert_one_error(rc, capsys.readouterr().err, "interrupted", status=130)


def _as_from_a_terminal() -> None:
    """The child gets Ctrl-C as a shell would deliver it: SIGINT unblocked and not ignored. (Earlier tests
    in the same pytest process can leave SIGINT ignored or blocked, and both are inherited across exec.)"""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_exits_130_with_one_line(tmp_path: Path) -> None:
    code = (
        "import time\n"
        "from components.common import cli\n"
        "def run(argv):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "raise SystemExit(cli(run)([]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert_one_error(proc.returncode, err, "interrupted", status=130)
