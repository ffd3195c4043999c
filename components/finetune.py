"""Step 5: one fine-tuning loop for every method; the method is a recipe (daft_core.recipes)."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.common import (
    StepError,
    Timer,
    base_parser,
    cli,
    load_data,
    model_file,
    params_from_args,
    tracked,
    write_json,
)
from components.outputs import check_outputs
from components.params import Params, without_tracking
from components.publish import publish_model

if TYPE_CHECKING:
    from daft_core.recipes import Recipe
    from daft_core.training import FinetuneConfig
    from daft_core.training.distributed import Dist

log = logging.getLogger(__name__)

RESUME_URI_ENV = "DAFT_RESUME_URI"  # s3://bucket/prefix: the resumable checkpoint also lives there


def finetune_config(params: Params, method: str, **overrides: Any) -> FinetuneConfig:
    """The loop's settings for `method` from params (its own `epochs`, if configured, wins), then
    `overrides`: the one translation of params' finetune section (this step, Kubeflow, the benchmark)."""
    from daft_core.augment import AugmentConfig
    from daft_core.training import FinetuneConfig

    f, m = params.finetune, params.finetune.methods.get(method)
    settings: dict[str, Any] = {
        "epochs": m.epochs if m is not None and m.epochs is not None else f.epochs,
        "batch_size": f.batch_size,
        "momentum": f.momentum,
        "weight_decay": f.weight_decay,
        "augment": AugmentConfig(
            hflip=f.augment.hflip,
            random_resized_crop=f.augment.random_resized_crop,
            scale=tuple(f.augment.scale),
        ),
        "seed": f.seed,
        "device": f.device,
        "compile": f.compile,
        "channels_last": f.channels_last,
        "schedule": f.schedule,
        "sync_bn": f.sync_bn,
        "eval_batch_size": params.evaluate.batch_size,
    }
    return FinetuneConfig(**{**settings, **overrides})


def point_key(recipe: Recipe) -> str:
    """A sweep point's part of the resume store key, from its learning rates: ``h0.01-b0.001``."""
    return f"h{float(recipe.head_lr)!r}-b{float(recipe.backbone_lr)!r}"


def resume_store_uri(params: Params, method: str, recipe: Recipe) -> str | None:
    """``<DAFT_RESUME_URI>/<run id>/<method>/<point key>/last.pt``, or None when the store is not set.

    The run id is ``DAFT_PIPELINE_RUN_ID`` (Kubeflow's run id, the same for every retry of a pod), else the
    id every step of a local run derives from the code and params (components.tracking.identity).
    """
    from components.storage import split_s3_uri

    prefix = os.environ.get(RESUME_URI_ENV, "").strip()
    if not prefix:
        return None
    split_s3_uri(prefix)  # StorageError naming the value: only s3:// is supported
    run_id = os.environ.get("DAFT_PIPELINE_RUN_ID", "").strip()
    if not run_id:
        from components.params import params_to_json
        from components.tracking.identity import pipeline_run_id

        run_id = pipeline_run_id(params_to_json(params))
    run_id = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
    return f"{prefix.rstrip('/')}/{run_id}/{method}/{point_key(recipe)}/last.pt"


class ResumeStore:
    """The resumable checkpoint's copy in the object store, so a retried pod (a fresh disk) resumes.

    `pull` before training (only when there is no local ``last.pt``: a local one is at least as new),
    `push` after each epoch's checkpoint (best effort: a failed upload is a warning, training goes on),
    `drop` once the step has succeeded. The library decides whether a pulled checkpoint belongs to this run
    (its fingerprint); another run's is set aside, and the next `push` replaces it.
    """

    def __init__(self, uri: str, resume_dir: Path) -> None:
        self.uri, self.local = uri, resume_dir / "last.pt"

    def pull(self, resume: str) -> bool:
        from components import storage

        if resume == "never":
            return False
        if self.local.exists():
            log.info("resume store: keeping the local %s (not downloading %s)", self.local, self.uri)
            return False
        if not storage.exists(self.uri):  # also fails fast on a missing bucket or refused credentials
            log.info("resume store: no checkpoint at %s yet; starting fresh", self.uri)
            return False
        part = self.local.with_name(".last.pt.download")
        storage.fetch_file(self.uri, part)
        os.replace(part, self.local)
        log.info("resume store: downloaded %s to %s", self.uri, self.local)
        return True

    def push(self) -> None:
        from components import storage

        try:
            storage.put_file(self.local, self.uri)
        except storage.StorageError as e:
            log.warning("resume store: upload failed (a retry would redo this epoch): %s", e)

    def drop(self) -> None:
        from components import storage

        try:
            storage.delete(self.uri)
        except storage.StorageError as e:
            log.warning("resume store: could not delete %s after success: %s", self.uri, e)


