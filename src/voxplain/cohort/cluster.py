"""The Dask side of a cohort: a local cluster of worker processes or an existing one, and what workers keep.

:func:`open_cluster` gives a :class:`distributed.Client` either to a
:class:`distributed.LocalCluster` of ``workers`` processes started here (one task at
a time each; the machine's cores split between them as torch threads) or to the
scheduler at ``scheduler`` (``tcp://host:8786``: ``dask scheduler`` / ``dask worker``,
dask-jobqueue, dask-kubernetes), whose workers keep the thread count they were started
with. Every case task first undoes the malloc setting Dask's nanny gives its workers
(:func:`voxplain.host_heap.own_process_heap`).

A worker loads the model once and keeps it for every case it is given
(:func:`cached_model`): one copy per worker thread, because a run installs hooks
and switches modes on the model it explains, so two cases at once must not share one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ..host_heap import own_process_heap

__all__ = ["open_cluster", "WorkerSetup", "cached_model", "worker_identity", "worker_label", "usable_cores"]

#: how long to wait for an existing scheduler to answer, unless Dask's own
#: ``distributed.comm.timeouts.connect`` (e.g. DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT) is set lower
CONNECT_TIMEOUT = "20s"

_models: dict[int, tuple[Any, Any]] = {}  # worker thread id -> (model key, model)
_models_lock = threading.Lock()
_loads = 0  # models this process has loaded (each worker process has its own)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class WorkerSetup(WorkerPlugin):
    """Prepares every worker for explanation passes: memory reuse, and torch's thread count on a local cluster.

    Dask's nanny starts workers with ``OMP_NUM_THREADS=1`` (torch would use one core per
    worker whatever the machine has) and with a malloc setting that makes tensor-heavy
    tasks about twice as slow (:func:`voxplain.host_heap.own_process_heap`). ``threads=None`` leaves the
    thread count as the worker was started (an existing cluster, whose owner chose it).
    """

    name = "voxplain-worker-setup"

    def __init__(self, threads: int | None = None):
        self.threads = None if threads is None else int(threads)

    def setup(self, worker) -> None:
        """Called by Dask on each worker as it starts (or joins)."""
        own_process_heap()
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)


def cached_model(key: Any, load: Callable[[], Any]) -> tuple[Any, bool]:
    """The model for ``key`` loaded in this worker thread, loading it with ``load()`` the first time.

    Returns ``(model, loaded_now)``. A thread keeps one model: a new key replaces the
    old one, so a long-lived worker serving several cohorts holds only the latest.
    """
    global _loads
    tid = threading.get_ident()
    with _models_lock:
        held = _models.get(tid)
    if held is not None and held[0] == key:
        return held[1], False
    model = load()
    with _models_lock:
        _models[tid] = (key, model)
        _loads += 1
    return model, True


def worker_identity() -> dict[str, Any]:
    """Which worker runs this task (name, address), on which host and process, and its model loads so far."""
    ident: dict[str, Any] = {"name": None, "address": None, "host": socket.gethostname(), "pid": os.getpid(),
                             "model_loads": _loads}
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:  # not inside a Dask task (called directly)
        return ident
    ident["name"] = str(worker.name)
    ident["address"] = worker.address
    return ident


def worker_label(ident: dict[str, Any]) -> str:
    """A worker's name as reports show it: its Dask name, else ``host:pid``."""
    return str(ident["name"] if ident["name"] is not None else f"{ident['host']}:{ident['pid']}")


def _connect_timeout(dask) -> float:
    """Seconds to wait for a scheduler: :data:`CONNECT_TIMEOUT`, or Dask's configured connect timeout if shorter."""
    from dask.utils import parse_timedelta

    ours = parse_timedelta(CONNECT_TIMEOUT)
    theirs = dask.config.get("distributed.comm.timeouts.connect", None)
    return min(ours, parse_timedelta(theirs)) if theirs else ours


def _dashboard(client) -> str | None:
    """The dashboard's address when the scheduler serves one (it needs bokeh)."""
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:  # an old or unusual scheduler: say nothing rather than guess
        return None
    return client.dashboard_link if "dashboard" in services else None


@contextlib.contextmanager
def open_cluster(workers: int | None = None, scheduler: str | None = None,
                 say: Callable[[str], None] | None = None) -> Iterator[Any]:
    """A Dask client: to a new local cluster of ``workers`` processes, or to the scheduler at ``scheduler``.

    The local cluster (and its processes) is closed when the block ends, also on
    errors and Ctrl-C; an existing cluster is only disconnected from. ``say`` receives
    one-line notes for the user (the dashboard's address, waiting for workers).
    """
    import dask
    from distributed import Client, LocalCluster

    say = say or (lambda text: None)
    if (workers is None) == (scheduler is None):
        raise ValueError("give either workers (a local cluster) or scheduler (an existing one)")
    with contextlib.ExitStack() as stack:
        if scheduler is not None:
            try:
                client = stack.enter_context(Client(scheduler, timeout=_connect_timeout(dask)))
            except (OSError, TimeoutError) as err:
                raise OSError(f"cannot reach the Dask scheduler at {scheduler} ({' '.join(str(err).split())}); "
                              "start one with `dask scheduler` and workers with `dask worker ADDRESS`") from None
            if not client.scheduler_info().get("workers"):
                say(f"the scheduler at {scheduler} has no workers yet; cases start when one joins")
        else:
            if workers < 1:
                raise ValueError(f"--workers must be at least 1, got {workers}")
            threads = max(1, usable_cores() // workers)
            # cases are long tasks: hand a worker its next one only when it is free (no queue on the
            # worker), so that the last cases are not stuck behind a busy one while another idles
            stack.enter_context(dask.config.set({"distributed.scheduler.worker-saturation": 1.0}))
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True,
                silence_logs=logging.ERROR, dashboard_address=":0"))
            client = stack.enter_context(Client(cluster))
            client.register_plugin(WorkerSetup(threads))
        link = _dashboard(client)
        if link:
            say(f"Dask dashboard: {link}")
        yield client
