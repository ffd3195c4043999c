"""Images/s of the fine-tuning loop versus a classic PIL/DataLoader loop and a model-only upper bound.

    python -m benchmarks.train_throughput [--device auto] [--batch-sizes 64,256] [--steps 30] [--compile]
    python -m benchmarks.train_throughput --explain [--device cuda]   # Dynamo's graphs/breaks of the step

Three variants, each timed over ``--steps`` steps after ``--warmup`` steps, on torchvision ResNet-50
(weights=None), printed as one JSON line:

- ``plain``: fp32, a torch DataLoader over in-memory PIL images with torchvision transforms
  (RandomResizedCrop + flip + ToTensor + Normalize) in ``--num-workers`` workers.
- ``ours``: the real loop body, `daft_core.training.run_train_steps`: uint8 batches from
  `daft_core.data.iterate_batches` (pinned, copied to the device as uint8), `augment_batch` on the device,
  bf16 autocast + channels-last on CUDA, optional torch.compile (CUDA, or CPU with a C++ compiler).
- ``model_only``: `train_step` on one pre-made device tensor: the ceiling for any input pipeline.

Targets (GPU only): ours >= 2x plain and >= 95% of model_only at the largest batch size. On CPU this is
a smoke run with tiny defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from daft_core.augment import AugmentConfig
from daft_core.training import FinetuneConfig, StepContext, make_step_context, run_train_steps, train_step

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_CLASSES = 100
POOL = 512  # distinct source images; batches cycle over them


class Normalised(nn.Module):
    """ResNet-50 with its input normalisation inside, like DaftModel (the loop feeds [0, 1] floats)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        self.net = resnet50(weights=None, num_classes=NUM_CLASSES)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, warmup: int, steps: int, run: Callable[[int], None]) -> float:
    """Seconds for ``run(steps)`` after ``run(warmup)``, synchronised on both ends."""
    run(warmup)
    _sync(device)
    start = time.perf_counter()
    run(steps)
    _sync(device)
    return time.perf_counter() - start


