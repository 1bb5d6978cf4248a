"""Host memory freed by one pass, kept for the next while an engine is open (glibc only).

glibc's ``malloc`` serves every block above its *mmap threshold* (at most 32 MB while it adapts the
threshold itself) with a fresh ``mmap`` and hands it back to the kernel on ``free``; it also gives
the top of its heap back once more than its *trim threshold* lies free there. A pass of a 3D model
allocates tens of such blocks, so each pass after the first pays again for the kernel to map and
zero every page of them: on this project's benchmark machine a quarter to a third of a 64^3 U-Net
forward+backward was spent in page faults (1x4x64^3, four rows: 31,700 faults and 343 ms a pass,
against none and 235 ms with the thresholds raised).

:func:`keep_freed_host_memory` raises both thresholds while explanation passes run, so blocks a
pass frees serve the next pass; the numbers computed are bitwise the same. When the last user
leaves, the thresholds are set to the largest values glibc's own adaptation reaches (32 MB and
64 MB; glibc offers no way to switch its adaptation back on), and where the process grew by more
than 64 MB meanwhile, ``malloc_trim(0)`` returns the free memory to the system: the process keeps
no more free memory than glibc would keep on its own.

The thresholds are process-wide settings. Nothing is changed where the C library is not glibc,
where the user set glibc's malloc environment variables or ``GLIBC_TUNABLES`` (their settings
stand), or where ``VOXPLAIN_HOST_HEAP=system`` is set. voxplain's own worker processes take the
thresholds over from the environment their launcher gave them (:func:`own_process_heap`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["acquire", "heap_is_kept", "keep_freed_host_memory", "own_process_heap", "release"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# while kept: blocks up to 1 GiB come from the heap, and up to 2 GiB may lie free at its top
_KEPT_MMAP_THRESHOLD = 1 << 30
_KEPT_TRIM_THRESHOLD = (1 << 31) - 1
# after: the largest thresholds glibc's adaptation reaches on 64-bit systems
_AFTER_MMAP_THRESHOLD = 32 << 20
_AFTER_TRIM_THRESHOLD = 64 << 20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
OPT_OUT = "VOXPLAIN_HOST_HEAP"

_lock = threading.Lock()
_users = 0
_resident_at_start: int | None = None  # resident bytes when the first user came
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet
_owned = False  # this process is voxplain's worker: the environment's malloc settings are not the user's
_statm: tuple[int, int] | None = None  # (process id, descriptor of its /proc/self/statm)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _glibc() -> ctypes.CDLL | None:
    """The running glibc, or None where the C library is another one."""
    global _libc
    if _libc is False:
        _libc = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version.restype = ctypes.c_char_p
                libc.gnu_get_libc_version()
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc


def _resident_bytes() -> int | None:
    """This process's resident memory, or None where /proc cannot say.

    Read through a descriptor kept open (per process: a forked child opens its own), since opening
    the file costs more than the rest of an engine's entry."""
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _opted_out() -> bool:
    """True where ``VOXPLAIN_HOST_HEAP=system`` leaves glibc's thresholds alone."""
    return os.environ.get(OPT_OUT, "").strip().lower() == "system"


def _user_decides() -> bool:
    """True where the user's environment settles glibc's thresholds or opts out of this module."""
    environ = os.environ
    if _opted_out():
        return True
    if _owned:
        return False
    for name in _USER_SETTINGS:
        if name in environ:
            return True
    return "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")


def own_process_heap() -> bool:
    """Take glibc's thresholds over in a process voxplain runs as a worker; True if glibc took them.

    Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which fixes glibc's
    thresholds at their smallest: every tensor over 128 KiB is then a fresh ``mmap`` whose pages
    the kernel zeroes on first touch, and explanation tasks ran about twice as slowly (Guided IG
    on the demo classifier: 20.1 s against 10.9 s). This sets the thresholds to the largest values
    glibc's own adaptation reaches (blocks up to 32 MiB come from the heap and are reused) and lets
    engines raise them during passes, as in any other process.
    """
    global _owned
    libc = _glibc()
    if libc is None or _opted_out():
        return False
    with _lock:
        _owned = True
        if _users == 0:
            return bool(libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
                        and libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD))
    return True


def heap_is_kept() -> bool:
    """True while some engine keeps freed host memory for reuse."""
    return _users > 0


def acquire() -> bool:
    """Start keeping freed host memory (see :func:`keep_freed_host_memory`); True if this call counts
    as a user, and must then be matched by one :func:`release`."""
    global _users, _resident_at_start
    libc = None if _user_decides() else _glibc()
    if libc is None:
        return False
    with _lock:
        if _users == 0:
            _resident_at_start = _resident_bytes()
            if not libc.mallopt(_M_MMAP_THRESHOLD, _KEPT_MMAP_THRESHOLD):
                libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)  # a glibc that caps the threshold
            libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_TRIM_THRESHOLD)
        _users += 1
    return True


def release() -> None:
    """End one :func:`acquire` that returned True; the last one lowers the thresholds and, where the
    process grew by more than the lowered trim threshold since the first came, trims the heap."""
    global _users
    libc = _glibc()
    with _lock:
        _users -= 1
        if _users == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)
            now = _resident_bytes()
            if now is None or _resident_at_start is None or now - _resident_at_start > _AFTER_TRIM_THRESHOLD:
                libc.malloc_trim(0)


@contextlib.contextmanager
def keep_freed_host_memory() -> Iterator[None]:
    """Keep host memory freed inside this block for reuse by later allocations in it.

    Re-entrant and shared between threads: the first to enter raises glibc's thresholds, the
    last to leave lowers them and gives large free memory back (:func:`release`). A no-op off
    glibc and where the user decides (see the module docstring).
    """
    counted = acquire()
    try:
        yield
    finally:
        if counted:
            release()
