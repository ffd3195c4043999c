"""Atomic outputs: a reader (or a rerun after a kill) sees the old file/folder or the new one, never half.

Every writer in the project goes through :func:`atomic_file` and :func:`atomic_dir`. They write beside the
destination ``final`` (same file system, so each rename is atomic), under names derived from it:

``.<name>.<token>.tmp``       a file being written by :func:`atomic_file`
``.<name>.daft-new-<token>``  a folder being written by :func:`atomic_dir`
``.<name>.daft-old``          the previous ``final`` while the new one is renamed in (a complete copy)
``.<name>.daft-del-<token>``  the previous ``final`` being deleted after the swap

A kill (SIGKILL, OOM, a lost node) at any point leaves one of these states, and :func:`recover` -- run at the
start of every :func:`atomic_file` / :func:`atomic_dir` on the same destination, and by the steps' up-front
output check -- makes it whole again: a missing ``final`` whose complete ``.daft-old`` copy exists is put
back, and every stale temporary beside it (also those of earlier versions: ``.<name>.old-<id>``,
``.<name>.tmp-<id>``, ``.<name>.XXXXXXXX.old``) is deleted, so they never accumulate.

Two processes writing the same destination at once do not corrupt each other: a writer holds an advisory
lock (``flock``) on its temporary, which recovery never deletes, and the swap itself runs under a lock on
the parent folder. (Where the file system has no ``flock``, writes are still atomic; only concurrent writers
of one destination are unsupported.)

Kill points (``daft_core.faults``; a test sets ``DAFT_KILL_AT``): ``atomic.after_write_new``,
``atomic.after_move_aside``, ``atomic.after_rename_new``, ``atomic.before_delete_old``,
``atomic.during_delete_old`` (folders); ``atomic.file_after_write``, ``atomic.file_after_replace`` (files).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from daft_core.faults import kill_point

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks (one writer per destination)
    fcntl = None  # type: ignore[assignment]

_HELD: set[tuple[int, int]] = set()  # (device, inode) of the temporaries this process is writing

KILL_POINTS = (
    "atomic.after_write_new",
    "atomic.after_move_aside",
    "atomic.after_rename_new",
    "atomic.before_delete_old",
    "atomic.during_delete_old",
    "atomic.file_after_write",
    "atomic.file_after_replace",
)

_TOKEN = r"[0-9A-Za-z_-]+"  # no dots, so `.a.<token>.tmp` can never be a temporary of `a.b`


def aside_path(final: str | os.PathLike[str]) -> Path:
    """Where :func:`atomic_dir` keeps the previous ``final`` during the swap."""
    final = _normalise(final)
    return final.parent / f".{final.name}.daft-old"


def _normalise(path: str | os.PathLike[str]) -> Path:
    p = Path(os.path.abspath(path))
    if not p.name:
        raise ValueError(f"{path}: an output needs a name (not a file system root)")
    return p


def _token() -> str:
    return secrets.token_hex(6)


def _patterns(name: str) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """(complete copies of an old `final`, temporaries that a live writer may own, other leftovers)."""
    n = re.escape(name)
    asides = re.compile(rf"\.{n}\.(?:daft-old|old-[0-9a-f]+|[0-9a-z_]{{8}}\.old)")  # old-<pid or uuid>
    owned = re.compile(rf"\.{n}\.(?:daft-new-{_TOKEN}|{_TOKEN}\.tmp)")
    leftovers = re.compile(rf"\.{n}\.(?:daft-del-{_TOKEN}|tmp{_TOKEN}|tmp)")
    return asides, owned, leftovers


def _aside_content(entry: Path) -> Path | None:
    """The complete previous output an aside entry holds (the 8-char ``.old`` folders of the first
    daft_core.atomic held it as ``content``), or None."""
    if entry.name.endswith(".daft-old") or re.search(r"\.old-[0-9a-f]+$", entry.name):
        return entry
    content = entry / "content"
    return content if os.path.lexists(content) else None


def _aside_rank(entry: Path) -> tuple[int, float]:
    """Prefer the current aside name, then the most recently moved legacy one."""
    try:
        mtime = entry.lstat().st_mtime
    except OSError:
        mtime = 0.0
    return (0 if entry.name.endswith(".daft-old") else 1, -mtime)


def recover(final: str | os.PathLike[str]) -> Path | None:
    """Make ``final`` whole after a killed write, and delete the stale temporaries beside it.

    If ``final`` is missing and a complete copy moved aside by an interrupted swap exists, it is renamed
    back. Temporaries a live writer holds are left alone. Returns the aside entry restored, or None.
    Never touches ``final`` itself when it exists.
    """
    final = _normalise(final)
    if not final.parent.is_dir():
        return None
    with _dir_lock(final.parent):
        return _recover_locked(final)


def _recover_locked(final: Path, keep: Path | None = None) -> Path | None:
    asides_re, owned_re, leftovers_re = _patterns(final.name)
    asides, owned, leftovers = [], [], []
    prefix = f".{final.name}."
    with os.scandir(final.parent) as it:
        for e in it:
            if not e.name.startswith(prefix):
                continue
            path = final.parent / e.name
            if path == keep:
                continue
            if asides_re.fullmatch(e.name):
                asides.append(path)
            elif owned_re.fullmatch(e.name):
                owned.append(path)
            elif leftovers_re.fullmatch(e.name):
                leftovers.append(path)
    restored = None
    if not os.path.lexists(final):
        for entry in sorted(asides, key=_aside_rank):
            content = _aside_content(entry)
            if content is not None:
                os.replace(content, final)
                _fsync_dir(final.parent)
                restored = entry
                break
    for path in [*asides, *leftovers, *(p for p in owned if not _in_use(p))]:
        _remove(path)
    return restored


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", **open_kw: Any) -> Iterator[IO[Any]]:
    """Yield an open temp file beside `path`; on success it is flushed, fsynced and renamed onto `path`.

    On failure the temp file is removed and `path` is untouched.
    """
    path = _normalise(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(path.parent):  # no recovery elsewhere sees the temp file before it is held
        _recover_locked(path)
        tmp = path.parent / f".{path.name}.{_token()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        owner = _hold(tmp)
    try:
        try:
            f = os.fdopen(fd, mode, **open_kw)
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        kill_point("atomic.file_after_write")
        os.replace(tmp, path)
        kill_point("atomic.file_after_replace")
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _release(owner)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final`, else it is removed.

    An existing `final` is moved aside (``.<name>.daft-old``), the new folder renamed in, then the old one
    deleted; a kill at any moment is undone by :func:`recover` at the next write of `final`. Callers decide
    beforehand whether `final` may be replaced at all (components/outputs.py).
    """
    final = _normalise(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _dir_lock(parent):  # no recovery elsewhere sees the temp folder before it is held
        _recover_locked(final)
        tmp = parent / f".{final.name}.daft-new-{_token()}"
        tmp.mkdir()
        owner = _hold(tmp)
    trash = None
    try:
        yield tmp
        kill_point("atomic.after_write_new")
        with _dir_lock(parent):
            _recover_locked(final, keep=tmp)  # another writer's kill while this one was writing
            aside = None
            if os.path.lexists(final):
                aside = aside_path(final)
                os.replace(final, aside)
                kill_point("atomic.after_move_aside")
            try:
                os.replace(tmp, final)
            except BaseException:
                if aside is not None:
                    os.replace(aside, final)  # put the previous output back
                raise
            _fsync_dir(parent)
            kill_point("atomic.after_rename_new")
            if aside is not None:
                kill_point("atomic.before_delete_old")
                # renamed first, so a half-deleted old output is never taken for a complete copy
                trash = parent / f".{final.name}.daft-del-{_token()}"
                os.replace(aside, trash)
                kill_point("atomic.during_delete_old")
    finally:
        _release(owner)
        if os.path.lexists(tmp):
            _remove(tmp)
    if trash is not None:
        _remove(trash)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(d: Path) -> None:
    """Make renames in `d` durable (best effort: some file systems cannot fsync a folder)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hold(path: Path) -> tuple[int, tuple[int, int]] | None:
    """Lock `path` for this writer's lifetime (released by the kernel if the process dies)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    key = (st.st_dev, st.st_ino)
    _HELD.add(key)
    return fd, key


def _release(held: tuple[int, tuple[int, int]] | None) -> None:
    if held is not None:
        _HELD.discard(held[1])
        os.close(held[0])


def _in_use(path: Path) -> bool:
    """Whether a live writer holds `path` (see :func:`_hold`)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _held_here(d: Path) -> bool:
    """`d` is a temp folder this process is writing (its own lock would block it; nobody else writes it)."""
    try:
        st = os.stat(d)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in _HELD


@contextlib.contextmanager
def _dir_lock(d: Path) -> Iterator[None]:
    """Serialise swaps and recoveries in folder `d` (a no-op where the file system has no flock)."""
    fd = None
    if fcntl is not None and not _held_here(d):
        try:
            fd = os.open(d, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