def _source_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size) pictures with some structure (smooth blobs + noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    img = img + 0.1 * torch.rand(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------ (a) plain


class _PILSet(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, length: int, transform: Callable) -> None:
        from PIL import Image

        self.pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        self.length, self.transform = length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.pil[i % len(self.pil)]), i % NUM_CLASSES


def bench_plain(args: argparse.Namespace, device: torch.device, batch: int, images: torch.Tensor) -> float:
    from torchvision import transforms as T

    transform = T.Compose(
        [
            T.RandomResizedCrop(args.image_size, scale=(0.6, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    ds = _PILSet(images, (args.warmup + args.steps) * batch, transform)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=args.num_workers > 0,
        prefetch_factor=4 if args.num_workers > 0 else None,
    )
    from torchvision.models import resnet50

    model = resnet50(weights=None, num_classes=NUM_CLASSES).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    it = iter(loader)

    def run(k: int) -> None:
        for _ in range(k):
            x, y = next(it)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    seconds = _timed(device, args.warmup, args.steps, run)
    return args.steps * batch / seconds


# --------------------------------------------------------------------------------- (b) ours, (c) model only


class _Pool:
    """ImageSet-like view of the uint8 pool, long enough for the requested number of batches."""

    def __init__(self, images: torch.Tensor, n: int) -> None:
        reps = -(-n // len(images))
        self.images = images.repeat(reps, 1, 1, 1)[:n] if reps > 1 else images[:n]
        self.labels = torch.arange(n) % NUM_CLASSES


def _our_context(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, StepContext]:
    config = FinetuneConfig(device=str(device), compile=args.compile, compile_mode=args.compile_mode)
    model = Normalised().to(device).train()
    opt = torch.optim.SGD(
        [
            {"params": list(model.net.fc.parameters()), "lr": 1e-2, "name": "head"},
            {
                "params": [p for n, p in model.net.named_parameters() if not n.startswith("fc.")],
                "lr": 1e-4,
                "name": "backbone",
            },
        ],
        momentum=0.9,
    )
    return model, make_step_context(model, opt, config, device)


def bench_ours(
    args: argparse.Namespace, device: torch.device, batch: int, images: torch.Tensor, ctx: StepContext
) -> float:
    from daft_core.data import iterate_batches

    augment = AugmentConfig(hflip=True, random_resized_crop=True, scale=(0.6, 1.0))
    gen_shuffle = torch.Generator().manual_seed(0)
    gen_aug = torch.Generator(device=device).manual_seed(1)

    def batches(k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pool = _Pool(images, k * batch)
        return iterate_batches(
            pool, batch, shuffle=True, generator=gen_shuffle, device=device, drop_last=True
        )

    def run(k: int) -> None:
        run_train_steps(ctx, batches(k), augment, args.image_size, gen_aug)

    seconds = _timed(device, args.warmup, args.steps, run)
    return args.steps * batch / seconds


def bench_model_only(args: argparse.Namespace, device: torch.device, batch: int, ctx: StepContext) -> float:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = (torch.arange(batch) % NUM_CLASSES).to(device)

    def run(k: int) -> None:
        for _ in range(k):
            train_step(ctx, x, y)

    seconds = _timed(device, args.warmup, args.steps, run)
    return args.steps * batch / seconds


# ---------------------------------------------------------------------------------------------- explain


class _EagerOptimizer:
    """The optimizer's zero_grad/step stay eager in the loop (Dynamo deliberately skips
    ``Optimizer.zero_grad``); this stand-in lets `explain` see the rest of `train_step` as it runs."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


def explain_step(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], str]:
    """``torch._dynamo.explain`` of one `train_step` (forward + fp32 loss + backward, with the run's amp
    and channels-last) at the smallest batch size: (JSON summary, Dynamo's text report)."""
    import dataclasses

    import torch._dynamo

    eager = argparse.Namespace(**{**vars(args), "compile": False})
    _, ctx = _our_context(eager, device)
    ctx = dataclasses.replace(ctx, optimizer=_EagerOptimizer())
    batch = min(args.batch_sizes)
    x = torch.rand(batch, 3, args.image_size, args.image_size, device=device)
    y = (torch.arange(batch) % NUM_CLASSES).to(device)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # follow loss.backward() as well
        out = torch._dynamo.explain(train_step)(ctx, x, y)
    summary = {
        "graph_count": out.graph_count,
        "graph_break_count": out.graph_break_count,
        "op_count": out.op_count,
        "break_reasons": [str(b.reason).splitlines()[0] for b in out.break_reasons],
        "batch": batch,
        "image_size": args.image_size,
    }
    torch._dynamo.reset()
    return summary, str(out)


# ------------------------------------------------------------------------------------------------------ CLI


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument(
        "--batch-sizes", default=None, help="comma-separated (default: 64,256 on CUDA, 8,16 on CPU)"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on CUDA, 2 on CPU)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 10 on CUDA, 1 on CPU)"
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="training resolution (default: 224; 32 on CPU)"
    )
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers for the plain loop")
    p.add_argument("--compile", action="store_true", help="torch.compile our step (CPU: needs g++)")
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument(
        "--explain",
        action="store_true",
        help="print torch._dynamo.explain of the training step (graphs, breaks) before the benchmark",
    )
    p.add_argument("--explain-only", action="store_true", help="--explain, then stop")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.device = ("cuda" if cuda else "cpu") if args.device == "auto" else args.device
    defaults = {"batch_sizes": "64,256", "steps": 30, "warmup": 10, "image_size": 224}
    if not cuda:
        defaults = {"batch_sizes": "8,16", "steps": 2, "warmup": 1, "image_size": 32}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1) if cuda else 0
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
    return args


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    source = round(args.image_size * 256 / 224)
    images = _source_images(POOL, source)
    results: dict[str, dict[str, float]] = {}
    for batch in args.batch_sizes:
        torch.manual_seed(0)
        plain = bench_plain(args, device, batch, images)
        _, ctx = _our_context(args, device)
        ours = bench_ours(args, device, batch, images, ctx)
        model_only = bench_model_only(args, device, batch, ctx)
        results[str(batch)] = {
            "plain": round(plain, 2),
            "ours": round(ours, 2),
            "model_only": round(model_only, 2),
        }
        del ctx
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = results[str(max(args.batch_sizes))]
    return {
        "benchmark": "train_throughput",
        "unit": "images/s",
        "model": "torchvision.resnet50(weights=None)",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "image_size": args.image_size,
        "source_size": source,
        "steps": args.steps,
        "warmup": args.warmup,
        "num_workers": args.num_workers,
        "compile": bool(args.compile),
        "threads": torch.get_num_threads(),
        "results": results,
        "ratio_at_batch": max(args.batch_sizes),
        "ours_over_plain": round(ref["ours"] / ref["plain"], 3),
        "ours_over_model_only": round(ref["ours"] / ref["model_only"], 3),
        "targets_apply": device.type == "cuda",
    }


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    explained = None
    if args.explain or args.explain_only:
        explained, report = explain_step(args, torch.device(args.device))
        print(report, file=sys.stderr)
        print(json.dumps({"benchmark": "train_throughput.explain", **explained}))
    if args.explain_only:
        return
    result = run_benchmark(args)
    if explained is not None:
        result["explain"] = explained
    print(json.dumps(result))


if __name__ == "__main__":
    main()
