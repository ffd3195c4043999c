"""A step replaces only a previous output of its own: the up-front output check and the output marker.

Every output folder a step writes holds ``.daft-output.json`` (``{"format": 1, "project": "daft-pipeline",
"step": "<step>"}``), written into the temp folder so it lands with the output in the same rename. Before
doing any work a step calls :func:`check_outputs` with its inputs and outputs; it refuses (``StepError``, one
line naming the path and the fix) when

* an output overlaps an input (the same path, inside it, or holding it) or another output;
* an output folder exists and is neither empty nor marked by this step (no marker, a marker of another step
  or project, or a file where the folder goes) -- except an unmarked folder holding only names the step
  writes (``known``: the report's folder, which DVC empties only of the files it tracks);
* an output file's path is an existing folder (an existing file is replaced: it is the step's own JSON).

An interrupted earlier write of an output is recovered first (``daft_core.atomic.recover``), so the check
judges the complete previous output, and stale temporaries beside it are deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from components.common import StepError, write_json
from daft_core.atomic import recover

MARKER = ".daft-output.json"
MARKER_FORMAT = 1
PROJECT = "daft-pipeline"

PathLike = str | os.PathLike[str]
_FIX = "choose a new or empty folder, or delete it yourself"


def marker(step: str) -> dict[str, Any]:
    """The marker's content (no timestamps: a rerun's output stays byte-identical for DVC)."""
    return {"format": MARKER_FORMAT, "project": PROJECT, "step": step}


def write_marker(folder: PathLike, step: str) -> Path:
    """Mark `folder` (the step's temp output folder, before the swap) as `step`'s output."""
    return write_json(Path(folder) / MARKER, marker(step))


def read_marker(folder: PathLike) -> dict[str, Any] | None:
    """The marker in `folder`: None when there is none, ``{}`` when it is unreadable or not ours."""
    path = Path(folder) / MARKER
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def check_outputs(
    step: str,
    *,
    dirs: Iterable[PathLike | None] = (),
    files: Iterable[PathLike | None] = (),
    inputs: Iterable[PathLike | None] = (),
    known: Iterable[str] = (),
) -> None:
    """Refuse, before any work, outputs that `step` may not write (see the module docstring).

    `dirs`: output folders; `files`: output files; `inputs`: every input path (URIs such as ``s3://`` are
    skipped). None entries (optional arguments not given) are ignored. `known`: see :func:`check_output_dir`.
    """
    known = tuple(known)
    ins = [(str(p), _resolved(p)) for p in inputs if p is not None and not _is_uri(p)]
    outs = [(str(p), _resolved(p), True) for p in dirs if p is not None]
    outs += [(str(p), _resolved(p), False) for p in files if p is not None]
    for i, (shown, path, _) in enumerate(outs):  # resolved: a link into an input is that input
        for inp_shown, inp in ins:
            if _overlaps(path, inp):
                raise StepError(
                    f"refusing to write {shown}: it {_relation(path, inp)} the input {inp_shown}; "
                    "choose a new or empty folder outside the inputs"
                )
        for other_shown, other, _ in outs[i + 1 :]:
            if _overlaps(path, other):
                raise StepError(
                    f"refusing to write {shown}: it {_relation(path, other)} the output {other_shown}; "
                    "give each output its own path"
                )
    for shown, _, is_dir in outs:
        path = Path(os.path.abspath(Path(shown).expanduser()))  # the path itself is what gets replaced
        _check_ancestors(shown, path)
        recover(path)
        if is_dir:
            check_output_dir(path, step, shown=shown, known=known)
        elif path.is_dir():
            raise StepError(f"refusing to write {shown}: it is a folder, the step writes a file; {_FIX}")
        elif os.path.lexists(path) and not path.is_file():
            raise StepError(f"refusing to write {shown}: it exists and is not a regular file; {_FIX}")


def check_output_dir(
    path: PathLike, step: str, *, shown: str | None = None, known: Iterable[str] = ()
) -> None:
    """Refuse (StepError) unless `path` is missing, an empty folder, or a folder marked by `step`.

    `known`: the names `step` writes into the folder; an unmarked folder holding only such names is the
    step's own output from before markers, or what is left of it when DVC deleted the files it tracks (the
    report's folder, partly tracked by git). Also run right before the swap (publish_model, report), for a
    folder that appeared during the run.
    """
    path = Path(path)
    shown = shown or str(path)
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise StepError(f"refusing to replace {shown}: it is a file, not an output folder; {_FIX}")
    names = {p.name for p in path.iterdir()}
    if not names:
        return  # e.g. a folder Kubeflow created for the output artifact
    found = read_marker(path)
    if found is None and names <= set(known):
        return
    if found is None:
        raise StepError(
            f"refusing to replace {shown}: a non-empty folder without {MARKER}, so not an earlier "
            f"`{step}` output; {_FIX}"
        )
    if found.get("project") != PROJECT or not isinstance(found.get("step"), str):
        raise StepError(f"refusing to replace {shown}: its {MARKER} is not this project's; {_FIX}")
    if found["step"] != step:
        raise StepError(
            f"refusing to replace {shown}: it holds the output of step `{found['step']}`, not `{step}`; "
            f"{_FIX}"
        )


def _is_uri(p: PathLike) -> bool:
    return "://" in str(p)


def _resolved(p: PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _relation(out: Path, other: Path) -> str:
    if out == other:
        return "is"
    return "is inside" if other in out.parents else "contains"


def _check_ancestors(shown: str, path: Path) -> None:
    for anc in path.parents:
        if os.path.lexists(anc):
            if not anc.is_dir():
                raise StepError(f"refusing to write {shown}: {anc} is a file, not a folder; {_FIX}")
            return
