"""Write outputs so that a failure never leaves them half-written and nothing voxplain did not write is lost.

Files and folders are built under a temporary name beside their destination and
renamed into place only when complete (a rename within one file system is atomic).

Every folder voxplain writes carries a marker, ``.voxplain-output.json``, naming
the kind of output (the command that wrote it) and listing every file in it with
its size. A folder is only ever replaced (or, for a sweep, resumed) when it is
empty, or when its marker names the same kind and the folder holds nothing but
the listed files (unchanged in size; a sub-folder with a marker of its own counts
for the files it lists). Anything else is refused with an
:class:`OutputFolderError` that names the files voxplain did not write.

A folder being built is hidden as ``.NAME.XXXXXXXX.part`` beside its destination
and holds ``.voxplain-part.json`` (process id and host). It is removed when the
work fails or is interrupted (Ctrl-C, and SIGTERM through the command line's
handler; also when the interruption was swallowed by a finaliser, see
:mod:`voxplain.interrupt`); a later write to the same destination removes parts left by a process
that is gone (e.g. killed with SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from .interrupt import raise_if_stop_requested

__all__ = ["atomic_file", "atomic_dir", "check_replaceable", "claim_folder", "record_files", "OutputFolderError",
           "remove_stale_parts", "is_intact", "MARKER_NAME", "PART_OWNER_NAME"]

#: the file listing what voxplain wrote into a folder
MARKER_NAME = ".voxplain-output.json"
#: the file naming the process that builds a hidden part folder
PART_OWNER_NAME = ".voxplain-part.json"
_MARKER_FORMAT = "voxplain-output"
_SHOWN = 3  # stray files named in an error


class OutputFolderError(ValueError):
    """An output folder holds files voxplain did not write (or is not a folder): it is left alone."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions instead
_UMASK = _umask()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a few file operations must finish together (main thread, POSIX)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- the marker -------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_marker(folder: Path) -> dict | None:
    data = _read_json(folder / MARKER_NAME)
    if data is None or data.get("format") != _MARKER_FORMAT or not isinstance(data.get("files"), dict):
        return None
    return data


def _is_part(path: Path) -> bool:
    """A hidden folder voxplain is building (or was building when its process died)."""
    return path.name.startswith(".") and (path / PART_OWNER_NAME).is_file()


def _entries(folder: Path) -> Iterator[tuple[str, int]]:
    """``(relative path, size)`` of every file and link under ``folder``; part folders are skipped."""
    stack = [(folder, "")]
    while stack:
        here, prefix = stack.pop()
        with os.scandir(here) as it:
            items = sorted(it, key=lambda e: e.name)
        for e in items:
            rel = prefix + e.name
            if e.is_dir(follow_symlinks=False):
                if not _is_part(Path(e.path)):
                    stack.append((Path(e.path), rel + "/"))
            else:
                yield rel, e.stat(follow_symlinks=False).st_size


def _write_marker(folder: Path, kind: str, files: dict[str, int | None]) -> None:
    data = {"format": _MARKER_FORMAT, "version": 1, "kind": kind, "files": dict(sorted(files.items()))}
    tmp = folder / f"{MARKER_NAME}.{os.getpid()}.tmp"
    with _signals_deferred():
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, folder / MARKER_NAME)


