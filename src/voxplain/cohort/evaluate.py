"""``voxplain evaluate --workers N | --scheduler ADDRESS``: per-case metrics on a Dask cluster, gathered here.

One task per case scores its maps (:func:`voxplain.evaluate.runner.evaluate_case`,
the same code as the single-process loop) and returns them (a few numbers and
curves per method); the sanity checks run as their own tasks on the first
``randomisation_cases`` cases. The client adds the cases in the cohort's order
to a :class:`~voxplain.evaluate.runner.MetricsAccumulator`, so ``metrics.json`` and
the other files are those of a single-process run. A case that fails (an
unreadable file, a model error) is left out and listed in ``failures.csv`` and the
report; when it was one of the cases meant for the sanity checks, the next case
takes its place, as it would have in a run without it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..host_heap import own_process_heap
from .cluster import cached_model, open_cluster, worker_identity, worker_label
from .explain import INPUT_ERRORS, RETRIES, CohortResult, shared_spec
from .progress import CohortProgress, collect
from .state import FAILURES_NAME, model_digest, one_line, write_failures

__all__ = ["EvaluateJob", "run_evaluate_cohort", "evaluate_task", "randomise_task"]

_readers: dict[int, tuple[Any, Any]] = {}  # worker thread id -> (reader key, reader)
_readers_lock = threading.Lock()


@dataclass(frozen=True)
class EvaluateJob:
    """What every evaluation task needs; small, it travels with each task.

    ``reader`` names the case reader of :data:`voxplain.evaluate.cohort.READERS` and
    ``reader_args`` its arguments (paths absolute).
    """

    model: str
    model_key: str
    reader: str
    reader_args: dict[str, Any]
    methods: tuple[str, ...]
    weights: str | None = None
    allow_unsafe_pickle: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    families: tuple[str, ...] = ()
    steps: int = 20
    baseline: Any = "zero"
    tolerance: float = 0.0
    seed: int = 0
    device: Any = None
    batch_size: int | None = None
    memory_budget: str | None = None
    random_weights: bool = False
    sliding_window: dict[str, Any] | None = None


def _model(job: EvaluateJob):
    """``(model, sliding window)`` of the job on this worker (loaded once per worker)."""
    from ..report.pipeline import load_model_spec, model_grid

    def load():
        loaded = load_model_spec(job.model, job.weights, job.allow_unsafe_pickle, job.random_weights)
        if model_digest(loaded.model, None) != job.model_key:
            raise ValueError(f"the model {job.model} changed on disk since this evaluation started; run again")
        # --roi, else a bundle's own inferer
        return loaded.model, model_grid(loaded.config, loaded.bundle, sliding_window=job.sliding_window).sliding_window

    return cached_model((job.model_key, job.model, job.weights, job.random_weights, job.sliding_window), load)[0]


def _case(job: EvaluateJob, index: int, name: str):
    """Case ``index`` read on this worker (its reader kept for the next case), checked to be the one meant."""
    from ..evaluate.cohort import READERS

    key = (job.reader, tuple(sorted(job.reader_args.items())))
    tid = threading.get_ident()
    with _readers_lock:
        held = _readers.get(tid)
    if held is None or held[0] != key or index >= len(held[1]):
        held = (key, READERS[job.reader](**job.reader_args))
        with _readers_lock:
            _readers[tid] = held
    case = held[1].case(index)
    if case.name != name:
        raise ValueError(f"case {index} of {job.reader_args.get('root')} is now {case.name}, not {name}: "
                         "the folder changed since this evaluation started; run again")
    return case


def evaluate_task(job: EvaluateJob, index: int, name: str) -> dict[str, Any]:
    """Score case ``index`` (named ``name``) with every method (runs on a worker); returns its outcome."""
    from ..evaluate.runner import evaluate_case

    start = time.perf_counter()
    own_process_heap()
    try:
        model, window = _model(job)
        case = _case(job, index, name)
        scores = evaluate_case(model, case, job.methods, job.options, job.families, job.steps, job.baseline,
                               tolerance=job.tolerance, seed=job.seed, device=job.device, batch_size=job.batch_size,
                               memory_budget=job.memory_budget, sliding_window=window)
    except INPUT_ERRORS as err:
        return {"status": "failed", "reason": one_line(err), "worker": worker_label(worker_identity())}
    return {"status": "done", "scores": scores, "worker": worker_label(worker_identity()),
            "seconds": round(time.perf_counter() - start, 3)}


def randomise_task(job: EvaluateJob, index: int, name: str, scored: dict[str, Any]) -> dict[str, Any]:
    """The sanity checks on case ``index`` once its scores (``scored``, :func:`evaluate_task`'s outcome) are in."""
    from ..evaluate.runner import randomise_case

    if scored.get("status") != "done":
        return {"status": "failed", "reason": scored.get("reason", "its scores failed"), "worker": scored.get("worker")}
    own_process_heap()
    scores = scored["scores"]
    if scores.skipped is not None:  # not explained (an empty region): no checks, the next case takes its place
        return {"status": "skipped", "reason": scores.skipped, "worker": scored.get("worker")}
    try:
        model, window = _model(job)
        case = _case(job, index, name)
        checks = randomise_case(model, case, job.methods, job.options, scores.is_classifier and scores.classes > 1,
                                job.seed, job.device, job.batch_size, job.memory_budget, scores.check_target,
                                sliding_window=window)
    except INPUT_ERRORS as err:
        return {"status": "failed", "reason": one_line(err), "worker": worker_label(worker_identity())}
    return {"status": "done", "checks": checks, "worker": worker_label(worker_identity())}


def run_evaluate_cohort(model: str, reader: str, reader_args: dict[str, Any], out: str | os.PathLike,
                        methods: list[str], workers: int | None = None, scheduler: str | None = None,
                        weights: str | None = None, allow_unsafe_pickle: bool = False, options: dict | None = None,
                        families=(), steps: int = 20, baseline="zero", tolerance: float = 0.0,
                        randomisation_cases: int = 1, seed: int = 0, device=None, batch_size: int | None = None,
                        memory_budget: str | None = None, limit: int | None = None, title: str = "voxplain evaluation",
                        progress: bool = False, random_weights: bool = False,
                        sliding_window: dict[str, Any] | None = None, loaded=None,
                        say: Callable[[str], None] | None = None) -> CohortResult:
    """Score every case of a cohort on a Dask cluster and write the evaluation folder; see the module docstring.

    ``reader`` and ``reader_args`` name the cases (:data:`voxplain.evaluate.cohort.READERS`);
    ``limit`` takes the first that many. ``sliding_window`` (a dict of its settings)
    overrides a bundle's inferer; ``random_weights`` allows ``module:factory`` without
    weights. ``loaded``: the :class:`~voxplain.report.pipeline.LoadedModel` of ``model``
    when the caller has it already (not loaded again). Returns how it went.
    """
    from pathlib import Path

    from ..atomic import check_replaceable
    from ..evaluate.cohort import READERS
    from ..evaluate.output import write_evaluation
    from ..evaluate.runner import MetricsAccumulator, check_families, evaluation_settings
    from ..methods import create_methods
    from ..report.pipeline import load_model_spec

    say = say or (lambda text: None)
    out = Path(check_replaceable(out, "evaluate")).resolve()
    check_families(families)
    create_methods(methods, options)  # bad names and options fail before a cluster starts
    args = {k: (str(Path(v).resolve()) if k == "root" else v) for k, v in reader_args.items()}
    names = READERS[reader](**args).names[:limit]
    if not names:
        raise ValueError(f"no cases to evaluate in {reader_args.get('root')}")
    if loaded is None:
        loaded = load_model_spec(model, weights, allow_unsafe_pickle, random_weights)
    key = model_digest(loaded.model, None)
    del loaded  # the workers load their own
    job = EvaluateJob(shared_spec(model), key, reader, args, tuple(methods),
                      None if weights is None else str(Path(weights).resolve()), allow_unsafe_pickle,
                      dict(options or {}), tuple(families), steps, baseline, tolerance, seed, device, batch_size,
                      memory_budget, random_weights, sliding_window)
    randomise = "randomisation" in families and randomisation_cases > 0
    scored: dict[int, dict] = {}
    checked: dict[int, dict] = {}
    with open_cluster(workers, scheduler, say=say) as client:
        bar = CohortProgress(len(names), 0, enabled=progress)
        try:
            tag = f"{key[:8]}-{os.getpid()}-{time.time_ns()}"
            score_futures = {client.submit(evaluate_task, job, i, n, key=f"voxplain-evaluate-{i}-{tag}",
                                           retries=RETRIES, pure=False): i for i, n in enumerate(names)}
            by_index = {i: f for f, i in score_futures.items()}
            next_check = 0  # the next case to give the sanity checks, in the cohort's order

            def check(i: int):
                # ahead of the remaining cases: the checks are the longest tasks, started last they run alone
                return client.submit(randomise_task, job, i, names[i], by_index[i], priority=1,
                                     key=f"voxplain-randomise-{i}-{tag}", retries=RETRIES, pure=False)

            check_futures = {}
            while randomise and next_check < min(randomisation_cases, len(names)):
                check_futures[check(next_check)] = next_check
                next_check += 1
            futures = {**{f: ("score", i) for f, i in score_futures.items()},
                       **{f: ("check", i) for f, i in check_futures.items()}}
            pending = dict(futures)
            while pending:
                more = {}
                for (kind, i), outcome in collect(client, pending, bar):
                    if kind == "score":
                        if outcome["status"] == "done":
                            outcome["scores"].check_target = None  # the checks take it from the worker's copy
                        scored[i] = outcome
                        bar.finished(outcome["status"] == "done")
                    else:
                        checked[i] = outcome
                    if kind == "check" and outcome["status"] != "done" and next_check < len(names):
                        # a case meant for the sanity checks failed (its scores or its checks): the next case
                        # takes its place
                        more[check(next_check)] = ("check", next_check)
                        next_check += 1
                pending = more
        finally:
            bar.close()
    acc = MetricsAccumulator(methods)
    failures = []
    for i, name in enumerate(names):
        outcome = scored[i]
        if outcome["status"] == "done" and i in checked and checked[i]["status"] == "failed":
            outcome = checked[i]
        if outcome["status"] != "done":
            failures.append((name, outcome.get("worker") or "", outcome.get("reason", "")))
            continue
        checks = (checked[i]["checks"] if i in checked and checked[i]["status"] == "done"
                  and len(acc.randomisation) < randomisation_cases else None)
        acc.add(outcome["scores"], checks)
    settings = evaluation_settings(families, steps, baseline, tolerance, seed, randomisation_cases, options)
    if not acc.names:
        raise ValueError(f"every case failed ({failures[0][0]}: {failures[0][2]})")
    write_evaluation(acc.result(settings), out, title=title, failures=failures)
    write_failures(out / FAILURES_NAME, failures)  # added to the finished folder's marker
    return CohortResult(out, len(names), 0, failures)
