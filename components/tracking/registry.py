"""Model-registry aliases, usable outside a run (the report step moves ``champion`` after all runs end)."""

from __future__ import annotations

import logging

from components.tracking.identity import tracking_uri
from components.tracking.retries import mlflow_client, retry

log = logging.getLogger(__name__)

# What the registry answers for a model, version or alias that is not there.
MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def set_alias(registered_model: str, alias: str, version: str | int, *, uri: str | None = None) -> None:
    """Point `alias` (e.g. ``champion``) of `registered_model` at `version`."""
    uri = uri or tracking_uri()
    client = mlflow_client(uri)
    retry(
        uri,
        f"set alias {registered_model}@{alias}",
        lambda: client.set_registered_model_alias(registered_model, alias, str(version)),
    )
    log.info("alias %s@%s -> version %s", registered_model, alias, version)


def try_set_alias(
    registered_model: str, alias: str, version: str | int, *, uri: str | None = None
) -> str | None:
    """:func:`set_alias`, but a version the registry does not have is returned as its error code (None
    when the alias was set); every other failure still raises."""
    from mlflow.exceptions import MlflowException

    try:
        set_alias(registered_model, alias, version, uri=uri)
    except MlflowException as err:
        if err.error_code in MISSING_CODES:
            return str(err.error_code)
        raise
    return None


def version_for_alias(registered_model: str, alias: str, *, uri: str | None = None) -> str | None:
    """The version `alias` points at, or None when the model or the alias does not exist.

    None rather than an error: a first pipeline run has no earlier version to derive from.
    """
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    client = mlflow_client(uri)
    try:
        mv = retry(
            uri,
            f"get alias {registered_model}@{alias}",
            lambda: client.get_model_version_by_alias(registered_model, alias),
        )
    except MlflowException as err:
        if err.error_code in MISSING_CODES:
            return None
        raise
    return str(mv.version)
