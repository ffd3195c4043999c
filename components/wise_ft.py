"""Step 5b (optional): WiSE-FT, a fine-tuned model's weights mixed with its start's, α chosen on ID val.

Wortsman et al. 2022 (daft_core.wise_ft). For each method listed under ``wise_ft.methods`` the fine-tuned
model (finetune's output) is interpolated with the model its branch started from (the method's ``start``,
with the head the run began from: the probe's for LP-FT, zero otherwise; daft_core.wise_ft.start_model),
every α of ``wise_ft.alphas`` is scored on ID val (evaluate's batch size and device), and the best (ties: the
smaller α) is written in finetune's checkpoint format, so components.evaluate evaluates it as the row
``wise_ft_<method>``. Its registered version gets the alias ``wise-ft-<method alias>``.
"""

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
    model_file,
    params_from_args,
    resolve_device,
    tracked,
    write_json,
)
from components.outputs import check_outputs
from components.params import Params
from components.publish import publish_model
from daft_core.methods import alias_for

log = logging.getLogger(__name__)

STEP = "wise_ft"
PREFIX = "wise_ft_"
REPORT_FILE = "wise_ft.json"  # in the output folder: the α curve and the chosen α


def wise_method(method: str) -> str:
    """The WiSE-FT row's name (metrics file, report, tracking): ``wise_ft_<method>``."""
    return f"{PREFIX}{method}"


def wise_alias(method: str) -> str:
    """The registry alias of `method`'s WiSE-FT model: ``wise-ft-<method alias>``."""
    return f"wise-ft-{alias_for(method)}"


def _check_inputs(
    params: Params, method: str, finetuned: Any, start: Any, model_in: Any, start_in: Any
) -> str:
    """The configured start of `method`; StepError when the two models are not that method's pair."""
    expected = params.method(method).start
    stage, of = finetuned.extra.get("stage"), finetuned.extra.get("method")
    if stage != "finetune" or of != method:
        raise StepError(
            f"{model_in} is not {method!r}'s fine-tuned model (it is a {stage!r} model of {of!r}); pass "
            f"finetune's output for {method} (models/finetune/{method})"
        )
    got = start.extra.get("stage")
    if got != expected:
        raise StepError(
            f"{start_in} is a {got!r} model, but {method!r} starts from {expected!r} "
            f"(finetune.methods.{method}.start); pass models/{expected}"
        )
    return expected


def run(
    params: Params,
    method: str,
    model_in: str | Path,
    start_in: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    curve_out: str | Path | None = None,
) -> dict[str, Any]:
    """Interpolate `method`'s fine-tuned model (`model_in`) with its start (`start_in`), choose α on ID
    val, write the chosen model to `out_dir` (model.pt, wise_ft.json) and the α curve to `curve_out`."""
    from daft_core.data.checks import check_labels_fit
    from daft_core.models import load_model
    from daft_core.wise_ft import check_alphas, select_alpha, start_model

    check_outputs(STEP, dirs=[out_dir], files=[curve_out], inputs=[model_in, start_in, data_dir])
    timer = Timer()
    alphas = check_alphas(params.wise_ft.alphas)
    e = params.evaluate
    logged = {"method": method, "alphas": alphas, "batch_size": e.batch_size, "device": e.device}
    with tracked(params, STEP, {"wise_ft": logged}, method=method) as tracker:
        bundle = load_data(data_dir, tracker, "selection")
        finetuned = load_model(model_file(model_in))
        start = load_model(model_file(start_in))
        start_stage = _check_inputs(params, method, finetuned, start, model_in, start_in)
        check_labels_fit(finetuned.num_classes, bundle, str(model_file(model_in)), data_where=str(data_dir))
        head_init = params.recipe(method).head_init  # the head the run began from (probe / zero)
        try:
            result = select_alpha(
                start_model(start, head_init),
                finetuned,
                bundle.val.images,
                bundle.val.labels,
                alphas,
                batch_size=e.batch_size,
                device=resolve_device(e.device),
            )
        except ValueError as err:  # architectures differ: name both inputs
            raise StepError(f"cannot mix {model_in} with {start_in}: {err}") from None
        by_alpha = {p["alpha"]: p["val_accuracy"] for p in result.curve}
        summary = {
            "method": method,
            "wise_method": wise_method(method),
            "start": start_stage,
            "start_head": "probe" if head_init == "probe" else "zero",
            "alpha": result.alpha,
            "val_accuracy": by_alpha[result.alpha],
            "curve": result.curve,
            "seconds": timer.seconds,
        }
        for i, point in enumerate(result.curve):
            tracker.log_metrics({f"curve.{k}": v for k, v in point.items()}, step=i)
        tracker.log_metrics({"alpha": result.alpha, "val_accuracy": summary["val_accuracy"]})
        tracker.log_dict(summary, REPORT_FILE)
        if curve_out is not None:
            write_json(curve_out, result.curve)
        wise = {"method": method, "alpha": result.alpha, "start": start_stage, "alias": wise_alias(method)}
        extra = {
            "stage": STEP,
            "method": wise_method(method),
            "bn_converted": bool(finetuned.extra.get("bn_converted", False)),
            "wise_ft": wise,
        }
        if finetuned.extra.get("variant"):  # a variant's mix is that variant's, not the published method's
            extra["variant"] = finetuned.extra["variant"]
        summary["registered_version"] = _publish(
            tracker, params, out_dir, result.model, method, bundle, extra, {REPORT_FILE: summary}
        )
        log.info(
            "%s: alpha %.2f (ID val %.4f; alpha=1, the fine-tuned model: %s) in %.1fs",
            wise_method(method),
            result.alpha,
            summary["val_accuracy"],
            f"{by_alpha[1.0]:.4f}" if 1.0 in by_alpha else "not on the grid",
            timer.seconds,
        )
        return {**summary, **tracker.run_info()}


def _publish(
    tracker: Any,
    params: Params,
    out_dir: str | Path,
    model: Any,
    method: str,
    bundle: Any,
    extra: dict[str, Any],
    reports: dict[str, Any],
) -> str | None:
    """publish_model with the WiSE-FT alias and the fine-tuned model's version as lineage."""
    wise = extra["wise_ft"]
    first = (
        f"WiSE-FT mix of `{method}` with its start `{wise['start']}`: "
        f"θ = {1 - wise['alpha']:g}·θ_start + {wise['alpha']:g}·θ_{method}, α chosen on ID val."
    )
    return publish_model(
        tracker,
        params,
        out_dir,
        model,
        stage=STEP,
        method=wise_method(method),
        alias_of=method,
        alias=wise_alias(method),
        bundle=bundle,
        extra=extra,
        reports=reports,
        source=method,
        step=STEP,
        description=first,
    )


def _main(argv: Sequence[str] | None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--method", required=True, help="a fine-tuned method (a key of finetune.methods)")
    p.add_argument("--model", required=True, help="the method's fine-tuned model directory")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--start", help="the model directory the method's branch started from")
    where.add_argument(
        "--starts",
        help="a folder holding the start models by stage name (models/ in dvc.yaml): the method's "
        "configured start (finetune.methods.<method>.start) is taken from it",
    )
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="output directory (model.pt, wise_ft.json)")
    p.add_argument("--curves", default=None, help="the α curve as JSON (DVC plots)")
    args = p.parse_args(argv)
    params = params_from_args(args)
    start = args.start or Path(args.starts) / params.method(args.method).start
    run(params, args.method, args.model, start, args.data, args.out, args.curves)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())
