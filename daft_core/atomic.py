"""Atomic outputs: a reader (or a rerun after a kill) sees the old file/folder or the new one, never half.

Every writer in the project goes through these two helpers: a temp path beside the destination (same file
system, so the final ``os.replace`` is atomic), removed again if the write fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", **open_kw: Any) -> Iterator[IO[Any]]:
    """Yield an open temp file beside `path`; on success it is flushed, fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final`, else it is removed.

    An existing `final` is moved aside first and put back if the swap fails, so a failed rerun keeps the
    previous output. Callers decide beforehand whether `final` may be replaced at all.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, old / "content")
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old / "content", final)  # put the previous output back
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
