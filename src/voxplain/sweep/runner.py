"""Run the grid with Optuna on an RDB storage, resumably, on one or many machines.

Every worker (a process here, or a process on another machine pointing at the
same PostgreSQL/MySQL URL) loops over: fail trials whose worker stopped sending
heartbeats, and re-queue them with the same grid point; then run one trial
if a grid point is unclaimed or a re-queued trial waits. A configuration is
done when it has one COMPLETE trial; finished trials are never re-run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ..models import build_model, save_checkpoint
from ..models.training import train
from .data import SweepData
from .grid import SweepGrid, config_key

__all__ = ["SweepSettings", "open_study", "run_sweep", "run_worker", "grid_status", "check_storage", "STUDY_NAME"]

STUDY_NAME = "voxplain-cxai-sweep"


@dataclass
class SweepSettings:
    """Everything a worker needs to run trials; JSON-friendly so it crosses process boundaries."""

    storage: str
    out: str
    data_file: str
    blocks: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    learning_rates: tuple[float, ...]
    epochs: int
    seed: int = 0
    heartbeat: int = 5
    stale_after: int = 30
    threads: int = 1
    progress: bool = False

    @property
    def grid(self) -> SweepGrid:
        return SweepGrid(self.blocks, self.batch_sizes, self.learning_rates)


def _quiet_optuna() -> None:
    """Heartbeats and stale-trial retries are marked experimental by Optuna; we rely on them knowingly."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _storage(settings: SweepSettings) -> RDBStorage:
    engine_kwargs = {}
    if settings.storage.startswith("sqlite"):
        # several local workers write to one SQLite file: wait for locks instead of failing
        engine_kwargs = {"connect_args": {"timeout": 120}}
    return RDBStorage(
        settings.storage,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=settings.heartbeat,
        grace_period=settings.stale_after,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=None),
    )


_SQLITE_HEADER = b"SQLite format 3\x00"


def check_storage(url: str) -> None:
    """Refuse an SQLite storage file that exists but cannot be a sweep's: empty, corrupt or another database.

    Optuna would silently start over on an empty file (retraining every trial over
    the finished ones' checkpoints) and fail with a long traceback on a corrupt one;
    both are left untouched with a one-line error naming the file.
    """
    import sqlite3

    if not url.startswith("sqlite:///"):
        return
    path = Path(url[len("sqlite:///"):])
    if not path.exists():
        return
    advice = ("it is left as it is: restore it from a backup, or move it away to start the sweep over "
              "(every trial is then trained again)")
    if not path.is_file():
        raise ValueError(f"sweep storage {path} is not a file; {advice}")
    if path.stat().st_size == 0:
        raise ValueError(f"sweep storage {path} is empty (0 bytes), so the finished trials are lost from it; {advice}")
    with open(path, "rb") as f:
        header = f.read(len(_SQLITE_HEADER))
    if header != _SQLITE_HEADER:
        raise ValueError(f"sweep storage {path} is not an SQLite database (bad header); {advice}")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=120)  # workers may hold a write lock
        try:
            check = con.execute("PRAGMA quick_check").fetchone()
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as err:
        raise ValueError(f"sweep storage {path} is corrupt ({err}); {advice}") from None
    if not check or check[0] != "ok":
        raise ValueError(f"sweep storage {path} is corrupt (integrity check: {check[0] if check else 'none'}); "
                         f"{advice}")
    if tables and not {"studies", "trials"} <= tables:
        raise ValueError(f"sweep storage {path} is an SQLite database but not an Optuna storage (tables: "
                         f"{', '.join(sorted(tables)[:5])}); {advice}")


def open_study(settings: SweepSettings, attempts: int = 6) -> optuna.Study:
    """Create or load the sweep's study (maximising best validation accuracy) on a grid sampler.

    Workers on several machines may start together; the one that loses the race to
    create the tables or the study sees an integrity error, and simply tries again.
    """
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    _quiet_optuna()
    for attempt in range(attempts):
        try:
            sampler = optuna.samplers.GridSampler(settings.grid.search_space, seed=settings.seed)
            return optuna.create_study(study_name=STUDY_NAME, storage=_storage(settings), sampler=sampler,
                                       direction="maximize", load_if_exists=True)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def grid_status(study: optuna.Study, grid: SweepGrid) -> dict[str, list]:
    """Configuration keys by state.

    ``complete``: has a COMPLETE trial; ``missing``: has none; among the missing,
    ``running`` / ``waiting``: a trial is running / queued; ``orphaned``: only failed or
    pruned trials, which the grid sampler will not pick again.
    """
    complete, running, waiting, ended = set(), set(), set(), set()
    for t in study.get_trials(deepcopy=False):
        key = config_key(t.params)
        if key is None:
            continue
        if t.state == TrialState.COMPLETE:
            complete.add(key)
        elif t.state == TrialState.RUNNING:
            running.add(key)
        elif t.state == TrialState.WAITING:
            waiting.add(key)
        else:  # FAIL or PRUNED: the grid sampler counts the point as visited
            ended.add(key)
    keys = [config_key(c) for c in grid.configurations()]
    missing = [k for k in keys if k not in complete]
    return {"complete": [k for k in keys if k in complete],
            "running": [k for k in missing if k in running],
            "waiting": [k for k in missing if k in waiting],
            "orphaned": [k for k in missing if k in ended and k not in running and k not in waiting],
            "missing": missing}


