"""``voxplain explain --workers N | --scheduler ADDRESS``: a folder of cases explained on a Dask cluster.

One task per case. A task gets paths (the case folder, its output folder) and the
run's settings, loads the model once per worker (:func:`~.cluster.cached_model`),
explains and writes the case with :func:`voxplain.report.pipeline.report_case` (the
same code as the single-process loop) into its own folder, atomically, and returns
a small dict. The cohort's folder is claimed as ``explain-cohort`` output and filled
over time; each case folder is an ``explain`` output of its own whose
``summary.json`` records the settings' fingerprint and the worker that made it.
Running the same command again skips complete cases and redoes the others.

Errors a case's input causes (an unreadable file, a model that refuses it) are
recorded as that case's failure and the others go on. Other errors (the machine,
the file system) are raised to Dask, which tries the case once more
(``retries``); a worker that dies mid-case has its case given to another worker
by the scheduler, and the half-written part folder it leaves is removed by the
next attempt.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import OutputFolderError, atomic_dir, check_replaceable, claim_folder
from ..host_heap import own_process_heap
from .cluster import cached_model, open_cluster, worker_identity, worker_label
from .index import CaseRow, write_cohort_index
from .progress import CohortProgress, collect
from .state import FAILURES_NAME, case_record, fingerprint, model_digest, one_line, write_failures

__all__ = ["ExplainJob", "CohortResult", "run_explain_cohort", "explain_task", "cohort_case_folders",
           "COHORT_KIND", "shared_spec"]

#: the kind named in the marker of a cohort's top folder (its case folders are ``explain`` outputs)
COHORT_KIND = "explain-cohort"
#: errors a case's own input causes: recorded as its failure, not retried
INPUT_ERRORS = (ValueError, TypeError, IndexError, KeyError, FileNotFoundError, OutputFolderError)
#: further tries Dask gives a case whose task raised anything else (the machine, the file system)
RETRIES = 1


@dataclass(frozen=True)
class ExplainJob:
    """What every case task needs; small, it travels with each task.

    ``model`` is the spec with its paths made absolute (workers start elsewhere);
    ``model_as_typed`` is recorded in the reports, as the single-process loop does.
    ``spacing``, ``pad_multiple`` and ``sliding_window`` are the command's overrides of the
    model's grid (:func:`voxplain.report.preparation.model_grid`), applied on each worker.
    """

    model: str
    model_as_typed: str
    model_key: str  # model_digest() of the model the client loaded
    fingerprint: str
    task: str
    target: str | None
    methods: tuple[str, ...]
    settings: dict[str, Any]
    weights: str | None = None
    allow_unsafe_pickle: bool = False
    output_key: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    device: Any = None
    seed: int = 0
    batch_size: int | None = None
    memory_budget: str | None = None
    region: str | None = None
    channels: int | None = None
    channels_from_4d: bool = False
    random_weights: bool = False
    spacing: Any = None
    pad_multiple: Any = None
    sliding_window: dict[str, Any] | None = None
    fold_batchnorm: bool = False


@dataclass
class CohortResult:
    """How a cohort run ended: its folder, the case count, and the failed cases with their reasons."""

    out: Path
    total: int
    resumed: int
    failures: list[tuple[str, str, str]]  # (case, worker, reason)

    @property
    def failed(self) -> int:
        """Cases that failed."""
        return len(self.failures)


def shared_spec(spec: str) -> str:
    """``spec`` with a local path in it made absolute, so that workers started elsewhere find it."""
    if Path(spec).exists():
        return str(Path(spec).resolve())
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py") and Path(head).is_file():
        return f"{Path(head).resolve()}:{tail}"
    return spec


def cohort_case_folders(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The case folders of a cohort input (one folder of BraTS-layout case folders), as absolute paths."""
    from ..data.brats import find_brats_cases

    paths = [Path(p) for p in inputs]
    if len(paths) != 1 or not paths[0].is_dir():
        raise ValueError("--workers and --scheduler spread the cases of one folder of cases over a cluster; "
                         f"got {' '.join(str(p) for p in paths)}")
    root = paths[0].resolve()
    folders = find_brats_cases(root)
    if folders == [root]:
        raise ValueError(f"{paths[0]} is a single case; --workers and --scheduler are for a folder of cases: "
                         "leave them out")
    if not folders:
        raise ValueError(f"{paths[0]} holds no case folders (NAME/NAME_t1/t1ce/t2/flair.nii.gz)")
    return folders


