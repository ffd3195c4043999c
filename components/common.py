"""Plumbing every step shares: argument parsing, logging, atomic outputs, error reporting, tracking."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from components import storage
from components.params import (
    DEFAULT_PARAMS,
    Params,
    ParamsError,
    apply_overrides,
    load_params,
    params_from_dict,
    parse_overrides,
)
from daft_core.atomic import atomic_file

log = logging.getLogger("components")

MODEL_FILE = "model.pt"


class StepError(RuntimeError):
    """A step cannot run on its inputs; the message says what is wrong and how to fix it."""


def configure_logging() -> None:
    level = os.environ.get("DAFT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("urllib3", "botocore", "alembic", "git", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default=str(DEFAULT_PARAMS), help="params.yaml to read (default: %(default)s)")
    p.add_argument(
        "--params-json", default=None, help="the whole parameter tree as JSON (Kubeflow passes it this way)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    return p


def params_from_args(args: argparse.Namespace) -> Params:
    overrides = parse_overrides(args.set)
    if args.params_json:
        try:
            raw = json.loads(args.params_json)
        except json.JSONDecodeError as e:
            raise ParamsError(f"--params-json is not valid JSON: {e}") from None
        return params_from_dict(apply_overrides(raw, overrides), "--params-json")
    return load_params(args.params, overrides)


def cli(run_main: Callable[[Sequence[str] | None], Any]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a step's main so known failures print one clear line and exit non-zero, without a traceback."""

    def main(argv: Sequence[str] | None = None) -> int:
        configure_logging()
        storage.install()  # s3:// checkpoints through the core's URI hook
        from components.tracking import TrackingError
        from daft_core.errors import BNConversionError, CheckpointError, DatasetFormatError, DeviceError

        try:
            run_main(argv)
        except (
            ParamsError,
            StepError,
            DatasetFormatError,
            CheckpointError,
            BNConversionError,
            TrackingError,
            DeviceError,
            storage.StorageError,
        ) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        return 0

    return main


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomic JSON write, sorted keys so outputs are stable for DVC."""
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    return Path(path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise StepError(f"{path} not found; run the step that produces it first (e.g. `dvc repro`)")
    return json.loads(path.read_text())


def model_file(model_dir: str | os.PathLike[str]) -> Path:
    """Steps pass model *directories*; accept a direct file path too."""
    p = Path(model_dir)
    f = p / MODEL_FILE if p.is_dir() else p
    if not f.is_file():
        raise StepError(f"no model checkpoint at {f}; run the step that produces it first (e.g. `dvc repro`)")
    return f


def load_data(data_dir: str | os.PathLike[str], tracker: Any = None, context: str = "training"):
    """Load (and verify) the prepared bundle; log it as the run's input dataset for lineage."""
    from daft_core.data import load_bundle, read_manifest

    if not Path(data_dir).is_dir():
        raise StepError(
            f"prepared data {data_dir} not found; run prepare_data first (`dvc repro prepare_data`)"
        )
    bundle = load_bundle(data_dir)
    if tracker is not None:
        tracker.log_dataset(str(data_dir), read_manifest(data_dir), name="prepared", context=context)
    return bundle


def resolve_device(name: str) -> Any:  # -> torch.device
    """params' device setting ("auto", "cpu", "cuda") as a torch.device (daft_core.devices)."""
    from daft_core.devices import resolve_device as core_resolve

    return core_resolve(name)


@contextlib.contextmanager
def tracked(params: Params, step: str, logged: dict[str, Any], method: str | None = None) -> Iterator[Any]:
    """The step's MLflow child run (a no-op tracker when pipeline.tracking is false)."""
    from components import tracking
    from components.params import params_to_json

    with tracking.step_run(
        step,
        logged,
        method=method,
        enabled=params.pipeline.tracking,
        experiment=params.pipeline.experiment,
        pipeline_id=tracking.pipeline_run_id(params_to_json(params)),
    ) as tracker:
        yield tracker


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)
