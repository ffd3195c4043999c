"""Step 2: load and verify the pretrained backbone once; every branch starts from this checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.common import (
    StepError,
    Timer,
    base_parser,
    cli,
    load_data,
    params_from_args,
    tracked,
)
from components.outputs import check_outputs
from components.params import Params
from components.publish import publish_model

log = logging.getLogger(__name__)


def run(params: Params, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    check_outputs("pretrained", dirs=[out_dir], inputs=[data_dir])
    import torch

    from daft_core.models import build_model, count_batchnorm

    timer = Timer()
    m = params.model
    with tracked(params, "pretrained", {"model": m.model_dump(mode="json")}) as tracker:
        bundle = load_data(data_dir, tracker, "training")
        torch.manual_seed(params.finetune.seed)  # a randomly initialised head/backbone is reproducible too
        model = build_model(
            m.name, weights=m.weights, num_classes=len(bundle.class_names), input_size=m.input_size
        )
        n_bn = count_batchnorm(model)
        if n_bn == 0:
            raise StepError(f"model {m.name!r} has no BatchNorm layer; DAFT needs a BN network")
        info = {
            "name": m.name,
            "weights": m.weights,
            "num_classes": len(bundle.class_names),
            "input_size": m.input_size,
            "num_features": model.num_features,
            "batchnorm_layers": n_bn,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        tracker.log_metrics({"batchnorm_layers": n_bn, "parameters": info["parameters"]})
        info["registered_version"] = publish_model(
            tracker,
            params,
            out_dir,
            model,
            stage="pretrained",
            step="pretrained",
            method="pretrained",
            alias_of="pretrained",
            bundle=bundle,
            extra={"stage": "pretrained", "bn_converted": False},
            reports={"info.json": info},
        )
        log.info("pretrained %s: %d BN layers, wrote %s in %.1fs", m.name, n_bn, out_dir, timer.seconds)
        return {**info, **tracker.run_info()}


def _main(argv: Sequence[str] | None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="output model directory")
    args = p.parse_args(argv)
    run(params_from_args(args), args.data, args.out)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())