def run(
    params: Params,
    method: str,
    model_in: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    curves_out: str | Path | None = None,
    resume: str = "auto",
) -> dict[str, Any]:
    """Fine-tune one branch. Under ``torchrun --nproc-per-node N -m components.finetune ...`` every rank
    trains its share of each batch; rank 0 alone writes the outputs and talks to MLflow and the resume
    store, the others return after it has published (docs/distributed.md)."""
    from daft_core.training.distributed import barrier, distributed_session

    with distributed_session(params.finetune.device) as rank:
        summary = _run(params, method, model_in, data_dir, out_dir, curves_out, resume, rank)
        barrier(rank)  # the other ranks wait until rank 0 has published
        return summary


def _untracked(params: Params) -> Params:
    """``params`` with tracking off: what ranks other than 0 run with."""
    return without_tracking(params)


def _run(
    params: Params,
    method: str,
    model_in: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    curves_out: str | Path | None,
    resume: str,
    rank: Dist,
) -> dict[str, Any]:
    from daft_core.atomic import recover
    from daft_core.data.checks import check_labels_fit
    from daft_core.faults import kill_point
    from daft_core.models import load_model
    from daft_core.training import finetune

    if rank.is_main:
        check_outputs("finetune", dirs=[out_dir], files=[curves_out], inputs=[model_in, data_dir])
    else:
        params = _untracked(params)  # one MLflow run and one registered version per job: rank 0's

    timer = Timer()
    recipe = params.recipe(method)
    config = finetune_config(params, method)
    start = params.method(method).start
    variant = params.method(method).variant  # a run that is not the published method is named (params)
    logged = {"method": method, "recipe": recipe.to_dict(), "config": config.to_dict(), "start": start}
    if variant is not None:
        logged["variant"] = variant
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
        if rank.is_main:
            recover(resume_dir / "last.pt")  # torn temporaries of a checkpoint write a kill interrupted
        store_uri = resume_store_uri(params, method, recipe)
        store = ResumeStore(store_uri, resume_dir) if store_uri and rank.is_main else None
        if store is not None:
            store.pull(resume)

        def on_epoch(record: dict[str, Any]) -> None:
            # The library calls this after the epoch's last.pt is written: upload it before anything else.
            if store is not None:
                store.push()
                kill_point("finetune.after_resume_upload")  # fault tests: die with the upload done
            tracker.log_epoch(record)

        check_labels_fit(model.num_classes, bundle, str(model_file(model_in)), data_where=str(data_dir))
        result = finetune(
            model,
            bundle.train,
            bundle.val,
            recipe,
            config,
            probe_head=probe_head,
            bn_converted=bn_converted,
            checkpoint_dir=resume_dir,
            callback=on_epoch,
            resume=resume,  # a checkpoint of another run (or a corrupt one): set aside (auto) or fail (must)
        )
        summary = {
            "method": method,
            "variant": variant,
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "epochs": config.epochs,
            "world_size": result.world_size,
            "batch_size_per_rank": config.batch_size,
            "seconds": timer.seconds,
        }
        if not rank.is_main:
            return summary  # outputs, tracking and the resume store are rank 0's
        if curves_out is not None:
            write_json(curves_out, result.history)
        tracker.log_metrics({"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy})
        tracker.log_dict(result.history, "history.json")
        reports = {"history.json": result.history, "summary.json": summary}
        if result.conversion_report is not None:
            reports["bn_report.json"] = result.conversion_report
        summary["registered_version"] = publish_model(
            tracker,
            params,
            out_dir,
            result.model,
            stage="finetune",
            method=method,
            alias_of=method,
            bundle=bundle,
            extra={
                "stage": "finetune",
                "method": method,
                "variant": variant,
                "bn_converted": recipe.convert_bn or bn_converted,
            },
            reports=reports,
            files={"last.pt": resume_dir / "last.pt"},
            source=start,
        )
        shutil.rmtree(resume_dir, ignore_errors=True)
        if store is not None:
            store.drop()
        summary.update(head_lr=recipe.head_lr, backbone_lr=recipe.backbone_lr, **tracker.run_info())
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
    p.add_argument(
        "--resume",
        choices=("auto", "must", "never"),
        default="auto",
        help="a resume checkpoint from another run or an unreadable one: set it aside and start fresh "
        "(auto, the default), fail (must), or always start fresh (never)",
    )
    args = p.parse_args(argv)
    run(params_from_args(args), args.method, args.model, args.data, args.out, args.curves, args.resume)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())
