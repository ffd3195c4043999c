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

from components import storage, warm_start
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
    from components.tracking.redaction import install_log_redaction

    install_log_redaction()  # credentials in URIs never reach a log line (MLflow's loggers included)


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


# --------------------------------------------------------------------------------------------------
# The one error path
# --------------------------------------------------------------------------------------------------

MAX_ERROR_CHARS = 500  # one `error:` line at most this long (echoed input, server bodies are cut)
EXIT_ERROR = 2  # a foreseeable failure: the message says what to fix
EXIT_BUG = 1  # an unexpected exception: traceback shown
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT, the shell's convention
_OUTPUT_OPTIONS = ("--out", "--summary", "--curves")
_REPORT = "this is a bug in the pipeline; please report it with the traceback below"


def cli(run_main: Callable[[Sequence[str] | None], Any]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a step's main: every foreseeable failure prints ONE `error:` line (what failed, which path or
    setting, the fix; credentials masked, at most :data:`MAX_ERROR_CHARS`) and exits 2, without a
    traceback; Ctrl-C exits 130 with one line; anything else is a bug: "this is a bug" first, then the
    (credential-masked) traceback, exit 1. See :func:`describe_error` for what is foreseeable."""

    def main(argv: Sequence[str] | None = None) -> int:
        args = list(sys.argv[1:] if argv is None else argv)
        try:
            if argv is None:  # `python -m components.<step>`: under DVC, in a warm worker when one is up
                code = warm_start.delegate()
                if code is not None:
                    return code
            configure_logging()
            if os.environ.get(warm_start.WORKER_VAR):
                log.info(
                    "warm start: running in worker %d of server %d (imports done once per repro; "
                    "DAFT_WARM_START=0 turns it off)",
                    os.getpid(),
                    os.getppid(),
                )
            storage.install()  # s3:// checkpoints through the core's URI hook
            run_main(args)
        except KeyboardInterrupt:
            print_error(
                "interrupted; nothing half-written was left (outputs are replaced atomically, the previous "
                "ones are intact). Fix: rerun the step (finetune resumes from its last epoch)."
            )
            return EXIT_INTERRUPTED
        except Exception as err:
            message = describe_error(err, args)
            if message is None:
                report_bug(err)
                return EXIT_BUG
            print_error(message)
            return EXIT_ERROR
        return 0

    return main


def print_error(message: str) -> None:
    """The one `error:` line on stderr: credentials masked, one line, at most MAX_ERROR_CHARS."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


