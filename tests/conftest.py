"""Shared fixtures. The real-server fixtures (moto S3, MLflow tracking server) live in tests/servers.py."""

from tests.servers import mlflow_server, s3_server

__all__ = ["mlflow_server", "s3_server"]
