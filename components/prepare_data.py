"""Step 1: build ID train/val/test and the OOD sets once, in the compact on-disk format.

Data locations (``data.root``, ``data.id_train`` / ``id_val`` / ``id_test``, ``data.ood.<name>``,
``data.extra_ood.<name>``) are local paths or ``s3://bucket/prefix`` URIs. Each remote location the preset
reads is downloaded ONCE (:func:`components.storage.fetch_tree`; a location inside another one reuses its
copy) into a workspace folder -- a temp folder beside the output, or under ``$DAFT_WORKSPACE`` when set --
that is removed as soon as the data has been read, whatever happens. ``daft_core`` then builds the preset
from the local copies with all its data checks (symlinks, pixel limit, empty classes ...); a message naming a
downloaded file names its ``s3://`` URI instead. The manifest's ``meta["sources"]`` records, per remote
location, its URI, a sha256 of what was read (:func:`components.storage.tree_digest`: every file's sha256 with
its relative path) and the file count; ``meta["source_uri"]`` (data.root, else data.id_train, when remote) is
the dataset source MLflow shows, here and in the later steps (``components.common.load_data``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from components import storage
from components.common import Timer, base_parser, cli, params_from_args, tracked, write_json
from components.outputs import check_output_dir, check_outputs, write_marker
from components.params import Params
from daft_core.atomic import atomic_dir

log = logging.getLogger(__name__)

WORKSPACE_ENV = "DAFT_WORKSPACE"  # where remote data is downloaded (default: beside the output)
PRIMARY_SOURCES = ("data.root", "data.id_train")  # the one that is "the dataset's source" in MLflow


def preset_kwargs(
    params: Params, paths: Mapping[str, str | os.PathLike[str]] | None = None
) -> dict[str, Any]:
    """The builder's keyword arguments; `paths` (location key -> local folder, see :func:`data_locations`)
    replaces the params' locations (the local copies of remote ones)."""
    d = params.data
    # every preset: they also apply to `extra_ood` folders
    safety = {"follow_symlinks": d.follow_symlinks, "max_pixels": d.max_pixels}
    return {**safety, **_builder_kwargs(params, paths or {})}


def _builder_kwargs(params: Params, paths: Mapping[str, str | os.PathLike[str]]) -> dict[str, Any]:
    d = params.data
    if d.preset == "digits":
        train = 1.0 - d.val_fraction - d.test_fraction
        return {
            "fractions": (train, d.val_fraction, d.test_fraction),
            "printed_per_class": d.printed_per_class,
        }
    if d.preset == "imagefolder":
        return {
            "id_train": paths.get("data.id_train", d.id_train),
            "id_val": paths.get("data.id_val", d.id_val),
            "id_test": paths.get("data.id_test", d.id_test),
            # None (not {}) when unset, so the builder finds root/ood/<name> itself
            "ood": {n: paths.get(f"data.ood.{n}", p) for n, p in d.ood.items()} or None,
            "val_fraction": d.val_fraction,
            "image_size": d.image_size,
            "grayscale": d.grayscale,
            "on_bad_image": d.on_bad_image,
        }
    return {"val_fraction": d.val_fraction}


def data_locations(params: Params) -> dict[str, str]:
    """Location key (``data.root``, ``data.ood.<name>`` ...) -> path or URI, for every location the preset
    reads (``digits`` reads only ``extra_ood``; ``cifar10`` reads ``root`` and ``extra_ood``)."""
    d = params.data
    out: dict[str, str] = {}
    if d.preset != "digits" and d.root:
        out["data.root"] = d.root
    if d.preset == "imagefolder":
        for key in ("id_train", "id_val", "id_test"):
            value = getattr(d, key)
            if value:
                out[f"data.{key}"] = value
        out.update({f"data.ood.{n}": p for n, p in d.ood.items()})
    out.update({f"data.extra_ood.{n}": p for n, p in d.extra_ood.items()})
    return out


