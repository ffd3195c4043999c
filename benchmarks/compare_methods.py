"""FT vs LP vs LP-FT vs DAFT (and DAFT's two ablations): ID/OOD accuracy and feature distortion over seeds.

    python -m benchmarks.compare_methods --seeds 5 [--params params.yaml] [--set KEY=VALUE ...]
        [--preset digits] [--epochs N] [--input-size 48] [--model efficientnet_lite0 --weights imagenet]
        [--methods ft,lp,lp_ft,daft,daft_bn_only,daft_fast_head_only] [--no-sweep] [--out PREFIX]
        [--no-wise-ft] [--variant METHOD=NAME] [--max-train N] [--threads N]

Settings come from params.yaml (the pipeline's own: data, model, the fine-tuning loop, each method's lrs
for --no-sweep), then --set, then the explicit flags; the methods, their grids and the ablations' parents
come from the method catalogue (daft_core.methods).

Prints a table and, as its last stdout line, ONE JSON line; progress (method, seed, lrs, ID val, seconds)
goes to stderr. ``--out PREFIX`` also writes ``PREFIX.md`` and ``PREFIX.json`` (rewritten after every
method, so an interrupted run leaves its partial results).

Protocol (what is measured, and how hyper-parameters are chosen):

- Data: ``load_preset(preset, seed=--data-seed)``; the split and the OOD sets are the same for every run.
  Seeds vary only the fine-tuning seed (``FinetuneConfig.seed``: head init, shuffling, augmentation), so
  every method is scored on the same ID test and OOD images.
- Model: ``build_model(--model, weights=--weights, num_classes=..., input_size=--input-size)``; the
  pristine pretrained model is the reference for feature distortion.
- LP: ``fit_linear_probe`` on frozen features with the paper's ``logspace(-7, 2, 50)`` C sweep, chosen on ID
  val. It is deterministic (no augmentation, full-batch solver), so its std over seeds is 0 by
  construction; it is fitted once and reported for every seed.
- FT / LP-FT / DAFT and the ablations: ``finetune`` with the recipe of that name, started as the pipeline
  starts them: LP-FT from the LP head; DAFT and ``daft_bn_only`` from the BN-converted model (the
  convert_bn stage's procedure: ``convert_batchnorm`` over ID train with params' ``convert_bn`` settings);
  the pipeline's loop settings (params.yaml); best epoch chosen on ID val.
- Learning rates: each fine-tuned method's grid from the catalogue (the ablations have their own, as
  the official code defines them), run on seed 0 only and selected by best ID-val accuracy (ties: the
  earlier grid entry); the selected lrs are reused for the other seeds, and the seed-0 sweep run of the
  selected lrs *is* the seed-0 result (ID test and OOD sets are never looked at during selection). Every
  point must be the published method (``Method.published_violation``) unless ``--variant METHOD=NAME``
  names the method's rows as a variant, which the report marks.
- WiSE-FT (Wortsman et al. 2022), for every fine-tuned method and seed: the weights interpolated between
  the run's start (its start model; the head it started from, zero for a random-head start) and the
  fine-tuned model, alpha on ``daft_core.wise_ft.DEFAULT_ALPHAS`` chosen on ID val; rows ``<method>+wise``.
- Metrics, from ``daft_core.evaluate.evaluate(model, sets, reference=pretrained)``: accuracy on ID test and
  on every OOD set; feature distortion (mean L2 distance and mean cosine similarity between the model's
  and the pretrained model's penultimate features) on ID test and on every OOD set; ``ood_mean`` is the
  unweighted mean over the OOD sets. Mean and std (sample std, ddof=1; 0 for a single seed) over seeds.
- Uncertainty: ``comparisons`` holds, for DAFT against every other row, the per-seed paired differences
  (DAFT - other, same seed) of ID test and OOD-mean accuracy, their mean and a 95 % t-interval
  (``ci95``, n - 1 degrees of freedom); the report says when an interval includes 0, and which regime the
  preset is in (LP vs FT on OOD).

Grid syntax (``--grid``/``--lr``): ``METHOD=LR[,LR...]`` for one-lr methods (head and backbone share it)
and ``METHOD=HEAD:BACKBONE[,HEAD:BACKBONE...]`` for two-lr methods; repeat the flag per method.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.finetune import finetune_config
from components.params import DEFAULT_PARAMS, Params, load_params, parse_overrides
from daft_core.atomic import atomic_file
from daft_core.data import iterate_batches, load_preset
from daft_core.devices import resolve_device
from daft_core.evaluate import evaluate
from daft_core.methods import FINETUNED_METHODS, METHOD_ORDER, METHODS, LrPair, get_recipe, parse_lrs
from daft_core.models import build_model
from daft_core.probe import LOGSPACE_CS, extract_features, fit_linear_probe
from daft_core.selection import best_index
from daft_core.training import FinetuneConfig, NonFiniteLossError, finetune

log = logging.getLogger("benchmarks.compare_methods")

# Everything about the methods comes from the catalogue (daft_core.methods).
ALL_METHODS = METHOD_ORDER
FINETUNED = FINETUNED_METHODS
TWO_LR = tuple(m for m in FINETUNED if METHODS[m].sweep == "grid")  # head lr and backbone lr apart
DEFAULT_GRIDS: dict[str, list[LrPair]] = {m: list(METHODS[m].grid) for m in FINETUNED if METHODS[m].grid}
REFERENCE = "daft"  # the method every other row is compared against (paired over seeds)
WISE = "+wise"  # suffix of a WiSE-FT row: "<method>+wise"


def default_lrs(params: Params, method: str) -> LrPair:
    """--no-sweep: params.yaml's lrs, else the recipe's defaults."""
    recipe = params.recipe(method) if method in params.finetune.methods else get_recipe(method)
    return (recipe.head_lr, recipe.backbone_lr)


# ------------------------------------------------------------------------------------------------ args


def _method_map(items: Sequence[str] | None, flag: str) -> dict[str, list[LrPair]]:
    out: dict[str, list[LrPair]] = {}
    for item in items or ():
        method, sep, spec = item.partition("=")
        method = method.strip()
        if not sep or method not in FINETUNED:
            raise SystemExit(f"{flag} {item!r}: expected METHOD=LRS with METHOD in {', '.join(FINETUNED)}")
        out[method] = parse_lrs(spec, method)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare_methods",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--params", default=str(DEFAULT_PARAMS), help="settings from this params.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    p.add_argument("--preset", default=None, help="data.preset (default: params')")
    p.add_argument("--data-seed", type=int, default=None, help="data.seed: split/OOD, fixed across seeds")
    p.add_argument("--seeds", type=int, default=5, help="fine-tuning seeds 0..N-1 (>= 5 for intervals)")
    p.add_argument("--epochs", type=int, default=None, help="finetune.epochs (default: params')")
    p.add_argument("--batch-size", type=int, default=None, help="finetune.batch_size (default: params')")
    p.add_argument("--input-size", type=int, default=None, help="model.input_size (default: params')")
    p.add_argument("--model", default=None, help="model.name: a name in daft_core.MODEL_REGISTRY")
    p.add_argument("--weights", default=None, help="model.weights: 'imagenet', a checkpoint path, or 'none'")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated subset")
    p.add_argument("--no-sweep", action="store_true", help="no lr sweep: use --lr values or the defaults")
    p.add_argument("--grid", action="append", metavar="METHOD=LRS", help="override a method's sweep grid")
    p.add_argument("--lr", action="append", metavar="METHOD=LR", help="lrs for --no-sweep (one entry)")
    p.add_argument("--no-wise-ft", action="store_true", help="skip the WiSE-FT rows")
    p.add_argument(
        "--variant",
        action="append",
        metavar="METHOD=NAME",
        help="allow lrs that are not the published method for METHOD; its rows are marked NAME",
    )
    p.add_argument("--max-train", type=int, default=None, help="subsample ID train (smoke tests)")
    p.add_argument("--device", default=None, help="finetune.device (default: params')")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="write PREFIX.md and PREFIX.json")
    return p


# ------------------------------------------------------------------------------------------------ stats


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": int(arr.size)}


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Per-seed differences a - b, their mean and a 95 % t-interval (n - 1 degrees of freedom)."""
    from scipy.stats import t as student_t

    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = int(diffs.size)
    mean = float(diffs.mean())
    if n < 2:
        lo = hi = None
    else:
        half = float(student_t.ppf(0.975, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
        lo, hi = mean - half, mean + half
    return {
        "diffs": [float(d) for d in diffs],
        "mean": mean,
        "ci95": [lo, hi] if lo is not None else None,
        "n": n,
        "includes_zero": None if lo is None else bool(lo <= 0.0 <= hi),
    }


def comparisons(methods: dict[str, Any], reference: str = REFERENCE) -> dict[str, Any]:
    """`reference` against every other row: paired (same seed) differences of ID test and OOD mean."""
    if reference not in methods:
        return {}
    ref = {r["seed"]: r["metrics"] for r in methods[reference]["per_seed"]}
    out: dict[str, Any] = {}
    for name, res in methods.items():
        if name == reference:
            continue
        other = {r["seed"]: r["metrics"] for r in res["per_seed"]}
        seeds = sorted(set(ref) & set(other))
        entry: dict[str, Any] = {"seeds": seeds}
        for key, label in (("acc.id_test", "id_test"), ("acc.ood_mean", "ood_mean")):
            if all(key in ref[s] and key in other[s] for s in seeds) and seeds:
                entry[label] = paired([ref[s][key] for s in seeds], [other[s][key] for s in seeds])
        out[f"{reference} - {name}"] = entry
    return out


def regime(methods: dict[str, Any]) -> dict[str, Any] | None:
    """Which side of the paper's premise the preset is on: LP beats FT OOD (the paper's regime) or not."""
    try:
        lp = methods["lp"]["summary"]["acc.ood_mean"]["mean"]
        ft = methods["ft"]["summary"]["acc.ood_mean"]["mean"]
    except KeyError:
        return None
    return {"lp_ood_mean": lp, "ft_ood_mean": ft, "lp_beats_ft_ood": bool(lp > ft)}


def _flat_metrics(ev: dict[str, Any], ood_names: Sequence[str]) -> dict[str, float]:
    """evaluate()'s nested output -> flat ``acc.<set>``, ``dist_l2.<set>``, ``dist_cos.<set>``, + ood_mean."""
    sets = ev["sets"]
    out: dict[str, float] = {}
    for name, r in sets.items():
        out[f"acc.{name}"] = float(r["accuracy"])
        fd = r.get("feature_distortion")
        if fd is not None:
            out[f"dist_l2.{name}"] = float(fd["l2_mean"])
            out[f"dist_cos.{name}"] = float(fd["cosine_mean"])
    if ood_names:
        for key in ("acc", "dist_l2", "dist_cos"):
            vals = [out[f"{key}.{n}"] for n in ood_names if f"{key}.{n}" in out]
            if vals:
                out[f"{key}.ood_mean"] = float(np.mean(vals))
    return out


# ------------------------------------------------------------------------------------------------ runs


def load_settings(args: argparse.Namespace) -> Params:
    """params.yaml, then --set, then the explicit flags: the pipeline's settings unless told otherwise."""
    overrides = parse_overrides(args.set)
    flags = {
        "data.preset": args.preset,
        "data.seed": args.data_seed,
        "finetune.epochs": args.epochs,
        "finetune.batch_size": args.batch_size,
        "finetune.device": args.device,
        "model.input_size": args.input_size,
        "model.name": args.model,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if args.weights is not None:
        overrides["model.weights"] = None if args.weights.lower() == "none" else args.weights
    return load_params(args.params, overrides)


def _finetune_config(params: Params, method: str, seed: int) -> FinetuneConfig:
    return finetune_config(params, method, seed=seed)


def _run_one(
    method: str,
    lrs: LrPair,
    seed: int,
    pretrained: torch.nn.Module,
    bundle: Any,
    params: Params,
    probe_head: torch.nn.Linear | None,
    variant: str | None = None,
) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """One fine-tuning run from `start` (the method's start model); (best-val model or None, record)."""
    recipe = get_recipe(method, head_lr=lrs[0], backbone_lr=lrs[1])
    reason = METHODS[method].published_violation(*lrs)
    if reason is not None and variant is None:
        raise SystemExit(f"{reason}; name the run with --variant {method}=NAME to run it anyway")
    model = copy.deepcopy(pretrained)
    start = time.perf_counter()
    record: dict[str, Any] = {"seed": seed, "head_lr": lrs[0], "backbone_lr": lrs[1]}
    try:
        res = finetune(
            model,
            bundle.train,
            bundle.val,
            recipe,
            _finetune_config(params, method, seed),
            probe_head=probe_head if recipe.head_init == "probe" else None,
            bn_converted=recipe.convert_bn,  # `pretrained` is then the BN-converted start (start_model)
        )
    except NonFiniteLossError as e:
        record.update(val_accuracy=None, best_epoch=None, seconds=time.perf_counter() - start, error=str(e))
        log.warning("%s seed %d lr %g/%g diverged: %s", method, seed, lrs[0], lrs[1], e)
        return None, record
    record.update(
        val_accuracy=float(res.best_val_accuracy),
        best_epoch=int(res.best_epoch),
        val_curve=[round(float(h["val_accuracy"]), 4) for h in res.history],
        seconds=time.perf_counter() - start,
    )
    log.info(
        "%-20s seed %d  lr head %-7g backbone %-7g  ID val %.4f (epoch %d)  %.1fs",
        method,
        seed,
        lrs[0],
        lrs[1],
        record["val_accuracy"],
        record["best_epoch"],
        record["seconds"],
    )
    return res.model, record


def _select(sweep: Sequence[dict[str, Any]]) -> int:
    """Index of the best ID-val accuracy (daft_core.selection: ties earliest, diverged runs never win)."""
    return best_index(sweep, lambda r: r.get("val_accuracy"))


def _eval_sets(bundle: Any) -> dict[str, Any]:
    return {"id_test": bundle.test, **bundle.ood}


def _evaluate(model: torch.nn.Module, pretrained: torch.nn.Module, bundle: Any) -> dict[str, float]:
    start = time.perf_counter()
    ev = evaluate(model, _eval_sets(bundle), reference=pretrained)
    out = _flat_metrics(ev, list(bundle.ood))
    log.info(
        "  eval: ID test %.4f, %s  (%.1fs)",
        out["acc.id_test"],
        ", ".join(f"{n} {out[f'acc.{n}']:.4f}" for n in bundle.ood),
        time.perf_counter() - start,
    )
    return out


def _summary(per_seed: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = [k for k in per_seed[0]["metrics"]]
    out = {"acc.id_val": _mean_std([r["val_accuracy"] for r in per_seed])}
    for k in keys:
        out[k] = _mean_std([r["metrics"][k] for r in per_seed])
    out["seconds"] = _mean_std([r["seconds"] for r in per_seed])
    return out


def bn_converted_start(
    pretrained: torch.nn.Module, bundle: Any, params: Params, device: torch.device
) -> torch.nn.Module:
    """The convert_bn stage's model: DAFT's conversion over ID train with params' convert_bn settings."""
    from daft_core.bn_conversion import convert_batchnorm

    model = copy.deepcopy(pretrained).to(device)
    c = params.convert_bn
    convert_batchnorm(model, iterate_batches(bundle.train, c.batch_size, device=device), stats=c.stats)
    return model.cpu().eval()


def run_lp(
    pretrained: torch.nn.Module, bundle: Any, seeds: Sequence[int], device: torch.device
) -> tuple[torch.nn.Linear, dict[str, Any]]:
    start = time.perf_counter()
    pretrained.to(device)
    feats = {
        name: extract_features(pretrained, iterate_batches(ds, 256, device=device), device)
        for name, ds in (("train", bundle.train), ("val", bundle.val))
    }
    probe = fit_linear_probe(
        *feats["train"], *feats["val"], Cs=LOGSPACE_CS, num_classes=len(bundle.class_names), device=device
    )
    pretrained.cpu()
    seconds = time.perf_counter() - start
    log.info(
        "%-20s best C %.3g  ID val %.4f  %.1fs (features + %d-C sweep)",
        "lp",
        probe.best_C,
        probe.val_accuracy,
        seconds,
        len(probe.sweep),
    )
    model = copy.deepcopy(pretrained)
    with torch.no_grad():
        model.head.weight.copy_(probe.head.weight)
        model.head.bias.copy_(probe.head.bias)
    metrics = _evaluate(model, pretrained, bundle)
    # Deterministic: the same probe for every seed (std 0 by construction).
    per_seed = [
        {"seed": s, "val_accuracy": float(probe.val_accuracy), "metrics": metrics, "seconds": seconds}
        for s in seeds
    ]
    result = {
        "selected": {"C": float(probe.best_C)},
        "selection": "C from logspace(-7, 2, 50) by ID val accuracy",
        "sweep": [{"C": float(r["C"]), "val_accuracy": float(r["val_accuracy"])} for r in probe.sweep],
        "per_seed": per_seed,
        "summary": _summary(per_seed),
        "note": "deterministic (frozen features, full-batch solver): identical for every seed",
    }
    return probe.head, result


def _wise(
    method: str,
    start: torch.nn.Module,
    model: torch.nn.Module,
    pretrained: torch.nn.Module,
    bundle: Any,
    probe_head: torch.nn.Linear | None,
    rec: dict[str, Any],
) -> dict[str, Any]:
    from daft_core.wise_ft import select_alpha, start_model

    t = time.perf_counter()
    # The run's start with the head it began from (probe's for LP-FT; zero for zero- and random-head
    # starts: a random head would add noise, a zero one leaves the fine-tuned head scaled by alpha).
    begin = start_model(start, get_recipe(method).head_init, probe_head)
    res = select_alpha(begin, model, bundle.val.images, bundle.val.labels)
    out = {
        "seed": rec["seed"],
        "head_lr": rec["head_lr"],
        "backbone_lr": rec["backbone_lr"],
        "alpha": float(res.alpha),
        "val_accuracy": float(max(c["val_accuracy"] for c in res.curve if c["alpha"] == res.alpha)),
        "alpha_curve": [
            {"alpha": c["alpha"], "val_accuracy": round(c["val_accuracy"], 4)} for c in res.curve
        ],
        "metrics": _evaluate(res.model, pretrained, bundle),
    }
    out["seconds"] = rec["seconds"] + time.perf_counter() - t
    log.info(
        "%-20s seed %d  alpha %.2f  ID val %.4f", method + WISE, rec["seed"], res.alpha, out["val_accuracy"]
    )
    return out


def run_finetuned(
    method: str,
    grid: list[LrPair],
    sweep: bool,
    seeds: Sequence[int],
    start: torch.nn.Module,
    pretrained: torch.nn.Module,
    bundle: Any,
    params: Params,
    probe_head: torch.nn.Linear | None,
    wise: bool = True,
    variant: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`method` over `seeds` from `start` (swept on the first seed); its result and its WiSE-FT result."""
    sweep_records: list[dict[str, Any]] = []
    per_seed: list[dict[str, Any]] = []
    wise_per_seed: list[dict[str, Any]] = []

    def finish(model: torch.nn.Module, rec: dict[str, Any]) -> None:
        rec["metrics"] = _evaluate(model, pretrained, bundle)
        per_seed.append(rec)
        if wise:
            wise_per_seed.append(_wise(method, start, model, pretrained, bundle, probe_head, rec))

    run = (method, start, bundle, params, probe_head, variant)
    if sweep and len(grid) > 1:
        best_model, best_idx = None, -1
        for i, lrs in enumerate(grid):
            model, rec = _run_one(method, lrs, seeds[0], start, *run[2:])
            sweep_records.append(rec)
            if model is not None and _select(sweep_records) == i:
                best_model, best_idx = model, i  # keep only the current best model in memory
            del model
        assert best_model is not None and best_idx >= 0
        chosen = grid[best_idx]
        log.info("%s: selected lr head %g / backbone %g on ID val", method, *chosen)
        finish(best_model, dict(sweep_records[best_idx]))
        del best_model
        rest = seeds[1:]
        selection = f"ID val accuracy on seed {seeds[0]} (sweep of {len(grid)})"
    else:
        chosen = grid[0]
        rest = seeds
        selection = "fixed (no sweep)"
    for seed in rest:
        model, rec = _run_one(method, chosen, seed, start, *run[2:])
        if model is None:
            raise RuntimeError(f"{method} diverged at seed {seed} with the selected lrs {chosen}")
        if not sweep_records and seed == seeds[0]:
            sweep_records.append({k: v for k, v in rec.items()})
        finish(model, rec)
        del model
    result = {
        "selected": {"head_lr": chosen[0], "backbone_lr": chosen[1]},
        "selection": selection,
        "sweep": sweep_records,
        "per_seed": per_seed,
        "summary": _summary(per_seed),
    }
    if variant is not None:
        result["variant"] = variant
    wise_result = None
    if wise:
        from daft_core.wise_ft import DEFAULT_ALPHAS

        wise_result = {
            "selected": {"head_lr": chosen[0], "backbone_lr": chosen[1]},
            "selection": f"{method}'s runs; alpha on {list(DEFAULT_ALPHAS)} by ID val, per seed",
            "sweep": [],
            "per_seed": wise_per_seed,
            "summary": _summary(wise_per_seed),
            "alphas": [r["alpha"] for r in wise_per_seed],
        }
        if variant is not None:
            wise_result["variant"] = variant
    return result, wise_result


# ------------------------------------------------------------------------------------------------ report


def _lr_text(method: str, res: dict[str, Any]) -> str:
    sel = res["selected"]
    if "C" in sel:
        return f"C={sel['C']:.3g}"
    if "alphas" in res:
        return "α " + "/".join(f"{a:g}" for a in res["alphas"])
    if method in TWO_LR:
        return f"{sel['head_lr']:g}/{sel['backbone_lr']:g}"
    return f"{sel['head_lr']:g}"


def _pm(s: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    ood = results["ood_sets"]
    cols = ["method", "lr (head/bb)", "ID val", "ID test", *ood, "OOD mean"]
    cols += ["L2 ID", "L2 OOD", "cos ID", "cos OOD", "s/run"]
    rows = []
    for method, res in results["methods"].items():
        s = res["summary"]
        name = method + (f" (variant: {res['variant']})" if res.get("variant") else "")
        row = [name, _lr_text(method, res), _pm(s["acc.id_val"]), _pm(s["acc.id_test"])]
        row += [_pm(s[f"acc.{n}"]) for n in ood]
        row += [_pm(s["acc.ood_mean"]) if "acc.ood_mean" in s else "-"]
        row += [_pm(s["dist_l2.id_test"], 1.0, 2)]
        row += [_pm(s["dist_l2.ood_mean"], 1.0, 2) if "dist_l2.ood_mean" in s else "-"]
        row += [_pm(s["dist_cos.id_test"], 1.0, 3)]
        row += [_pm(s["dist_cos.ood_mean"], 1.0, 3) if "dist_cos.ood_mean" in s else "-"]
        row += [f"{s['seconds']['mean']:.0f}"]
        rows.append(row)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ci(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    if p["ci95"] is None:
        return f"{100 * p['mean']:+.1f} (one seed: no interval)"
    lo, hi = p["ci95"]
    return f"{100 * p['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _verdict(p: dict[str, Any] | None) -> str:
    if not p or p["includes_zero"] is None:
        return "no interval"
    if p["includes_zero"]:
        return "includes 0: no difference shown"
    return f"{REFERENCE} {'better' if p['mean'] > 0 else 'worse'}"


def comparison_lines(results: dict[str, Any]) -> list[str]:
    """The paired comparison table, each interval's plain reading, and the preset's regime."""
    comps = results.get("comparisons") or {}
    lines: list[str] = []
    if comps:
        lines += [
            f"## {REFERENCE} against each method: paired differences over seeds",
            "",
            f"Per seed, {REFERENCE}'s accuracy minus the other method's (same seed, same data); mean over "
            "seeds and 95 % t-interval, in percentage points. An interval that includes 0 shows no "
            "difference at this number of seeds.",
            "",
            "| comparison | n | ID test diff [95 % CI] | reading | OOD mean diff [95 % CI] | reading |",
            "|---|---|---|---|---|---|",
        ]
        for name, c in comps.items():
            i, o = c.get("id_test"), c.get("ood_mean")
            lines.append(
                f"| {name} | {len(c['seeds'])} | {_ci(i)} | {_verdict(i)} | {_ci(o)} | {_verdict(o)} |"
            )
        zero = [n for n, c in comps.items() if (c.get("ood_mean") or {}).get("includes_zero")]
        if zero:
            lines += ["", "OOD-mean intervals that include 0: " + ", ".join(zero) + "."]
        lines.append("")
    r = results.get("regime")
    if r:
        lp, ft = 100 * r["lp_ood_mean"], 100 * r["ft_ood_mean"]
        if r["lp_beats_ft_ood"]:
            text = (
                f"LP beats FT out of distribution here (OOD mean {lp:.1f} vs {ft:.1f} %): the regime the "
                "paper describes, where fine-tuning distorts good pretrained features."
            )
        else:
            text = (
                f"LP is below FT out of distribution here (OOD mean {lp:.1f} vs {ft:.1f} %): the opposite "
                "of the regime the paper describes (there LP beats FT OOD). The pretrained features are "
                "not good enough for this shift on their own, so limiting feature distortion is not "
                "expected to help as much; read the DAFT comparisons with that in mind."
            )
        lines += ["## Regime", "", text, ""]
    return lines


def _json_line(results: dict[str, Any]) -> str:
    return json.dumps(results, separators=(",", ":"), sort_keys=False)


def write_outputs(results: dict[str, Any], prefix: str | os.PathLike[str]) -> None:
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_name(prefix.name + ".json")
    md_path = prefix.with_name(prefix.name + ".md")
    with atomic_file(json_path, "w") as f:
        f.write(json.dumps(results, indent=1) + "\n")
    s = results["settings"]
    lines = [
        f"# compare_methods: {s['preset']} ({'partial' if results.get('partial') else 'complete'})",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Model `{s['model']}` (weights `{s['weights']}`), input {s['input_size']} px, {s['epochs']} epochs, "
        f"batch {s['batch_size']}, fine-tuning seeds {s['seeds']} (data seed {s['data_seed']} fixed), "
        f"train/val/test = {s['n_train']}/{s['n_val']}/{s['n_test']}, OOD sets "
        + ", ".join(f"{n} ({k})" for n, k in s["n_ood"].items())
        + f". Torch threads {s['threads']}, {s['machine']}. Total {results['seconds_total']:.0f} s.",
        "",
        "Accuracies in %, mean ± sample std over seeds. L2 / cos: feature distortion vs the pretrained model "
        "(mean L2 distance / mean cosine similarity of penultimate features) on ID test and the mean over "
        "the OOD sets. s/run: training seconds per seed (LP: features + C sweep).",
        "",
        format_table(results),
        "",
        "## Learning-rate selection (seed 0, ID val)",
        "",
    ]
    for method, res in results["methods"].items():
        lines.append(f"- **{method}**: {res['selection']}; selected {_lr_text(method, res)}")
        if method == "lp" or method.endswith(WISE):
            continue
        for r in res["sweep"]:
            acc = "diverged" if r.get("val_accuracy") is None else f"{100 * r['val_accuracy']:.2f}%"
            lines.append(
                f"  - head {r['head_lr']:g} / backbone {r['backbone_lr']:g}: ID val {acc}"
                f" (best epoch {r.get('best_epoch')}, curve {r.get('val_curve')}, {r['seconds']:.0f} s)"
            )
    lines.append("")
    lines += comparison_lines(results)
    lines += ["JSON: the `.json` file next to this one (same content as the printed JSON line).", ""]
    md_path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------ main


def _load_bundle(args: argparse.Namespace, params: Params) -> Any:
    d = params.data
    bundle = load_preset(d.preset, seed=d.seed)
    if args.max_train is not None and args.max_train < len(bundle.train.labels):
        g = torch.Generator().manual_seed(d.seed)
        idx = torch.randperm(len(bundle.train.labels), generator=g)[: args.max_train]
        bundle.train = bundle.train.subset(idx.sort().values, "id_train")
    return bundle


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("daft_core", "daft_core.training", "daft_core.probe", "daft_core.evaluate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
    if args.seeds < 1 or (args.epochs is not None and args.epochs < 1):
        raise SystemExit("--seeds and --epochs must be >= 1")
    params = load_settings(args)
    grids = {**DEFAULT_GRIDS, **_method_map(args.grid, "--grid")}
    fixed = _method_map(args.lr, "--lr")
    variants = dict(v.split("=", 1) for v in args.variant or [] if "=" in v)
    if any(m not in FINETUNED or not n for m, n in variants.items()) or len(variants) != len(
        args.variant or []
    ):
        raise SystemExit(f"--variant: expected METHOD=NAME with METHOD in {', '.join(FINETUNED)}")
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()

    bundle = _load_bundle(args, params)
    m = params.model
    pretrained = build_model(
        m.name, weights=m.weights, num_classes=len(bundle.class_names), input_size=m.input_size
    ).eval()
    device = resolve_device(params.finetune.device)
    results: dict[str, Any] = {
        "benchmark": "compare_methods",
        "command": "python -m benchmarks.compare_methods "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {
            "params": args.params,
            "preset": params.data.preset,
            "data_seed": params.data.seed,
            "seeds": seeds,
            "seed_policy": "fine-tuning seed varies; data split and OOD sets fixed (data seed)",
            "epochs": params.finetune.epochs,
            "batch_size": params.finetune.batch_size,
            "input_size": pretrained.input_size,
            "model": m.name,
            "weights": m.weights or "none",
            "sweep": not args.no_sweep,
            "selection": "ID val accuracy (seed 0 sweep); ID test never used for selection",
            "n_train": len(bundle.train.labels),
            "n_val": len(bundle.val.labels),
            "n_test": len(bundle.test.labels),
            "n_ood": {n: len(ds.labels) for n, ds in bundle.ood.items()},
            "threads": torch.get_num_threads(),
            "device": str(device),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible",
        },
        "ood_sets": list(bundle.ood),
        "methods": {},
        "partial": True,
        "seconds_total": 0.0,
    }

    def checkpoint() -> None:
        results["seconds_total"] = time.perf_counter() - t0
        if args.out:
            write_outputs(results, args.out)

    probe_head = None
    if "lp" in methods or "lp_ft" in methods:
        probe_head, lp_result = run_lp(pretrained, bundle, seeds, device)
        if "lp" in methods:
            results["methods"]["lp"] = lp_result
            checkpoint()
    converted = None
    for method in FINETUNED:
        if method not in methods:
            continue
        if method in fixed:
            grid, sweep = fixed[method][:1], False
        elif args.no_sweep:
            grid, sweep = [default_lrs(params, method)], False
        elif method in grids:
            grid, sweep = grids[method], True
        else:
            grid, sweep = [default_lrs(params, method)], False
        if get_recipe(method).convert_bn and converted is None:
            converted = bn_converted_start(pretrained, bundle, params, device)
        start = converted if get_recipe(method).convert_bn else pretrained
        res, wise_res = run_finetuned(
            method,
            grid,
            sweep,
            seeds,
            start,
            pretrained,
            bundle,
            params,
            probe_head,
            wise=not args.no_wise_ft,
            variant=variants.get(method),
        )
        results["methods"][method] = res
        if wise_res is not None:
            results["methods"][method + WISE] = wise_res
        checkpoint()
    # Report in the canonical method order, each WiSE-FT row after its method.
    order = [n for m in ALL_METHODS for n in (m, m + WISE)]
    results["methods"] = {m: results["methods"][m] for m in order if m in results["methods"]}
    results["comparisons"] = comparisons(results["methods"])
    results["regime"] = regime(results["methods"])
    results["partial"] = False
    checkpoint()
    print(format_table(results))
    print(_json_line(results), flush=True)
    return results


if __name__ == "__main__":
    main()
