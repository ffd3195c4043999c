"""Shared fixtures. The real-server fixtures (moto S3, MLflow tracking server) live in tests/servers.py."""

import pytest

from tests.servers import mlflow_server, s3, s3_server

__all__ = ["mlflow_server", "s3", "s3_server"]


@pytest.fixture(autouse=True)
def _not_in_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests act out a pod explicitly; a CI runner that happens to be one must not change the others
    (in a pod, a local tracking store is refused)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.fixture(autouse=True)
def _no_warm_start_by_accident(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps that tests start as subprocesses run plainly, whatever the developer's shell exports; the
    warm-start tests and the end-to-end `dvc repro` build their own environments and socket folders."""
    monkeypatch.setenv("DAFT_WARM_START", "0")
