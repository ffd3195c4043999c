"""Real servers for integration tests: a moto S3 server and an MLflow tracking server, as subprocesses.

Both listen on 127.0.0.1 only (no network beyond loopback). The fixtures are session-scoped and
registered in tests/conftest.py, so every test file (tracking, `dvc repro`, kfp local run) shares one
pair per session::

    def test_x(mlflow_server):              # MlflowServer: .uri, .s3 (S3Server), .env
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)

The MLflow server stores runs in sqlite under a temp dir and proxies artifacts (``--serve-artifacts``) to
``s3://<bucket>/mlartifacts`` on the moto server, so clients need no S3 credentials, exactly like a cluster
deployment with a real object store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START_TIMEOUT_S = float(os.environ.get("DAFT_TEST_SERVER_TIMEOUT", "180"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_http(
    url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = START_TIMEOUT_S
) -> None:
    """Poll `url` until it answers (any HTTP status); fail with the server log if the process dies."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode} before {url} answered:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{_tail(log_path)}")
        time.sleep(0.3)


def start_process(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_file = log_path.open("wb")
    try:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log_file.close()  # the child keeps its own descriptor


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 4) -> None:
    """SIGTERM the process group (the server and its workers), SIGKILL after `timeout`.

    Test servers hold nothing worth a graceful shutdown, and uvicorn would otherwise wait for the
    keep-alive connections of the test process's HTTP sessions."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        """Environment a client (boto3, MLflow artifact store, DVC remote) needs to reach this server."""
        return {**AWS_TEST_ENV, "MLFLOW_S3_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):  # boto3 S3 client against the moto endpoint
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        out: list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


@dataclass
class MlflowServer:
    uri: str
    s3: S3Server
    proc: subprocess.Popen[bytes]
    log_path: Path
    artifacts_destination: str
    env: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def run_s3_server(workdir: Path, bucket: str = "daft-test") -> Iterator[S3Server]:
    """A moto S3 server subprocess on 127.0.0.1 with `bucket` created."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "moto.log"
    env = {**os.environ, **AWS_TEST_ENV}
    proc = start_process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env, log_path
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", proc, log_path)
        server = S3Server(endpoint=endpoint, bucket=bucket, proc=proc, log_path=log_path)
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        stop_process(proc)


@contextlib.contextmanager
def run_mlflow_server(workdir: Path, s3: S3Server, prefix: str = "mlartifacts") -> Iterator[MlflowServer]:
    """`mlflow server` (sqlite backend, artifacts proxied to s3://<bucket>/<prefix>) on 127.0.0.1."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "mlflow-server.log"
    destination = f"s3://{s3.bucket}/{prefix}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(s3.env)
    # No job runner (a huey consumer process for GenAI evaluation jobs): nothing here uses it, and on a
    # busy CI box it competes with the server's own start-up.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{(workdir / 'mlflow.db').as_posix()}",
        "--artifacts-destination",
        destination,
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    proc = start_process(cmd, env, log_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", proc, log_path)
        yield MlflowServer(
            uri=uri, s3=s3, proc=proc, log_path=log_path, artifacts_destination=destination, env=env
        )
    finally:
        stop_process(proc)


# ---------------------------------------------------------------------------------------------------
# pytest fixtures (registered in tests/conftest.py)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with run_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[MlflowServer]:
    with run_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), s3_server) as server:
        yield server


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The shared moto server, reached the way a pod reaches its store: endpoint and keys from the env."""
    for k, v in AWS_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "DAFT_WORKSPACE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    return s3_server
