"""Shared fixtures. The real-server fixtures (moto S3, MLflow tracking server) live in tests/servers.py."""

import pytest

from tests.servers import mlflow_server, s3, s3_server

__all__ = ["mlflow_server", "s3", "s3_server"]


@pytest.fixture(autouse=True)
def _not_in_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests act out a pod explicitly; a CI runner that happens to be one must not change the others
    (in a pod, a local tracking store is refused)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
