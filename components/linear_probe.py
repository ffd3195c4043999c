"""Step 4: linear probing: frozen features once, logistic-regression C sweep chosen on ID val.

``linear_probe.normalize`` (default ``scalar``, the paper's one mean / one std over all train features)
and ``linear_probe.max_iter`` (default 200, the official config's) go to ``fit_linear_probe``; the mode
is recorded in ``probe.json``, the model's metadata, the step's metrics and the returned summary.
"""

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
    check_outputs("linear_probe", dirs=[out_dir], inputs=[model_in, data_dir])
    import numpy as np
    import torch

    from daft_core.data import iterate_batches
    from daft_core.data.checks import check_labels_fit
    from daft_core.models import load_model
    from daft_core.probe import extract_features, fit_linear_probe

    timer = Timer()
    lp = params.linear_probe
    with tracked(
        params, "linear_probe", {"linear_probe": lp.model_dump(mode="json")}, method="lp"
    ) as tracker:
        bundle = load_data(data_dir, tracker, "training")
        source = load_model(model_file(model_in))
        check_labels_fit(source.num_classes, bundle, str(model_file(model_in)), data_where=str(data_dir))
        device = resolve_device(lp.device)
        source.to(device)
        feats = {}
        for name, ds in (("train", bundle.train), ("val", bundle.val)):
            feats[name] = extract_features(
                source, iterate_batches(ds, lp.batch_size, device=device), device, progress=True
            )
        source.cpu()
        log.info("features: train %s, val %s", tuple(feats["train"][0].shape), tuple(feats["val"][0].shape))
        result = fit_linear_probe(
            *feats["train"],
            *feats["val"],
            Cs=np.logspace(np.log10(lp.c_min), np.log10(lp.c_max), lp.num_cs),
            num_classes=len(bundle.class_names),
            device=device,
            normalize=lp.normalize,
            max_iter=lp.max_iter,
        )
        with torch.no_grad():
            source.head.weight.copy_(result.head.weight)
            source.head.bias.copy_(result.head.bias)
        for i, row in enumerate(result.sweep):
            tracker.log_metrics({"sweep.val_accuracy": row["val_accuracy"], "sweep.C": row["C"]}, step=i)
        tracker.log_metrics(
            {
                "best_C": result.best_C,
                "val_accuracy": result.val_accuracy,
                "train_accuracy": result.train_accuracy,
                "head_max_abs_weight": float(result.head.weight.detach().abs().max()),
            }
        )
        version = publish_model(
            tracker,
            params,
            out_dir,
            source,
            stage="linear_probe",
            step="linear_probe",
            method="lp",
            alias_of="linear_probe",
            bundle=bundle,
            extra={"stage": "linear_probe", "bn_converted": False, "probe_normalize": result.normalize},
            reports={"probe.json": result.to_dict()},
            source="pretrained",
        )
        log.info(
            "probe (%s normalisation, max_iter %d): best C %.3g, ID val %.4f (sweep of %d in %.1fs)",
            result.normalize,
            lp.max_iter,
            result.best_C,
            result.val_accuracy,
            len(result.sweep),
            result.seconds,
        )
        return {
            "best_C": result.best_C,
            "val_accuracy": result.val_accuracy,
            "normalize": result.normalize,
            "max_iter": lp.max_iter,
            "seconds": timer.seconds,
            "registered_version": version,
            **tracker.run_info(),
        }


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
