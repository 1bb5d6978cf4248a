"""Following a cohort's tasks on the cluster: one bar over cases (done, failed, running, time left).

:func:`collect` yields each task's outcome as it finishes. A task returns a small
dict (``status`` ``"done"`` or ``"failed"``, ``reason``, ``worker``...); a task that
ended in an error of its own (the worker running it died too often, its code could
not be loaded on the worker) is turned into a ``"failed"`` outcome with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from .state import one_line

__all__ = ["CohortProgress", "collect"]

#: seconds between updates of the running count (one scheduler query each)
REFRESH_S = 1.0


class CohortProgress:
    """A tqdm bar over all cases of a cohort; cases complete from an earlier run count as done from the start."""

    def __init__(self, total: int, already_done: int = 0, enabled: bool = True, desc: str = "cases"):
        from tqdm.auto import tqdm

        self.done = already_done
        self.failed = 0
        self.running = 0
        self.already_done = already_done
        # time left is estimated from the cases this run finishes, not those found complete
        self.bar = tqdm(total=total, initial=already_done, desc=desc, unit="case", disable=not enabled,
                        dynamic_ncols=True)
        self._show()

    def _show(self) -> None:
        resumed = f" (resumed: {self.already_done} were complete)" if self.already_done else ""
        self.bar.set_postfix_str(f"done {self.done}, failed {self.failed}, running {self.running}{resumed}",
                                 refresh=True)

    def finished(self, ok: bool) -> None:
        """One case finished, well or not."""
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self.bar.update(1)
        self._show()

    def set_running(self, n: int) -> None:
        """How many cases the workers are on now."""
        if n != self.running:
            self.running = n
            self._show()

    def close(self) -> None:
        """End the bar."""
        self.running = 0
        self._show()
        self.bar.close()


def _outcome(future) -> dict[str, Any]:
    """A finished future's outcome dict; an errored one as a failure with its one-line reason."""
    if future.status == "finished":
        return future.result()
    if future.status == "error":
        err = future.exception()
        from distributed.scheduler import KilledWorker

        if isinstance(err, KilledWorker):
            reason = (f"every worker that ran it died ({err.allowed_failures + 1} tries; out of memory?); "
                      f"the last was {err.last_worker.address}")
        else:
            reason = f"{type(err).__name__}: {one_line(err)}"
        return {"status": "failed", "reason": reason}
    return {"status": "failed", "reason": f"the task was {future.status}"}


def collect(client, futures: dict[Any, Any], progress: CohortProgress | None = None) -> Iterator[tuple[Any, dict]]:
    """Yield ``(futures[future], outcome)`` for every future as it finishes; ``progress`` is kept told how many
    of them the workers are running (the caller counts the finished ones)."""
    from distributed import wait
    from distributed.utils import TimeoutError as DaskTimeout

    pending = set(futures)
    last = 0.0
    while pending:
        try:
            done, pending = wait(list(pending), timeout=REFRESH_S, return_when="FIRST_COMPLETED")
        except (TimeoutError, DaskTimeout):
            done = set()
        for future in done:
            yield futures[future], _outcome(future)
        if progress is not None and pending and time.monotonic() - last >= REFRESH_S:
            last = time.monotonic()
            keys = {f.key for f in pending}
            assigned = sum(1 for ks in client.processing().values() for k in ks if k in keys)
            # a worker may hold a task queued behind the one it runs: at most one per thread runs
            progress.set_running(min(assigned, sum(client.nthreads().values())))
