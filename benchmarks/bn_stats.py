"""Cost of DAFT's BN statistics pass relative to a plain eval forward over the same batches.

    python -m benchmarks.bn_stats [--threads 2] [--repeats 5] [--layout both] [--baseline F] [--kernels]

`convert_batchnorm` runs one eval forward with a hook on every BN layer; the hooks are the whole
overhead. Each repeat times, interleaved (the order rotates so drift on a shared CPU hits all alike):
``plain`` (``torch.no_grad()`` eval forward over every batch), ``convert`` (the full conversion: hooks,
float64 sums, the function-preserving rewrite) and, with ``--baseline FILE``, the same conversion from
another version of ``bn_conversion.py`` (e.g. ``git show HEAD:daft_core/bn_conversion.py > /tmp/old.py``).
Reported, for CPU time (the headline: robust to other processes on the cores) and wall time: medians
over repeats after one warm-up, their ratio to ``plain`` and the median of per-repeat paired ratios.
Target: convert / plain <= 1.1 (CPU time). Defaults follow params.yaml (efficientnet_lite0 at 48 px,
digits ID train, batch 64). Writes JSON to ``--out`` (default benchmarks/results/bn_stats_cpu.json).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daft_core.bn_conversion import convert_batchnorm

TARGET = 1.1
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _load_module(path: str) -> Any:
    """Import a standalone copy of bn_conversion.py (the 'before' side of a comparison)."""
    spec = importlib.util.spec_from_file_location("bn_stats_baseline", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--baseline {path!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _batches(args: argparse.Namespace) -> list[torch.Tensor]:
    """uint8 ID-train batches: the prepared bundle if present, else the digits preset built in memory."""
    from daft_core.data import iterate_batches, load_bundle, load_preset

    data = Path(args.data)
    bundle = load_bundle(data) if (data / "manifest.json").exists() else load_preset("digits", seed=0)
    xs = [x for x, _ in iterate_batches(bundle.train, args.batch_size)]
    return xs[: args.max_batches] if args.max_batches else xs


def _model(args: argparse.Namespace, num_classes: int = 10) -> nn.Module:
    from daft_core.models import build_model

    weights = None if args.weights == "none" else args.weights
    model = build_model(args.model, weights=weights, num_classes=num_classes, input_size=args.input_size)
    return model.eval()


def _timer(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall, CPU) seconds. CPU time (all threads of this process) barely moves when other processes
    compete for the cores, so it is the headline on a shared machine; wall time is kept alongside."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_layout(
    args: argparse.Namespace, layout: str, batches: list[torch.Tensor], baseline: Any
) -> dict[str, Any]:
    """Interleaved timings of plain / convert (/ baseline) for one memory format."""
    model = _model(args).to(memory_format=LAYOUTS[layout])

    def plain() -> None:
        with torch.no_grad():
            for x in batches:
                model(x)

    converts: dict[str, Callable[..., Any]] = {"convert": convert_batchnorm}
    if baseline is not None:
        converts["baseline"] = baseline.convert_batchnorm

    def once(name: str) -> tuple[float, float]:
        if name == "plain":
            return _timer(plain)
        m = copy.deepcopy(model)  # same pretrained statistics every time; the copy is not timed
        return _timer(lambda: converts[name](m, batches, stats=args.stats))

    names = ["plain", *converts]
    for k in names:  # warm-up: allocator, oneDNN primitives, lazy imports
        once(k)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            w, c = once(k)
            wall[k].append(w)
            cpu[k].append(c)
    out: dict[str, Any] = {}
    for clock, times in (("cpu", cpu), ("wall", wall)):
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"median_{clock}_s"] = {k: round(v, 4) for k, v in med.items()}
        out[f"{clock}_s"] = {k: [round(t, 4) for t in v] for k, v in times.items()}
        for k in names[1:]:
            paired = [t / p for t, p in zip(times[k], times["plain"], strict=True)]
            out[f"{k}_over_plain_{clock}"] = round(med[k] / med["plain"], 3)
            out[f"{k}_over_plain_{clock}_paired"] = round(statistics.median(paired), 3)
    out["convert_over_plain"] = out["convert_over_plain_cpu"]
    out["meets_target"] = out["convert_over_plain"] <= TARGET
    return out


def kernel_floor(args: argparse.Namespace, layout: str, batches: list[torch.Tensor]) -> dict[str, Any]:
    """What one pass over every BN input costs with each stock per-channel kernel, against the forward.

    The statistics pass is an eval forward plus, per BN layer, a reduction over its input; this times the
    candidate reductions on the real BN inputs of one batch (captured once), per batch of all layers, next
    to the eval BN op itself and the whole forward. ``mean_only_gemv`` (one BLAS read, one moment) is a
    lower bound for any unfused stock kernel; ``ratio_bound`` = (forward + kernel) / forward is the best
    the pass can do with that kernel.
    """
    from daft_core.bn_conversion import _batch_moments

    model = _model(args).to(memory_format=LAYOUTS[layout])
    inputs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, i, _o: inputs.append(i[0].detach().clone()))
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    x0 = batches[0]
    with torch.no_grad():
        model(x0)
    for h in hooks:
        h.remove()
    hooks.clear()

    def gemv_mean(x: torch.Tensor) -> Any:
        """Per-channel sums as one matrix-vector product over x in place (no copy) in either layout."""
        n, c = x.shape[:2]
        if x.is_contiguous():  # rows of S values, one per (sample, channel)
            sums = torch.mv(x.reshape(n * c, -1), torch.ones(x[0, 0].numel(), dtype=x.dtype))
            return sums.view(n, c).sum(0)
        rows = x.permute(0, *range(2, x.dim()), 1).reshape(-1, c)  # a view for channels_last
        return torch.mv(rows.t(), torch.ones(rows.shape[0], dtype=x.dtype))

    def eval_bn(x: torch.Tensor) -> Any:
        c = x.shape[1]
        one, zero = torch.ones(c), torch.zeros(c)
        return torch.batch_norm(x, one, zero, zero, one, False, 0.0, 1e-5, False)

    kernels: dict[str, Callable[[torch.Tensor], Any]] = {
        "ours (_batch_moments)": _batch_moments,
        "batch_norm_update_stats (per channel)": lambda x: torch.batch_norm_update_stats(x, None, None, 1.0),
        "var_mean": lambda x: torch.var_mean(x, dim=(0, *range(2, x.dim())), correction=0),
        "mean_only_gemv": gemv_mean,
        "eval BN op (already in the forward)": eval_bn,
    }
    forward_s = []
    with torch.no_grad():
        for _ in range(args.repeats):
            t = time.process_time()
            model(x0)
            forward_s.append(time.process_time() - t)
    forward = statistics.median(forward_s)
    out: dict[str, Any] = {
        "forward_cpu_ms": round(1000 * forward, 2),
        "bn_layers": len(inputs),
        "kernels": {},
    }
    for name, fn in kernels.items():
        times = []
        for _ in range(args.repeats):
            t = time.process_time()
            for x in inputs:
                fn(x)
            times.append(time.process_time() - t)
        k = statistics.median(times)
        out["kernels"][name] = {
            "cpu_ms": round(1000 * k, 2),
            "ratio_bound": round((forward + k) / forward, 3),
        }
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet", help="imagenet | none | a checkpoint path")
    p.add_argument("--input-size", type=int, default=48)
    p.add_argument("--data", default="data/prepared", help="prepared bundle (digits preset if absent)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batches", type=int, default=0, help="use only the first N batches (0: all)")
    p.add_argument("--stats", default="batch_mean", choices=("batch_mean", "population"))
    p.add_argument("--layout", default="both", choices=("both", *LAYOUTS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--baseline", default=None, help="another bn_conversion.py to time as 'baseline'")
    p.add_argument("--out", default="benchmarks/results/bn_stats_cpu.json", help="JSON path ('' : none)")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="also time the stock per-channel reductions on the real BN inputs: the floor of this design",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.max_batches < 0:
        p.error("--repeats and --batch-size must be >= 1, --max-batches >= 0")
    return args


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = _load_module(args.baseline) if args.baseline else None
    batches = _batches(args)
    layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
    return {
        "benchmark": "bn_stats",
        "model": args.model,
        "weights": args.weights,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "num_batches": len(batches),
        "num_samples": sum(len(x) for x in batches),
        "stats": args.stats,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "baseline": args.baseline,
        "target_convert_over_plain": TARGET,
        "results": {layout: bench_layout(args, layout, batches, baseline) for layout in layouts},
        "kernel_floor": {layout: kernel_floor(args, layout, batches) for layout in layouts}
        if args.kernels
        else None,
    }


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    result = run_benchmark(args)
    for layout, r in result["results"].items():
        ratios = ", ".join(f"{k} {v}x" for k, v in r.items() if "_over_plain_" in k)
        print(f"{layout}: plain {r['median_cpu_s']['plain']:.3f}s CPU; {ratios}")
    for layout, f in (result["kernel_floor"] or {}).items():
        print(
            f"{layout}: forward {f['forward_cpu_ms']} ms CPU per batch; {f['bn_layers']} BN inputs per batch:"
        )
        for name, k in f["kernels"].items():
            print(f"  {name:40s} {k['cpu_ms']:7.2f} ms  -> pass >= {k['ratio_bound']}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "results"}))


if __name__ == "__main__":
    main()
