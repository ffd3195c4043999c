"""The tail of every model-producing step: its output folder written atomically, the model logged to MLflow
and registered with its stage alias and lineage. One place, so every step publishes the same way."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.common import MODEL_FILE, write_json
from components.outputs import check_output_dir, write_marker
from components.params import Params
from daft_core.atomic import atomic_dir
from daft_core.methods import alias_for

STEP_OF_STAGE = {"bn_converted": "convert_bn"}  # the step writing each stage's folder, where names differ


def input_example(bundle: Any, n: int = 2):
    return bundle.val.images[:n].clone()


def source_version(params: Params, stage: str) -> str | None:
    """The registered version the input model was logged as (lineage), looked up by its stage alias."""
    if not params.pipeline.tracking:
        return None
    from components import tracking

    return tracking.version_for_alias(params.pipeline.registered_model, alias_for(stage))


def publish_model(
    tracker: Any,
    params: Params,
    out_dir: str | os.PathLike[str],
    model: Any,
    *,
    stage: str,
    method: str | None,
    alias_of: str,
    bundle: Any,
    extra: Mapping[str, Any],
    reports: Mapping[str, Any] | None = None,
    files: Mapping[str, str | os.PathLike[str]] | None = None,
    source: str | None = None,
    step: str | None = None,
) -> str | None:
    """The tail of every model-producing step: write `out_dir` atomically, then log and register the model.

    `out_dir` gets ``model.pt`` (with `extra`), one JSON file per entry of `reports` and the `files` moved
    in under their names. The registered version gets the alias of `alias_of` (a stage or method) and
    `source` (the stage the input model came from) as its lineage. Returns the version (None untracked).
    The folder is marked as `step`'s output (default: the step of `stage`); the step checked `out_dir` up
    front (components.outputs.check_outputs), and it is checked again here in case it changed meanwhile.
    """
    from daft_core.models import save_model

    step = step or STEP_OF_STAGE.get(stage, stage)
    check_output_dir(out_dir, step)
    with atomic_dir(out_dir) as tmp:
        write_marker(tmp, step)
        save_model(model, tmp / MODEL_FILE, extra=dict(extra))
        for name, obj in (reports or {}).items():
            write_json(tmp / name, obj)
        for name, path in (files or {}).items():
            if Path(path).is_file():
                os.replace(path, tmp / name)
    return tracker.log_model(
        model,
        registered_model=params.pipeline.registered_model,
        stage=stage,
        method=method,
        alias=alias_for(alias_of),
        input_example=input_example(bundle),
        source_version=source_version(params, source) if source else None,
    )
