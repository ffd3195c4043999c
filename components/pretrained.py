"""Step 2: load and verify the pretrained backbone once; every branch starts from this checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.common import (
    MODEL_FILE,
    STAGE_ALIASES,
    Timer,
    atomic_dir,
    base_parser,
    cli,
    input_example,
    load_data,
    params_from_args,
    tracked,
    write_json,
)
from components.params import Params

log = logging.getLogger(__name__)


def run(params: Params, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    import torch

    from daft_core.models import build_model, count_batchnorm, save_model

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
            from components.common import StepError

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
        with atomic_dir(out_dir) as tmp:
            save_model(model, tmp / MODEL_FILE, extra={"stage": "pretrained", "bn_converted": False})
            write_json(tmp / "info.json", info)
        tracker.log_metrics({"batchnorm_layers": n_bn, "parameters": info["parameters"]})
        tracker.log_model(
            model,
            registered_model=params.pipeline.registered_model,
            stage="pretrained",
            method="pretrained",
            alias=STAGE_ALIASES["pretrained"],
            input_example=input_example(bundle),
        )
        log.info("pretrained %s: %d BN layers, wrote %s in %.1fs", m.name, n_bn, out_dir, timer.seconds)
        return info


def _main(argv: Sequence[str] | None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="output model directory")
    args = p.parse_args(argv)
    run(params_from_args(args), args.data, args.out)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())