def _listing(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its size, leaving out the marker itself."""
    return {rel: size for rel, size in _entries(folder) if rel != MARKER_NAME}


def record_files(folder: str | os.PathLike, paths: Iterable[str | os.PathLike], any_size: bool = False) -> None:
    """Add files voxplain wrote into ``folder`` (one with a marker) to its marker; no-op without one.

    ``paths`` are relative to ``folder``; a sub-folder adds every file under it.
    ``any_size`` lists them without a size, for files voxplain keeps changing (a database).
    """
    folder = Path(folder)
    marker = _read_marker(folder)
    if marker is None:
        return
    files = dict(marker["files"])
    for p in paths:
        rel = Path(p).as_posix()
        full = folder / rel
        if full.is_dir() and not full.is_symlink():
            files.update({f"{rel}/{r}": (None if any_size else s) for r, s in _entries(full)})
        else:
            files[rel] = None if any_size or not full.exists() else full.lstat().st_size
    _write_marker(folder, marker.get("kind", ""), files)


def is_intact(folder: str | os.PathLike, kind: str) -> bool:
    """True if ``folder`` is a finished voxplain output of ``kind`` exactly as written.

    Its marker names ``kind``, every file it lists is there with the listed size, and
    nothing else is (files listed without a size only need to exist).
    """
    folder = Path(folder)
    marker = _read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
    if marker is None or marker.get("kind") != kind:
        return False
    for rel, size in marker["files"].items():
        path = folder / rel
        if not path.is_file() or (size is not None and path.stat().st_size != size):
            return False
    return not _foreign(folder)


def _foreign(folder: Path) -> list[str]:
    """Files under ``folder`` that no marker (its own or a sub-folder's) lists with their current size."""
    listings: dict[str, dict] = {}  # folder prefix ("" or "a/b/") -> files listed by the marker there

    def listed_by(prefix: str) -> dict:
        if prefix not in listings:
            marker = _read_marker(folder / prefix) if prefix else _read_marker(folder)
            listings[prefix] = marker["files"] if marker else {}
        return listings[prefix]

    foreign = []
    for rel, size in _entries(folder):
        parts = rel.split("/")
        if parts[-1] == MARKER_NAME:
            continue
        ok = False
        for depth in range(len(parts)):  # the folder's own marker, then every sub-folder's on the way down
            prefix = "/".join(parts[:depth]) + ("/" if depth else "")
            listed = listed_by(prefix)
            key = rel[len(prefix):]
            if key in listed and listed[key] in (None, size):
                ok = True
                break
        if not ok:
            foreign.append(rel)
    return foreign


def _name_files(files: list[str]) -> str:
    shown = ", ".join(files[:_SHOWN])
    return shown + (f" and {len(files) - _SHOWN} more" if len(files) > _SHOWN else "")


def check_replaceable(path: str | os.PathLike, kind: str) -> Path:
    """``path`` as a Path if voxplain may write its ``kind`` of output there (replacing what is there).

    Allowed: a path that does not exist, an empty folder, or a folder whose marker names
    ``kind`` and that holds only the files listed (a finished earlier output of the same
    kind). Otherwise raises :class:`OutputFolderError` naming (the first few of) the
    files voxplain did not write.
    """
    dest = Path(path)
    if dest.is_symlink():
        raise OutputFolderError(f"output folder {dest} is a symbolic link; give the folder it points to")
    if dest.exists() and not dest.is_dir():
        raise OutputFolderError(f"output folder {dest} exists and is not a folder; choose another path")
    if not dest.exists():
        return dest
    files = [rel for rel, _ in _entries(dest)]
    if not files:
        return dest
    marker = _read_marker(dest)
    if marker is None:
        raise OutputFolderError(
            f"output folder {dest} is not empty and is not a voxplain output (no {MARKER_NAME}; it holds "
            f"{_name_files(files)}); voxplain never replaces what it did not write: choose a new or empty folder")
    if marker.get("kind") != kind:
        raise OutputFolderError(
            f"output folder {dest} holds a voxplain {marker.get('kind') or 'unknown'} output, not a {kind} "
            "output; it is left alone: choose a new or empty folder")
    foreign = _foreign(dest)
    if foreign:
        raise OutputFolderError(
            f"output folder {dest} holds files voxplain did not write or that changed since "
            f"({_name_files(foreign)}); move them away or choose a new or empty folder")
    return dest


# -- hidden part folders ----------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _stale(part: Path) -> bool:
    """A part (or set-aside old output) whose writer on this host is gone."""
    owner = _read_json(part / PART_OWNER_NAME)
    if owner is None:
        return False
    pid = owner.get("pid")
    return owner.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def remove_stale_parts(parent: str | os.PathLike, name: str) -> list[Path]:
    """Remove the hidden part folders of destination ``parent/name`` whose process has gone; returns them."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        if entry.name.startswith(f".{name}.") and entry.is_dir() and not entry.is_symlink() and _stale(entry):
            with _signals_deferred():
                shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _new_part(dest: Path) -> Path:
    with _signals_deferred():
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
        (tmp / PART_OWNER_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                       "destination": dest.name}) + "\n")
    return tmp


def _discard(tmp: Path) -> None:
    with _signals_deferred():
        shutil.rmtree(tmp, ignore_errors=True)


# -- writers ----------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    ``suffix`` is kept at the end of the temporary name for writers that infer the
    format from it (e.g. ``.nii.gz``); by default the destination's suffixes are used.
    A file written into a folder that carries a voxplain marker is added to it.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix or "".join(dest.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".part{suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        raise_if_stop_requested()  # a stop swallowed by a finaliser still keeps this file out
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, dest)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    if (dest.parent / MARKER_NAME).is_file():
        record_files(dest.parent, [dest.name])


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str = "output", overwrite: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary folder to fill; on success it becomes ``path``, on error it is removed.

    ``kind`` names the output (the command writing it) in the folder's marker. An
    existing ``path`` is replaced (with ``overwrite``) only if :func:`check_replaceable`
    allows it, checked before the work starts and again before the swap; otherwise
    :class:`OutputFolderError` is raised and nothing is touched.
    """
    dest = Path(path)
    if dest.exists() and not overwrite and not dest.is_symlink():
        raise OutputFolderError(f"output folder {dest} exists; remove it or choose another")
    check_replaceable(dest, kind)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(dest.parent, dest.name)
    tmp = _new_part(dest)
    try:
        yield tmp
        raise_if_stop_requested()  # a stop swallowed by a finaliser still keeps this folder out
        (tmp / PART_OWNER_NAME).unlink()
        _write_marker(tmp, kind, _listing(tmp))
        os.chmod(tmp, 0o777 & ~_UMASK)
        check_replaceable(dest, kind)  # the user may have added files while we worked
        with _signals_deferred():
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
                (old / PART_OWNER_NAME).write_text(json.dumps({"pid": os.getpid(),
                                                               "host": socket.gethostname()}) + "\n")
                os.replace(dest, old / "previous")
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
    except BaseException:
        _discard(tmp)
        raise


def claim_folder(path: str | os.PathLike, kind: str, expected: Iterable[str] = ()) -> Path:
    """Create (or take up again) a folder that voxplain fills over time, such as a sweep; returns it.

    A new or empty folder gets a marker of ``kind`` that already lists ``expected``
    (relative paths of files voxplain will keep changing, e.g. a database, listed
    without a size). An existing one is taken up only if :func:`check_replaceable`
    allows it (its marker names ``kind`` and nothing else is there); stale part
    folders under it are removed first.
    """
    dest = Path(path)
    check_replaceable(dest, kind)
    if dest.is_dir() and _read_marker(dest) is not None:
        for root, dirs, _ in os.walk(dest):
            for d in list(dirs):
                if _is_part(Path(root) / d):
                    dirs.remove(d)
                    if _stale(Path(root) / d):
                        _discard(Path(root) / d)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    _write_marker(dest, kind, {rel: None for rel in expected})
    return dest
