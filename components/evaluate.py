"""Step 6: accuracy on ID val/test and every OOD set, calibration, and feature distortion vs pretrained."""

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
    write_json,
)
from components.outputs import check_outputs
from components.params import Params

log = logging.getLogger(__name__)


def summarize(method: str, raw: dict[str, Any], ood_names: Sequence[str]) -> dict[str, Any]:
    """Flatten daft_core.evaluate's report into the per-method metrics file DVC and the report read."""
    sets = raw["sets"]
    out: dict[str, Any] = {
        "method": method,
        "id_val_accuracy": sets["id_val"]["accuracy"],
        "id_test_accuracy": sets["id_test"]["accuracy"],
        "id_test_ece": sets["id_test"]["ece"],
        "ood": {name: sets[name]["accuracy"] for name in ood_names},
        "ood_ece": {name: sets[name]["ece"] for name in ood_names},
    }
    out["ood_mean_accuracy"] = sum(out["ood"].values()) / len(ood_names) if ood_names else None
    distortion = {
        name: s["feature_distortion"] for name, s in sets.items() if s.get("feature_distortion") is not None
    }
    if distortion:
        out["distortion"] = {
            "id_test_l2": distortion["id_test"]["l2_mean"],
            "id_test_cosine": distortion["id_test"]["cosine_mean"],
            "ood_l2": _mean([distortion[n]["l2_mean"] for n in ood_names]),
            "ood_cosine": _mean([distortion[n]["cosine_mean"] for n in ood_names]),
            "per_set": distortion,
        }
    pd = raw.get("parameter_distance")
    if pd:  # total: the backbone only (how far the pretrained features moved); the head separately
        out["parameter_distance_total"] = pd["total"]
        out["parameter_distance_head"] = pd.get("head")
    return out


def details_path(out_metrics: Path) -> Path:
    """The full evaluation report written beside the metrics file."""
    return out_metrics.with_suffix(".details.json")


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def run(
    params: Params,
    method: str,
    model_in: str | Path,
    reference_in: str | Path | None,
    data_dir: str | Path,
    out_metrics: str | Path,
) -> dict[str, Any]:
    out_metrics = Path(out_metrics)
    check_outputs(
        "evaluate",
        files=[out_metrics, details_path(out_metrics)],
        inputs=[model_in, reference_in, data_dir],
    )
    from daft_core.data.checks import check_labels_fit
    from daft_core.evaluate import evaluate
    from daft_core.models import load_model

    timer = Timer()
    e = params.evaluate
    with tracked(params, "evaluate", {"evaluate": e.model_dump(mode="json")}, method=method) as tracker:
        bundle = load_data(data_dir, tracker, "evaluation")
        model = load_model(model_file(model_in))
        check_labels_fit(model.num_classes, bundle, str(model_file(model_in)), data_where=str(data_dir))
        reference = load_model(model_file(reference_in)) if reference_in else None
        sets = {"id_val": bundle.val, "id_test": bundle.test, **bundle.ood}
        raw = evaluate(
            model,
            sets,
            reference,
            batch_size=e.batch_size,
            device=resolve_device(e.device),
            class_names=bundle.class_names,
        )
        metrics = summarize(method, raw, list(bundle.ood))
        if model.extra.get("variant"):  # not the published method: the report marks the row
            metrics["variant"] = model.extra["variant"]
        if model.extra.get("stage") == "wise_ft":  # a WiSE-FT mix: its base method and α, for the report
            metrics["wise_ft"] = dict(model.extra.get("wise_ft") or {})
        metrics["seconds"] = timer.seconds
        write_json(out_metrics, metrics)
        write_json(details_path(out_metrics), raw)
        tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("method", "distortion")})
        if "distortion" in metrics:
            tracker.log_metrics({k: v for k, v in metrics["distortion"].items() if k != "per_set"}, step=None)
        tracker.log_dict(raw, f"evaluation_{method}.json")
        log.info(
            "%s: ID test %.4f, OOD mean %s (%.1fs)",
            method,
            metrics["id_test_accuracy"],
            f"{metrics['ood_mean_accuracy']:.4f}" if metrics["ood_mean_accuracy"] is not None else "n/a",
            timer.seconds,
        )
        return {**metrics, **tracker.run_info()}  # the run's id and URL for the caller, not in the file


def _main(argv: Sequence[str] | None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--method", required=True, help="method name (for the metrics file and tracking)")
    p.add_argument("--model", required=True, help="model directory to evaluate")
    p.add_argument("--reference", default=None, help="pretrained model directory (feature distortion)")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="metrics JSON to write")
    args = p.parse_args(argv)
    run(params_from_args(args), args.method, args.model, args.reference, args.data, args.out)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())