@contextlib.contextmanager
def workspace(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh folder for downloaded data, removed on exit whatever happens.

    Under ``$DAFT_WORKSPACE`` when set, else beside `out_dir` as ``.<out>.data-<token>.tmp``, which is
    daft_core.atomic's name for a writer's temporary: the recovery that every later write of the output
    runs (and the next run's output check) deletes one that a kill left behind, and leaves this one alone
    while it is locked here.
    """
    base = os.environ.get(WORKSPACE_ENV, "").strip()
    if base:
        parent = Path(base).expanduser()
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="daft-data-", dir=parent))
    else:
        out = Path(os.path.abspath(out_dir))
        out.parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f".{out.name}.data-", suffix=".tmp", dir=out.parent))
    lock = _lock(path)
    try:
        yield path
    finally:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            log.warning("could not remove the data workspace %s; delete it yourself", path)


def _lock(path: Path) -> int | None:
    """An flock on `path` for this process's lifetime (daft_core.atomic leaves locked temporaries alone)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _norm(uri: str) -> str:
    return uri.rstrip("/")


def _enclosing(uri: str, fetched: Mapping[str, Any]) -> str | None:
    """The downloaded location that is `uri` or holds it (prefixes match whole path segments)."""
    return next((f for f in fetched if uri == f or uri.startswith(f + "/")), None)


def fetch_locations(
    locations: Mapping[str, str], dest: Path
) -> tuple[dict[str, Path], dict[str, dict[str, Any]], dict[str, str]]:
    """Download every remote location of `locations` once into `dest`.

    Returns (key -> local folder, key -> ``{"uri", "sha256", "files"}``, local folder -> URI of every
    download). A location inside another remote one (``data.id_train`` under ``data.root``) is not read
    again: its folder and digest come from the enclosing download.
    """
    remote = {k: v for k, v in locations.items() if storage.is_uri(v)}
    fetched: dict[str, tuple[Path, dict[str, str]]] = {}  # normalised URI -> (local folder, file hashes)
    for uri in sorted({_norm(v) for v in remote.values()}, key=lambda u: (len(u), u)):  # enclosing first
        if _enclosing(uri, fetched) is None:
            folder = dest / str(len(fetched))
            log.info("downloading %s", uri)
            files = storage.fetch_tree(uri, folder)
            fetched[uri] = (folder, storage.tree_hashes(folder, files))
    local: dict[str, Path] = {}
    sources: dict[str, dict[str, Any]] = {}
    for key, given in remote.items():
        uri = _norm(given)
        outer = _enclosing(uri, fetched)
        assert outer is not None
        folder, hashes = fetched[outer]
        sub = uri[len(outer) :].strip("/")
        if sub:
            hashes = {r[len(sub) + 1 :]: h for r, h in hashes.items() if r.startswith(sub + "/")}
            if not hashes:
                raise storage.StorageError(
                    f"{given}: no objects under this prefix ({key}; read as part of {outer})"
                )
        local[key] = folder / sub if sub else folder
        sources[key] = {"uri": given, "sha256": storage.tree_digest(hashes), "files": len(hashes)}
    return local, sources, {str(folder): uri for uri, (folder, _) in fetched.items()}


def _to_uris(value: Any, names: Mapping[str, str]) -> Any:
    """`value` (a string, or JSON-like containers of them) with every local download folder replaced by
    its URI, longest first (``.../1`` must not eat ``.../10``)."""
    if isinstance(value, str):
        for folder in sorted(names, key=len, reverse=True):
            value = value.replace(folder, names[folder])
        return value
    if isinstance(value, Mapping):
        return {k: _to_uris(v, names) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_uris(v, names) for v in value)
    return value


def _renamed(err: BaseException, names: Mapping[str, str]) -> BaseException | None:
    """A copy of `err` whose message names the URIs instead of the download folders, or None."""
    if not names or len(err.args) != 1 or not isinstance(err.args[0], str):
        return None
    text = _to_uris(err.args[0], names)
    if text == err.args[0]:
        return None
    try:
        new = copy.copy(err)
        new.args = (text,)
    except Exception:  # an exception type that cannot be rebuilt: keep the original
        return None
    return new


def build_bundle(params: Params, out_dir: str | os.PathLike[str]) -> Any:  # -> DatasetBundle
    """Build the preset, downloading remote locations first (see the module docstring)."""
    from daft_core.data import load_preset

    d = params.data
    locations = data_locations(params)
    if not any(storage.is_uri(v) for v in locations.values()):
        return load_preset(
            d.preset,
            seed=d.seed,
            root=d.root,
            extra_ood=dict(d.extra_ood) or None,
            **preset_kwargs(params),
        )
    names: dict[str, str] = {}
    with workspace(out_dir) as ws:
        try:
            paths, sources, names = fetch_locations(locations, ws)
            bundle = load_preset(
                d.preset,
                seed=d.seed,
                root=paths.get("data.root", d.root),
                extra_ood={n: paths.get(f"data.extra_ood.{n}", p) for n, p in d.extra_ood.items()} or None,
                **preset_kwargs(params, paths),
            )
        except Exception as err:
            renamed = _renamed(err, names)
            if renamed is None:
                raise
            raise renamed.with_traceback(err.__traceback__) from err.__cause__
    bundle.meta = _to_uris(bundle.meta, names)  # no workspace path (gone by now) in the manifest
    bundle.meta["sources"] = sources
    primary = next((sources[k]["uri"] for k in PRIMARY_SOURCES if k in sources), None)
    if primary is not None:
        bundle.meta["source_uri"] = primary
    return bundle


def run(params: Params, out_dir: str | Path) -> dict[str, Any]:
    check_outputs("prepare_data", dirs=[out_dir])
    from daft_core.data import save_bundle

    timer = Timer()
    d = params.data
    with tracked(params, "prepare_data", {"data": d.model_dump(mode="json")}) as tracker:
        log.info("building preset %r (seed %d)", d.preset, d.seed)
        bundle = build_bundle(params, out_dir)
        check_output_dir(out_dir, "prepare_data")  # again, in case it changed meanwhile
        with atomic_dir(out_dir) as tmp:  # the bundle and its marker land in one rename
            staged = tmp / "bundle"
            manifest = save_bundle(bundle, staged)
            for entry in staged.iterdir():
                os.replace(entry, tmp / entry.name)
            staged.rmdir()
            write_marker(tmp, "prepare_data")
        counts = {"id_train": len(bundle.train), "id_val": len(bundle.val), "id_test": len(bundle.test)}
        counts.update({f"ood.{k}": len(v) for k, v in bundle.ood.items()})
        tracker.log_metrics({f"count.{k}": v for k, v in counts.items()})
        tracker.log_dataset(
            str(out_dir),
            manifest,
            name=f"{d.preset}-prepared",
            context="prepared",
            source=bundle.meta.get("source_uri"),
        )
        log.info("wrote %s: %s in %.1fs", out_dir, counts, timer.seconds)
        return {"out_dir": str(out_dir), "counts": counts, "seconds": timer.seconds, **tracker.run_info()}


def _main(argv: Sequence[str] | None) -> None:
    p = base_parser(__doc__ or "")
    p.add_argument("--out", required=True, help="directory for the prepared dataset")
    p.add_argument("--summary", default=None, help="optional JSON file for the counts")
    args = p.parse_args(argv)
    check_outputs("prepare_data", dirs=[args.out], files=[args.summary])
    result = run(params_from_args(args), args.out)
    if args.summary:
        write_json(args.summary, result)


main = cli(_main)

if __name__ == "__main__":
    raise SystemExit(main())
