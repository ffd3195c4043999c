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
    description: str | None = None,
    alias: str | None = None,
) -> str | None:
    """The tail of every model-producing step: write `out_dir` atomically, then log and register the model.

    `out_dir` gets ``model.pt`` (with `extra`), one JSON file per entry of `reports` and the `files` moved
    in under their names. The registered version gets the alias of `alias_of` (a stage or method) and
    `source` (the stage the input model came from) as its lineage. Returns the version (None untracked).
    The folder is marked as `step`'s output (default: the step of `stage`); the step checked `out_dir` up
    front (components.outputs.check_outputs), and it is checked again here in case it changed meanwhile.

    The version's description (:func:`version_description`) says its stage, method, lineage, data (source
    and digest) and the params that made it; `description`, when given, is its first paragraph. The
    registered model gets :func:`registered_model_description` while it has none. `alias` overrides the
    catalogue alias of `alias_of` (a derived model, e.g. WiSE-FT's ``wise-ft-<method alias>``).
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
    if not getattr(tracker, "enabled", False):
        return None
    lineage = source_version(params, source) if source else None
    alias = alias or alias_for(alias_of)
    text = version_description(
        params,
        stage=stage,
        method=method,
        alias=alias,
        bundle=bundle,
        data_digest=_run_data_digest(tracker),
        source=source,
        source_version=lineage,
        run_id=getattr(tracker, "run_id", None),
        pipeline_run_id=getattr(tracker, "pipeline_id", None),
    )
    return tracker.log_model(
        model,
        registered_model=params.pipeline.registered_model,
        stage=stage,
        method=method,
        alias=alias,
        input_example=input_example(bundle),
        source_version=lineage,
        description=f"{description.strip()}\n\n{text}" if description and description.strip() else text,
        registered_model_description=registered_model_description(params),
    )


def _run_data_digest(tracker: Any) -> str | None:
    """The digest of the data the step read (the run's ``daft.data_digest`` tag, set by load_data)."""
    client, run_id = getattr(tracker, "client", None), getattr(tracker, "run_id", None)
    if client is None or run_id is None:
        return None
    from components.tracking.identity import DATA_DIGEST_TAG
    from components.tracking.retries import retry

    run = retry(tracker.uri, "read run tags", lambda: client.get_run(run_id))
    return run.data.tags.get(DATA_DIGEST_TAG)


def _fmt(x: Any) -> str:
    return "—" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def stage_params(params: Params, stage: str, method: str | None) -> dict[str, Any]:
    """The params that made a model of `stage` (and `method`, for a fine-tuned one), by name."""
    m = params.model
    out: dict[str, Any] = {"backbone": m.name, "weights": m.weights or "none", "input_size": m.input_size}
    if stage == "bn_converted":
        out.update({"bn_stats": params.convert_bn.stats, "bn_batch_size": params.convert_bn.batch_size})
    elif stage == "linear_probe":
        p = params.linear_probe
        out.update({"probe_num_cs": p.num_cs, "probe_c_min": p.c_min, "probe_c_max": p.c_max})
    elif stage == "finetune" and method:
        f = params.finetune
        entry = f.methods.get(method)
        try:
            recipe = params.recipe(method)
            out.update({"head_lr": recipe.head_lr, "backbone_lr": recipe.backbone_lr})
        except ValueError:  # not configured (a caller outside the pipeline): no lrs to report
            pass
        out.update(
            {
                "epochs": entry.epochs if entry is not None and entry.epochs is not None else f.epochs,
                "batch_size": f.batch_size,
                "momentum": f.momentum,
                "weight_decay": f.weight_decay,
                "seed": f.seed,
            }
        )
    return out


def version_description(
    params: Params,
    *,
    stage: str,
    method: str | None,
    alias: str,
    bundle: Any,
    data_digest: str | None = None,
    source: str | None = None,
    source_version: str | int | None = None,
    run_id: str | None = None,
    pipeline_run_id: str | None = None,
) -> str:
    """A registered version's description (Markdown, as the MLflow UI shows it): what the model is, where
    it came from, which data and which params."""
    meta = getattr(bundle, "meta", None) or {}
    what = f"**{stage}** model" + (f", method `{method}`" if method and method != stage else "")
    lines = [f"{what} of the DAFT pipeline (alias `{alias}`)."]
    if source:
        lines[0] += f" Derived from `{source}`" + (f" (version {source_version})." if source_version else ".")
    where = meta.get("source_uri") or params.data.root
    data = f"preset `{meta.get('preset', params.data.preset)}` (seed {meta.get('seed', params.data.seed)})"
    if where:
        data += f", source `{where}`"
    try:
        counts = (len(bundle.train.labels), len(bundle.val.labels), len(bundle.test.labels))
        data += f"; ID train/val/test {counts[0]}/{counts[1]}/{counts[2]} images"
        if bundle.ood:
            data += ", OOD " + ", ".join(f"`{n}`" for n in bundle.ood)
    except AttributeError:
        pass
    if data_digest:
        data += f"; digest `{data_digest}`"
    lines.append(f"- Data: {data}.")
    lines.append(
        "- Params: " + ", ".join(f"{k}={_fmt(v)}" for k, v in stage_params(params, stage, method).items())
    )
    runs = [
        f"MLflow run `{run_id}`" if run_id else "",
        f"pipeline run `{pipeline_run_id}`" if pipeline_run_id else "",
    ]
    if any(runs):
        lines.append("- " + ", ".join(r for r in runs if r) + ".")
    from components.tracking.redaction import redact

    return redact("\n".join([lines[0], "", *lines[1:]]))  # no credentials from a data URI


def registered_model_description(params: Params) -> str:
    """The registered model's description (set while it has none)."""
    from daft_core.methods import METHODS, START_ALIASES

    name = params.pipeline.registered_model
    aliases = ", ".join(
        f"`{a}`" for a in dict.fromkeys([*START_ALIASES.values(), *(m.alias for m in METHODS.values())])
    )
    return (
        f"Models of the DAFT fine-tuning pipeline (MLflow experiment `{params.pipeline.experiment}`): one "
        "version per model-producing step (pretrained, convert_bn, linear_probe, finetune per method); each "
        "version's description names its stage, data (source and digest) and params.\n\n"
        f"Aliases: {aliases}, and `champion` (the best method by ID val).\n\n"
        f'Load: `mlflow.pytorch.load_model("models:/{name}@champion")` (uint8 images (N, C, H, W) of any '
        f"size in, logits out). Serve: `mlflow models serve -m models:/{name}@champion`; the model carries "
        "its code (`daft_core`) and pinned requirements."
    )