def one_line(text: Any, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` with credentials masked, on one line, cut in the middle to `limit` characters (the start
    says what failed, the end says how to fix it; the echoed detail in between is what gets cut)."""
    from components.tracking.redaction import redact

    s = " ".join(redact(text).split())
    if len(s) <= limit:
        return s
    cut = " … "
    head = (limit - len(cut)) * 3 // 5
    tail = limit - len(cut) - head
    return s[:head] + cut + s[-tail:]


def report_bug(err: BaseException) -> None:
    """An unexpected exception: say so first, then the traceback (credentials masked)."""
    import traceback

    from components.tracking.redaction import redact

    print(f"error: {type(err).__name__}: {one_line(err, 300)} -- {_REPORT}", file=sys.stderr)
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    print(redact(text), file=sys.stderr, end="", flush=True)


def describe_error(err: BaseException, argv: Sequence[str] = ()) -> str | None:
    """The message for a foreseeable failure (what, which path or setting, the fix), or None for a bug.

    Foreseeable: the project's own errors (params, step inputs, data format, checkpoints, BN conversion,
    devices, storage, tracking), a non-finite training loss, file-system errors (read-only or full disk,
    permissions, missing paths, including torch.save's "unexpected pos" on a full disk), MLflow / HTTP
    errors, pydantic validation errors, and ValueErrors (bad input values).
    """
    from components.tracking.retries import TrackingError, describe_tracking_error
    from daft_core.errors import BNConversionError, CheckpointError, DatasetFormatError, DeviceError

    if isinstance(
        err,
        ParamsError
        | StepError
        | TrackingError
        | storage.StorageError
        | DatasetFormatError
        | BNConversionError
        | DeviceError,
    ):
        return str(err)
    if isinstance(err, CheckpointError):
        fix = "Fix: rerun the step that writes it (e.g. `dvc repro`) or use a good checkpoint"
        return f"{str(err).rstrip('. ')}. {fix}"
    nonfinite = _loaded_type("daft_core.training.config", "NonFiniteLossError")
    if nonfinite is not None and isinstance(err, nonfinite):
        return f"training stopped, no output written: {err}"
    validation = _loaded_type("pydantic", "ValidationError")
    if validation is not None and isinstance(err, validation):
        return _validation_message(err)
    tracking = describe_tracking_error(err)  # MlflowException, requests / urllib3 errors (not imported here)
    if tracking is not None:
        return tracking
    os_error = _os_error_in(err)
    if os_error is not None:
        return _os_message(os_error, argv)
    if isinstance(err, RuntimeError) and "unexpected pos" in str(err):
        # torch.save's writer on a full (or vanished) file system; the OSError is not always chained.
        where = _outputs(argv)
        return (
            f"writing a file{where} failed part-way (torch: {one_line(err, 120)}): the file system is most "
            "likely full. Fix: free space there (`df -h`) or write the outputs elsewhere, then rerun; the "
            "previous outputs are intact."
        )
    if isinstance(err, ValueError):
        return f"{type(err).__name__}: {err}"
    return None


def _loaded_type(module: str, name: str) -> type | None:
    """`module.name` if that module is already imported (so the error path never imports torch/pydantic
    just to test an exception: if the module is not loaded, the exception cannot be one of its types)."""
    mod = sys.modules.get(module)
    t = getattr(mod, name, None) if mod is not None else None
    return t if isinstance(t, type) else None


def _validation_message(err: Any) -> str:
    try:
        parts = [f"{'.'.join(map(str, e.get('loc', ()))) or '<root>'}: {e.get('msg')}" for e in err.errors()]
    except Exception:
        parts = [str(err)]
    return f"invalid settings: {'; '.join(parts)}. Fix: correct them in params.yaml (or the --set overrides)"


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError `err` is or was raised from (torch and MLflow wrap them), else None."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return err if isinstance(err, OSError) else None


def _outputs(argv: Sequence[str]) -> str:
    """ " under <out>" from the step's output options, for messages whose exception names no path."""
    outs = _output_values(argv)
    return f" under {', '.join(outs)}" if outs else ""


def _user_path(filename: Any, argv: Sequence[str]) -> str:
    """The output path the user gave when `filename` is its hidden temp sibling (``.<name>.*``, what the
    atomic writers create first), else `filename`."""
    name = Path(os.fsdecode(filename))
    for out in _output_values(argv):
        o = Path(out)
        if name.parent == o.parent and name.name.startswith(f".{o.name}."):
            return out
    return os.fsdecode(filename)


def _output_values(argv: Sequence[str]) -> list[str]:
    outs = []
    for i, a in enumerate(argv):
        for opt in _OUTPUT_OPTIONS:
            if a == opt and i + 1 < len(argv):
                outs.append(argv[i + 1])
            elif a.startswith(opt + "="):
                outs.append(a.split("=", 1)[1])
    return outs


def _os_message(err: OSError, argv: Sequence[str]) -> str:
    import errno

    path = _user_path(err.filename, argv) if err.filename is not None else None
    where = f" {path}" if path is not None else _outputs(argv)
    what = err.strerror or type(err).__name__
    code = err.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (
            f"no space left on the device writing{where} ({what}). Fix: free space there (`df -h`) or write "
            "the outputs elsewhere, then rerun; the previous outputs are intact."
        )
    if code == errno.EROFS:
        return (
            f"cannot write{where}: read-only file system. Fix: choose an output path on a writable file "
            "system (e.g. --out) or remount it read-write."
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied:{where}. Fix: make that folder writable (readable, for an input) for this "
            "user, or choose another path."
        )
    if code == errno.ENOENT:
        return (
            f"not found:{where}. Fix: check the path; run the step that produces it first (e.g. `dvc repro`)."
        )
    if code == errno.ENOTDIR:
        return f"not a folder: a part of{where} is a file. Fix: rename that file, or choose another path."
    if code == errno.EEXIST:
        return (
            f"{where.strip()} exists and is not a folder. Fix: rename or remove it, or choose another path."
        )
    if code == errno.ENAMETOOLONG:
        return f"path too long:{where}. Fix: choose a shorter path."
    if code == errno.EISDIR:
        return f"{where.strip()} is a folder where a file is expected. Fix: pass the file's path."
    if code in (errno.EMFILE, errno.ENFILE):
        return f"too many open files{where}. Fix: raise the limit (`ulimit -n`) and rerun."
    return f"{type(err).__name__}:{where} ({what}). Fix: check the path and its file system."


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
    """Load (and verify) the prepared bundle; log it as the run's input dataset for lineage.

    The dataset's source is where prepare_data read the data from when the manifest records it (the
    ``s3://`` URI, ``meta["source_uri"]``), else `data_dir`; its digest is the prepared bundle's.
    """
    from daft_core.data import load_bundle, read_manifest

    if not Path(data_dir).is_dir():
        raise StepError(
            f"prepared data {data_dir} not found; run prepare_data first (`dvc repro prepare_data`)"
        )
    bundle = load_bundle(data_dir)
    if tracker is not None:
        manifest = read_manifest(data_dir)
        source = (manifest.get("meta") or {}).get("source_uri")
        tracker.log_dataset(
            str(data_dir),
            manifest,
            name="prepared",
            context=context,
            source=source if isinstance(source, str) and source else None,
        )
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
