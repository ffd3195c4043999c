"""Plumbing every step shares: argument parsing, logging, atomic outputs, error reporting, tracking."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from components.params import (
    DEFAULT_PARAMS,
    Params,
    ParamsError,
    apply_overrides,
    load_params,
    params_from_dict,
    parse_overrides,
)

log = logging.getLogger("components")

MODEL_FILE = "model.pt"
# Registered-model alias per stage/method (MLflow aliases may not contain underscores by convention here).
STAGE_ALIASES = {
    "pretrained": "pretrained",
    "bn_converted": "bn-converted",
    "linear_probe": "linear-probe",
    "lp": "linear-probe",
    "ft": "ft",
    "lp_ft": "lp-ft",
    "daft": "daft",
    "daft_bn_only": "daft-bn-only",
    "daft_fast_head_only": "daft-fast-head-only",
}


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
        from components.tracking import TrackingError
        from daft_core.bn_conversion import BNConversionError
        from daft_core.data.format import DatasetFormatError
        from daft_core.models import CheckpointError

        try:
            run_main(argv)
        except (
            ParamsError,
            StepError,
            DatasetFormatError,
            CheckpointError,
            BNConversionError,
            TrackingError,
        ) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        return 0

    return main


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename, else it is removed.

    Readers never see a half-written output, and an old output survives a failed rerun.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomic JSON write (temp file + rename), sorted keys so outputs are stable for DVC."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise StepError("device 'cuda' requested but no CUDA device is available; set device: auto or cpu")
    return name


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


def input_example(bundle: Any, n: int = 2):
    return bundle.val.images[:n].clone()


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def source_version(params: Params, stage: str) -> str | None:
    """The registered version the input model was logged as (lineage), looked up by its stage alias."""
    if not params.pipeline.tracking:
        return None
    from components import tracking

    return tracking.version_for_alias(params.pipeline.registered_model, STAGE_ALIASES[stage])
