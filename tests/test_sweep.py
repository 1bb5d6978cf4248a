"""CXAI stage 1 sweep: tiny grid end to end, SIGKILL mid-trial and resume, bad grids, PostgreSQL."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from voxplain.cli import main
from voxplain.sweep import SweepGrid

pytestmark = pytest.mark.slow

TINY_GRID = ["--blocks", "1", "2", "--batch-sizes", "8", "16", "--learning-rates", "1e-2", "1e-3"]


def _image_folder(root: Path, per_class: int = 40, size: int = 16, seed: int = 0) -> Path:
    """Two classes of grey PNGs: a bright square somewhere ("tumour") or only noise ("no_tumour")."""
    rng = np.random.default_rng(seed)
    for label in ("no_tumour", "tumour"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            img = rng.normal(60, 20, (size, size))
            if label == "tumour":
                r, c = rng.integers(2, size - 6, 2)
                img[r:r + 4, c:c + 4] += 120
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return root


def _sweep_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--data", str(data), "--out", str(out), *TINY_GRID, "--epochs", "1", "--image-size", "16",
            "--quiet", *extra]


def _complete_trials(db: Path) -> dict[int, tuple]:
    """trial id -> (number, value, datetime_complete) of every COMPLETE trial in the SQLite storage."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT t.trial_id, t.number, v.value, t.datetime_complete FROM trials t "
            "LEFT JOIN trial_values v ON v.trial_id = t.trial_id WHERE t.state = 'COMPLETE'").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        rows = []
    finally:
        con.close()
    return {r[0]: r[1:] for r in rows}


def _states(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute("SELECT state FROM trials")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _read_trials_csv(out: Path) -> list[dict]:
    with open(out / "trials.csv") as fh:
        return list(csv.DictReader(fh))


def test_tiny_grid_writes_all_outputs(tmp_path):
    data = _image_folder(tmp_path / "images")
    out = tmp_path / "sweep"
    assert main(_sweep_args(data, out)) == 0
    rows = _read_trials_csv(out)
    assert len(rows) == 8
    assert {(r["blocks"], r["batch_size"], float(r["learning_rate"])) for r in rows} == {
        (b, bs, lr) for b in ("1", "2") for bs in ("8", "16") for lr in (1e-2, 1e-3)}
    for r in rows:
        assert 0.0 <= float(r["best_val_accuracy"]) <= 1.0
        assert r["epochs"] == "1"
    for b in (1, 2):
        assert (out / f"accuracy_blocks{b}.png").stat().st_size > 1000
    assert (out / "summary.png").is_file()
    assert (out / "histories.json").is_file()
    best = out / "best_model"
    assert (best / "config.json").is_file()
    from voxplain.models import load_model

    model = load_model(best)
    assert sum(p.numel() for p in model.parameters()) > 0
    # running again on a finished sweep trains nothing and keeps every result
    before = _complete_trials(out / "sweep.db")
    assert main(_sweep_args(data, out)) == 0
    assert _complete_trials(out / "sweep.db") == before


def test_sigkill_mid_trial_then_resume_keeps_finished_trials(tmp_path):
    data = _image_folder(tmp_path / "images", per_class=150, size=32)
    out = tmp_path / "sweep"
    args = ["sweep", "--data", str(data), "--out", str(out), *TINY_GRID, "--epochs", "3", "--image-size", "32",
            "--quiet", "--stale-after", "2"]
    cmd = [sys.executable, "-m", "voxplain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    db = out / "sweep.db"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended before it could be killed: {proc.stdout.read().decode()[-2000:]}")
            if db.exists() and len(_complete_trials(db)) >= 2 and "RUNNING" in _states(db):
                break
            time.sleep(0.05)
        else:
            pytest.fail("no trial finished in time")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = _complete_trials(db)
    assert 2 <= len(finished) < 8
    assert "RUNNING" in _states(db), "the kill should have interrupted a trial"
    time.sleep(3)  # let the killed trial's heartbeat go stale
    assert main(args) == 0
    after = _complete_trials(db)
    for trial_id, record in finished.items():
        assert after[trial_id] == record, "a trial finished before the kill changed or was re-run"
    rows = _read_trials_csv(out)
    assert len(rows) == 8
    assert len({r["config"] for r in rows}) == 8
    # one COMPLETE trial per configuration in the storage itself
    assert len(after) == 8
    kept = {int(r["trial"]) for r in rows}
    numbers = {v[0] for v in finished.values()}
    assert numbers <= kept


@pytest.mark.parametrize("flag, values, message", [
    ("--blocks", ["0", "3"], "block"),
    ("--learning-rates", ["-0.001"], "learning rate"),
    ("--batch-sizes", ["1000"], "exceed the training set"),
    ("--batch-sizes", ["2.5"], "whole numbers"),
])
def test_bad_grid_values_fail_before_training(tmp_path, capsys, flag, values, message):
    data = _image_folder(tmp_path / "images", per_class=10)
    out = tmp_path / "sweep"
    args = ["sweep", "--data", str(data), "--out", str(out), "--epochs", "1", "--image-size", "16", "--quiet",
            flag, *values]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (out / "sweep.db").exists() and not (out / "trials").exists()


def test_grid_defaults_are_cxai_36():
    assert len(SweepGrid()) == 36
    with pytest.raises(ValueError, match="at least one"):
        SweepGrid(blocks=())


def test_resume_with_other_data_settings_is_refused(tmp_path, capsys):
    data = _image_folder(tmp_path / "images", per_class=10)
    out = tmp_path / "sweep"
    base = ["sweep", "--data", str(data), "--out", str(out), "--blocks", "1", "--batch-sizes", "4",
            "--learning-rates", "1e-3", "--epochs", "1", "--quiet"]
    assert main([*base, "--image-size", "16"]) == 0
    assert main([*base, "--image-size", "24"]) == 2
    assert "other data settings" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").exists() and (root / "pg_ctl").exists():
            return root
    return None


@pytest.fixture
def postgres_url(tmp_path):
    """A throw-away PostgreSQL server on loopback, run as the `postgres` system user."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package 'postgresql'); "
                    "`make test` installs them")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 not installed (test extra)")
    as_user = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without `runuser` to start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
    pgdir = Path("/tmp") / f"voxplain-pg-{os.getpid()}-{time.monotonic_ns()}"
    pgdir.mkdir(mode=0o777)
    os.chmod(pgdir, 0o777)
    datadir = pgdir / "data"
    port = _free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(datadir), "-w", "-l", str(pgdir / "log"),
                    "-o", f"-p {port} -k {pgdir} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "sweeps"], check=True, capture_output=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(pgdir, ignore_errors=True)


def test_two_machines_share_one_postgresql_storage(tmp_path, postgres_url):
    """Two independent sweep processes ('machines') on one PostgreSQL URL complete the grid once."""
    data = _image_folder(tmp_path / "images", per_class=30)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "voxplain", *_sweep_args(data, tmp_path / f"machine{i}",
                                                                             "--storage", postgres_url)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-3000:] for o in outputs)
    import optuna

    study = optuna.load_study(study_name="voxplain-cxai-sweep", storage=postgres_url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    keys = [(t.params["blocks"], t.params["batch_size"], t.params["learning_rate"]) for t in complete]
    assert len(keys) == 8 and len(set(keys)) == 8
    trained = [len(list((tmp_path / f"machine{i}" / "trials").glob("*"))) for i in range(2)]
    assert sum(trained) == 8