class _Objective:
    """Train one configuration; record per-epoch history on the trial; keep its checkpoint."""

    def __init__(self, settings: SweepSettings, data: SweepData):
        self.settings = settings
        self.data = data

    def __call__(self, trial: optuna.Trial) -> float:
        grid = self.settings.grid
        config = {
            "blocks": trial.suggest_categorical("blocks", list(grid.blocks)),
            "batch_size": trial.suggest_categorical("batch_size", list(grid.batch_sizes)),
            "learning_rate": trial.suggest_categorical("learning_rate", list(grid.learning_rates)),
        }
        key = config_key(config)
        # Two workers can draw the same point at once: the earlier trial keeps it.
        taken = [t for t in trial.study.get_trials(deepcopy=False)
                 if t.number != trial.number and config_key(t.params) == key
                 and (t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < trial.number))]
        if taken:
            raise optuna.TrialPruned(f"{key} already taken by trial {taken[0].number}")
        trial.set_user_attr("config_key", key)
        torch.manual_seed(self.settings.seed)
        model = build_model("cnn2d", in_channels=self.data.channels, num_classes=len(self.data.class_names),
                            blocks=config["blocks"], image_size=self.data.image_size)
        history: list[dict] = []

        def on_epoch_end(record: dict) -> None:
            history.append(record)
            trial.set_user_attr("history", history)
            trial.report(record["val_accuracy"], record["epoch"])

        start = time.perf_counter()
        try:
            train(model, self.data.train_dataset(), self.data.val_dataset(), task="classify",
                  epochs=self.settings.epochs, batch_size=config["batch_size"], lr=config["learning_rate"],
                  seed=self.settings.seed, progress=self.settings.progress, on_epoch_end=on_epoch_end,
                  keep="best")
        except RuntimeError as err:
            if "diverged" not in str(err):
                raise
            # a learning rate too high for this depth is a result of the sweep, not a crash
            trial.set_user_attr("diverged", str(err))
        trial.set_user_attr("seconds", time.perf_counter() - start)
        checkpoint = Path(self.settings.out).resolve() / "trials" / key
        save_checkpoint(model, {"task": "classify", "class_names": self.data.class_names,
                                "channel_names": self.data.channel_names,
                                "input_size": [self.data.image_size, self.data.image_size],
                                "sweep": {**config, "trial": trial.number}},
                        checkpoint, history=history)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("checkpoint", str(checkpoint))
        return max((r["val_accuracy"] for r in history), default=0.0)


def run_worker(settings: SweepSettings, callbacks=()) -> None:
    """Run trials until every configuration of the grid has a COMPLETE trial.

    ``callbacks`` are Optuna trial callbacks ``(study, frozen_trial)`` run after each trial.
    """
    torch.set_num_threads(max(1, settings.threads))
    _quiet_optuna()
    data = SweepData.load(settings.data_file)
    study = open_study(settings)
    objective = _Objective(settings, data)
    grid = settings.grid
    while True:
        optuna.storages.fail_stale_trials(study)
        status = grid_status(study, grid)
        if not status["missing"]:
            return
        for key in status["orphaned"]:  # e.g. a trial that raised: queue it again with the same point
            study.enqueue_trial(next(c for c in grid.configurations() if config_key(c) == key))
        unclaimed = [k for k in status["missing"] if k not in status["running"]]
        if not unclaimed:  # the rest are being trained by live workers: wait for them (or for them to go stale)
            time.sleep(settings.heartbeat)
            continue
        study.optimize(objective, n_trials=1, catch=(), callbacks=list(callbacks))


def _worker_entry(settings_dict: dict) -> None:
    run_worker(SweepSettings(**settings_dict))


def run_sweep(settings: SweepSettings, workers: int = 1, progress_bar=None) -> optuna.Study:
    """Run the grid with ``workers`` local processes (1: in this process); returns the study.

    ``progress_bar`` (a tqdm) is advanced as configurations complete.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    check_storage(settings.storage)
    study = open_study(settings)  # creates the study once, before workers race to do it
    total = len(settings.grid)
    done_before = len(grid_status(study, settings.grid)["complete"])
    if progress_bar is not None:
        progress_bar.reset(total=total)
        progress_bar.update(done_before)
    if workers == 1:
        def advance(study_, trial) -> None:
            if progress_bar is not None and trial.state == TrialState.COMPLETE:
                progress_bar.update(1)

        run_worker(settings, callbacks=[advance])
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_entry, args=({**asdict(settings), "threads": threads},), daemon=False)
                 for _ in range(workers)]
        for p in procs:
            p.start()
        try:
            seen = done_before
            while any(p.is_alive() for p in procs):
                time.sleep(1.0)
                if progress_bar is not None:
                    now = len(grid_status(study, settings.grid)["complete"])
                    progress_bar.update(now - seen)
                    seen = now
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
        failed = [p.exitcode for p in procs if p.exitcode]
        if failed:
            raise RuntimeError(f"{len(failed)} sweep worker(s) failed (exit codes {failed}); "
                               "re-run the same command to resume")
    if progress_bar is not None:
        progress_bar.n = len(grid_status(study, settings.grid)["complete"])
        progress_bar.refresh()
    return study