def _load_model(job: ExplainJob):
    from ..report.pipeline import load_model_spec

    loaded = load_model_spec(job.model, job.weights, job.allow_unsafe_pickle, job.random_weights)
    if model_digest(loaded.model, loaded.config) != job.model_key:
        raise ValueError(f"the model {job.model_as_typed} changed on disk since this cohort run started; run again")
    loaded.output_key = job.output_key
    loaded.spec = job.model_as_typed
    return loaded


def explain_task(job: ExplainJob, case_dir: str, dest: str) -> dict[str, Any]:
    """Explain the case in ``case_dir`` into its own folder ``dest`` (runs on a worker); returns its outcome."""
    from ..report.inputs import load_cases
    from ..report.pipeline import model_grid, report_case

    start = time.perf_counter()
    own_process_heap()
    if case_record(dest, "explain", job.fingerprint) is not None:
        # an earlier attempt finished it, then its worker died before saying so
        return {"status": "done", "worker": worker_label(worker_identity()), "seconds": 0.0}
    try:
        loaded, _ = cached_model((job.model_key, job.model, job.weights, job.output_key, job.random_weights),
                                 lambda: _load_model(job))
        grid = model_grid(loaded.config, loaded.bundle, job.spacing, job.pad_multiple, job.sliding_window)
        case = load_cases([case_dir], job.channels, job.channels_from_4d)[0]
        ident = worker_identity()
        settings = dict(job.settings, cohort={"fingerprint": job.fingerprint, "worker": ident})
        with atomic_dir(dest, kind="explain") as tmp:
            report_case(tmp, loaded, case, job.task, job.target, job.methods, settings, job.options, job.device,
                        job.seed, False, job.batch_size, job.memory_budget, job.region, grid, job.fold_batchnorm)
    except INPUT_ERRORS as err:
        return {"status": "failed", "reason": one_line(err), "worker": worker_label(worker_identity())}
    return {"status": "done", "worker": worker_label(ident), "seconds": round(time.perf_counter() - start, 3),
            "model_loads": ident["model_loads"]}


def _row(name: str, sub: str, record: dict) -> CaseRow:
    from ..report.prediction import prediction_line

    studies = record.get("studies") or [{}]
    worker = record.get("settings", {}).get("cohort", {}).get("worker", {})
    figures = record.get("figures") or []
    return CaseRow(name, "done", prediction_line(studies[0].get("prediction") or {}),
                   worker_label(worker) if worker else "", link=f"{sub}/report.html",
                   figure=f"{sub}/{figures[0]}" if figures else "")


