"""Step 3: DAFT's BN conversion: target statistics in, function-preserving rescale, per-layer report out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.common import (
    Timer,
    base_parser,
    cli,
    load_data,
    model_file,
    params_from_args,
    resolve_device,
    tracked,
)
from components.outputs import check_outputs
from components.params import Params
from components.publish import publish_model

log = logging.getLogger(__name__)


def run(params: Params, model_in: str | Path, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    check_outputs("convert_bn", dirs=[out_dir], inputs=[model_in, data_dir])
    from daft_core.bn_conversion import convert_batchnorm
    from daft_core.data import iterate_batches
    from daft_core.models import load_model

    timer = Timer()
    c = params.convert_bn
    with tracked(params, "convert_bn", {"convert_bn": c.model_dump(mode="json")}) as tracker:
        bundle = load_data(data_dir, tracker, "training")
        model = load_model(model_file(model_in))
        device = resolve_device(params.finetune.device)
        model.to(device)
        batches = iterate_batches(bundle.train, c.batch_size, device=device)
        report = convert_batchnorm(model, batches, stats=c.stats).to_dict()
        model.cpu()
        converted = [layer for layer in report["layers"] if not layer.get("skipped")]
        summary = {
            "layers_converted": len(converted),
            "layers_skipped": len(report["layers"]) - len(converted),
            "num_samples": report["num_samples"],
            "scale_min": min((layer["scale_min"] for layer in converted), default=None),
            "scale_max": max((layer["scale_max"] for layer in converted), default=None),
        }
        tracker.log_metrics(summary)
        tracker.log_dict(report, "bn_report.json")
        version = publish_model(
            tracker,
            params,
            out_dir,
            model,
            stage="bn_converted",
            step="convert_bn",
            method="daft",
            alias_of="bn_converted",
            bundle=bundle,
            extra={"stage": "bn_converted", "bn_converted": True},
            reports={"bn_report.json": report},
            source="pretrained",
        )
        log.info("converted %d BN layers (%s stats) in %.1fs", len(converted), c.stats, timer.seconds)
        return {**summary, "seconds": timer.seconds, "registered_version": version, **tracker.run_info()}


def _main(argv: Sequence[str] | None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--model", required=True, help="input model directory (the pretrained step's output)")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="output model directory")
    args = p.parse_args(argv)
    run(params_from_args(args), args.model, args.data, args.out)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())
