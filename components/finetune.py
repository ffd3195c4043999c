"""Step 5: one fine-tuning loop for every method; the method is a recipe (daft_core.recipes)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.common import (
    MODEL_FILE,
    STAGE_ALIASES,
    StepError,
    Timer,
    atomic_dir,
    base_parser,
    cli,
    input_example,
    load_data,
    model_file,
    params_from_args,
    source_version,
    tracked,
    write_json,
)
from components.params import Params

log = logging.getLogger(__name__)


def recipe_for(params: Params, method: str):  # -> Recipe
    from daft_core.recipes import get_recipe

    if method not in params.finetune.methods:
        raise StepError(
            f"method {method!r} is not configured under finetune.methods in params "
            f"(configured: {sorted(params.finetune.methods)})"
        )
    m = params.finetune.methods[method]
    overrides: dict[str, float] = {}
    if m.lr is not None:
        overrides = {"head_lr": m.lr, "backbone_lr": m.lr}
    if m.head_lr is not None:
        overrides["head_lr"] = m.head_lr
    if m.backbone_lr is not None:
        overrides["backbone_lr"] = m.backbone_lr
    return get_recipe(method, **overrides)


def config_for(params: Params, method: str):  # -> FinetuneConfig
    from daft_core.augment import AugmentConfig
    from daft_core.finetune import FinetuneConfig

    f = params.finetune
    m = f.methods[method]
    return FinetuneConfig(
        epochs=m.epochs if m.epochs is not None else f.epochs,
        batch_size=f.batch_size,
        momentum=f.momentum,
        weight_decay=f.weight_decay,
        augment=AugmentConfig(
            hflip=f.augment.hflip,
            random_resized_crop=f.augment.random_resized_crop,
            scale=tuple(f.augment.scale),
        ),
        seed=f.seed,
        device=f.device,
        compile=f.compile,
        channels_last=f.channels_last,
        eval_batch_size=params.evaluate.batch_size,
    )


def run(
    params: Params,
    method: str,
    model_in: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    curves_out: str | Path | None = None,
) -> dict[str, Any]:
    from daft_core.finetune import CheckpointMismatchError, finetune
    from daft_core.models import load_model, save_model

    timer = Timer()
    recipe = recipe_for(params, method)
    config = config_for(params, method)
    start = params.finetune.methods[method].start
    logged = {"method": method, "recipe": recipe.to_dict(), "config": config.to_dict(), "start": start}
    with tracked(params, "finetune", logged, method=method) as tracker:
        bundle = load_data(data_dir, tracker, "training")
        model = load_model(model_file(model_in))
        bn_converted = bool(model.extra.get("bn_converted", False))
        if recipe.convert_bn and not bn_converted:
            log.info("recipe %s converts BN itself (input model is not BN-converted)", method)
        if recipe.head_init == "probe" and model.extra.get("stage") != "linear_probe":
            raise StepError(
                f"method {method!r} starts from the linear probe's head, but {model_in} is a "
                f"{model.extra.get('stage')!r} model; set finetune.methods.{method}.start: linear_probe"
            )
        probe_head = model.head if recipe.head_init == "probe" else None
        # A stable place for the resumable checkpoint, so a killed run continues where it stopped.
        resume_dir = Path(out_dir).parent / f".{Path(out_dir).name}.resume"

        def on_epoch(record: dict[str, Any]) -> None:
            tracker.log_epoch(record)

        def train() -> Any:
            return finetune(
                model,
                bundle.train,
                bundle.val,
                recipe,
                config,
                probe_head=probe_head,
                bn_converted=bn_converted,
                checkpoint_dir=resume_dir,
                callback=on_epoch,
            )

        try:
            result = train()
        except CheckpointMismatchError as e:
            log.warning("discarding a resume checkpoint from another configuration (%s)", e)
            shutil.rmtree(resume_dir, ignore_errors=True)
            model = load_model(model_file(model_in))
            probe_head = model.head if recipe.head_init == "probe" else None
            result = train()
        summary = {
            "method": method,
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "epochs": config.epochs,
            "seconds": timer.seconds,
        }
        with atomic_dir(out_dir) as tmp:
            save_model(
                result.model,
                tmp / MODEL_FILE,
                extra={
                    "stage": "finetune",
                    "method": method,
                    "bn_converted": recipe.convert_bn or bn_converted,
                },
            )
            write_json(tmp / "history.json", result.history)
            write_json(tmp / "summary.json", summary)
            if result.conversion_report is not None:
                write_json(tmp / "bn_report.json", result.conversion_report)
            if (resume_dir / "last.pt").is_file():
                shutil.move(resume_dir / "last.pt", tmp / "last.pt")
        shutil.rmtree(resume_dir, ignore_errors=True)
        if curves_out is not None:
            write_json(curves_out, result.history)
        tracker.log_metrics({"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy})
        tracker.log_dict(result.history, "history.json")
        summary["registered_version"] = tracker.log_model(
            result.model,
            registered_model=params.pipeline.registered_model,
            stage="finetune",
            method=method,
            alias=STAGE_ALIASES[method],
            input_example=input_example(bundle),
            source_version=source_version(params, start),
        )
        log.info(
            "%s: best ID val %.4f at epoch %d (%.1fs)",
            method,
            result.best_val_accuracy,
            result.best_epoch,
            timer.seconds,
        )
        return summary


def _main(argv: Sequence[str] | None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--method", required=True, help="a key of finetune.methods in params")
    p.add_argument("--model", required=True, help="input model directory (the branch's start)")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="output directory (model.pt, last.pt, history.json)")
    p.add_argument("--curves", default=None, help="per-epoch history JSON for DVC plots")
    args = p.parse_args(argv)
    run(params_from_args(args), args.method, args.model, args.data, args.out, args.curves)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())