def run_explain_cohort(model: str, inputs: Sequence[str], out: str | os.PathLike, task: str, target: str | None,
                       methods: Sequence[str], workers: int | None = None, scheduler: str | None = None,
                       weights: str | None = None, options: dict | None = None, device=None, seed: int = 0,
                       progress: bool = False, batch_size: int | None = None, memory_budget: str | None = None,
                       region: str | None = None, allow_unsafe_pickle: bool = False, channels: int | None = None,
                       command: str = "", output_key=None, channels_from_4d: bool = False,
                       spacing=None, pad_multiple=None, sliding_window: dict[str, Any] | None = None,
                       random_weights: bool = False, fold_batchnorm: bool = False,
                       say: Callable[[str], None] | None = None) -> CohortResult:
    """Explain every case of a folder of cases on a Dask cluster; see the module docstring.

    ``workers``: start a local cluster of that many processes; ``scheduler``: use the
    cluster at that address. The other arguments are those of
    :func:`voxplain.report.pipeline.run_explain` (``sliding_window`` as a dict of its
    settings). Returns how it went; failed cases are listed in the folder's
    ``index.html`` and ``failures.csv``.
    """
    from ..methods import create_method
    from ..report.pipeline import explain_settings, load_model_spec, model_grid
    from ..report.writer import unique_slugs

    say = say or (lambda text: None)
    out = Path(check_replaceable(out, COHORT_KIND)).resolve()
    for m in methods:  # a bad method name fails here, before a cluster starts
        create_method(m, (options or {}).get(m))
    folders = cohort_case_folders(inputs)
    loaded = load_model_spec(model, weights, allow_unsafe_pickle, random_weights)
    key = model_digest(loaded.model, loaded.config)
    grid = model_grid(loaded.config, loaded.bundle, spacing, pad_multiple, sliding_window)  # bad settings fail here
    settings = explain_settings(model, inputs, task, target, methods, weights, options, device, seed, command,
                                output_key, region, loaded, grid, fold_batchnorm)
    del loaded, grid  # the workers load their own
    fp = fingerprint(key, task=task, target=target, methods=list(methods), options=options or {}, seed=seed,
                     region=region, channels=channels, channels_from_4d=channels_from_4d, output_key=output_key,
                     model_grid=settings["model_grid"], random_weights=random_weights, fold_batchnorm=fold_batchnorm)
    job = ExplainJob(shared_spec(model), model, key, fp, task, target, tuple(methods), settings,
                     weights=None if weights is None else str(Path(weights).resolve()),
                     allow_unsafe_pickle=allow_unsafe_pickle, output_key=output_key, options=dict(options or {}),
                     device=device, seed=seed, batch_size=batch_size, memory_budget=memory_budget, region=region,
                     channels=channels, channels_from_4d=channels_from_4d, random_weights=random_weights,
                     spacing=spacing, pad_multiple=pad_multiple, sliding_window=sliding_window,
                     fold_batchnorm=fold_batchnorm)
    subs = unique_slugs([f.name for f in folders])
    todo = [i for i, sub in enumerate(subs) if case_record(out / sub, "explain", fp) is None]
    outcomes: dict[int, dict] = {}
    if not todo:
        claim_folder(out, COHORT_KIND)
    else:
        with open_cluster(workers, scheduler, say=say) as client:
            claim_folder(out, COHORT_KIND)  # once the cluster is there: an unreachable one leaves no folder
            bar = CohortProgress(len(folders), len(folders) - len(todo), enabled=progress)
            try:
                futures = {client.submit(explain_task, job, str(folders[i]), str(out / subs[i]),
                                         key=f"voxplain-explain-{subs[i]}-{fp[:8]}-{os.getpid()}-{time.time_ns()}",
                                         retries=RETRIES, pure=False): i for i in todo}
                for i, outcome in collect(client, futures, bar):
                    outcomes[i] = outcome
                    bar.finished(outcome["status"] == "done")
            finally:
                bar.close()
    rows, failures = [], []
    for i, (folder, sub) in enumerate(zip(folders, subs)):
        outcome = outcomes.get(i, {"status": "done"})
        record = case_record(out / sub, "explain", fp) if outcome["status"] == "done" else None
        if record is None:
            reason = outcome.get("reason") or "its output is missing or incomplete after the run"
            rows.append(CaseRow(folder.name, "failed", worker=outcome.get("worker", ""), reason=reason))
            failures.append((folder.name, outcome.get("worker", ""), reason))
        else:
            rows.append(_row(folder.name, sub, record))
    write_failures(out / FAILURES_NAME, failures)
    write_cohort_index(out / "index.html", rows, title=f"voxplain: {len(folders)} cases")
    return CohortResult(out, len(folders), len(folders) - len(todo), failures)
