"""`python -m pipelines.dvc_sweep METHOD [--queue]`: a method's default sweep as DVC experiments.

The grid is the method catalogue's (`daft_core.methods`), the same one the Kubeflow sweep pipeline and
`benchmarks.compare_methods` use, so there is one source for each default grid. Prints one
`dvc exp run --queue -S ...` command per point; `--queue` queues them (then `dvc queue start -j N` runs
them and `dvc exp show` compares them). `--grid` replaces the catalogue's points (same syntax as the
benchmark: `0.1,0.3` or `HEAD:BACKBONE,...`); every point must be the published method unless the
method's params entry is named as a variant.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
from collections.abc import Sequence

from components.common import cli
from components.params import DEFAULT_PARAMS, load_params
from daft_core.methods import FINETUNED_METHODS, METHODS, parse_lrs

__all__ = ["exp_commands", "main"]


def exp_commands(
    method: str, params_path: str = str(DEFAULT_PARAMS), grid: str | None = None
) -> list[list[str]]:
    """One `dvc exp run --queue` argv per sweep point of `method` (catalogue grid unless `grid`)."""
    if method not in FINETUNED_METHODS:
        raise ValueError(f"unknown method {method!r}; swept methods: {', '.join(FINETUNED_METHODS)}")
    params = load_params(params_path)
    if method not in params.finetune.methods:
        raise ValueError(
            f"{method} has no branch in {params_path}: add finetune.methods.{method} (with its `start`) first"
        )
    m = METHODS[method]
    points = parse_lrs(grid, f"--grid for {method!r}") if grid else list(m.grid)
    variant = params.finetune.methods[method].variant
    commands = []
    for head, backbone in points:
        reason = m.published_violation(head, backbone)
        if reason is not None and variant is None:
            raise ValueError(f"{reason}; drop that point or set finetune.methods.{method}.variant")
        key = f"finetune.methods.{method}"
        if m.sweep == "lr":
            sets = [f"{key}.lr={head!r}"]
        else:
            sets = [f"{key}.head_lr={head!r}", f"{key}.backbone_lr={backbone!r}"]
        commands.append(["dvc", "exp", "run", "--queue", *(a for s in sets for a in ("-S", s))])
    return commands


def _main(argv: Sequence[str] | None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.dvc_sweep", description=__doc__.splitlines()[0])
    p.add_argument("method", help=f"one of {', '.join(FINETUNED_METHODS)}")
    p.add_argument("--params", default=str(DEFAULT_PARAMS))
    p.add_argument("--grid", default=None, help="replace the catalogue's points: LR,... or HEAD:BACKBONE,...")
    p.add_argument("--queue", action="store_true", help="queue the experiments (else print the commands)")
    args = p.parse_args(argv)
    for argv_ in exp_commands(args.method, args.params, args.grid):
        print(shlex.join(argv_))
        if args.queue:
            subprocess.run(argv_, check=True)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())
