"""Step 1: build ID train/val/test and the OOD sets once, in the compact on-disk format."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.common import Timer, base_parser, cli, params_from_args, tracked, write_json
from components.outputs import check_output_dir, check_outputs, write_marker
from components.params import Params
from daft_core.atomic import atomic_dir

log = logging.getLogger(__name__)


def preset_kwargs(params: Params) -> dict[str, Any]:
    d = params.data
    # every preset: they also apply to `extra_ood` folders
    safety = {"follow_symlinks": d.follow_symlinks, "max_pixels": d.max_pixels}
    return {**safety, **_builder_kwargs(params)}


def _builder_kwargs(params: Params) -> dict[str, Any]:
    d = params.data
    if d.preset == "digits":
        train = 1.0 - d.val_fraction - d.test_fraction
        return {
            "fractions": (train, d.val_fraction, d.test_fraction),
            "printed_per_class": d.printed_per_class,
        }
    if d.preset == "imagefolder":
        return {
            "id_train": d.id_train,
            "id_val": d.id_val,
            "id_test": d.id_test,
            "ood": dict(d.ood),
            "val_fraction": d.val_fraction,
            "image_size": d.image_size,
            "grayscale": d.grayscale,
            "on_bad_image": d.on_bad_image,
        }
    return {"val_fraction": d.val_fraction}


def run(params: Params, out_dir: str | Path) -> dict[str, Any]:
    check_outputs("prepare_data", dirs=[out_dir])
    from daft_core.data import load_preset, save_bundle

    timer = Timer()
    d = params.data
    with tracked(params, "prepare_data", {"data": d.model_dump(mode="json")}) as tracker:
        log.info("building preset %r (seed %d)", d.preset, d.seed)
        bundle = load_preset(
            d.preset, seed=d.seed, root=d.root, extra_ood=dict(d.extra_ood) or None, **preset_kwargs(params)
        )
        check_output_dir(out_dir, "prepare_data")  # again, in case it changed meanwhile
        with atomic_dir(out_dir) as tmp:  # the bundle and its marker land in one rename
            staged = tmp / "bundle"
            manifest = save_bundle(bundle, staged)
            for entry in staged.iterdir():
                os.replace(entry, tmp / entry.name)
            staged.rmdir()
            write_marker(tmp, "prepare_data")
        counts = {"id_train": len(bundle.train), "id_val": len(bundle.val), "id_test": len(bundle.test)}
        counts.update({f"ood.{k}": len(v) for k, v in bundle.ood.items()})
        tracker.log_metrics({f"count.{k}": v for k, v in counts.items()})
        tracker.log_dataset(str(out_dir), manifest, name=f"{d.preset}-prepared", context="prepared")
        log.info("wrote %s: %s in %.1fs", out_dir, counts, timer.seconds)
        return {"out_dir": str(out_dir), "counts": counts, "seconds": timer.seconds}


def _main(argv: Sequence[str] | None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--out", required=True, help="directory for the prepared dataset")
    p.add_argument("--summary", default=None, help="optional JSON file for the counts")
    args = p.parse_args(argv)
    check_outputs("prepare_data", dirs=[args.out], files=[args.summary])
    result = run(params_from_args(args), args.out)
    if args.summary:
        write_json(args.summary, result)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())
