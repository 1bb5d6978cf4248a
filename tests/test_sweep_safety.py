"""The sweep leaves damaged storage alone, never runs code named in its storage, and says when it learnt nothing."""

from __future__ import annotations

import csv
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from voxplain.cli import main

ONE_CONFIG = ["--blocks", "1", "--batch-sizes", "8", "--learning-rates", "1e-3", "--epochs", "1",
              "--image-size", "16", "--quiet"]


def _images(root: Path, counts: dict[str, int], identical: bool = False) -> Path:
    rng = np.random.default_rng(0)
    same = rng.normal(80, 20, (16, 16))
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            img = same if identical else rng.normal(60, 20, (16, 16)) + (100 * (label == "b"))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-configuration sweep and its data."""
    root = tmp_path_factory.mktemp("sweep")
    data = _images(root / "images", {"a": 20, "b": 20})
    out = root / "sweep"
    assert main(["sweep", "--data", str(data), "--out", str(out), *ONE_CONFIG]) == 0
    return data, out


def _damage(db: Path, how: str) -> None:
    raw = db.read_bytes()
    if how == "empty":
        db.write_bytes(b"")
    elif how == "truncated":
        db.write_bytes(raw[: len(raw) // 3])
    elif how == "bad header":
        db.write_bytes(b"not SQLite at all" + raw[17:])
    elif how == "garbage":
        db.write_bytes(np.random.default_rng(1).integers(0, 256, len(raw), dtype=np.uint8).tobytes())
    elif how == "other database":
        db.unlink()
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE mine (x INTEGER)")
        con.commit()
        con.close()


@pytest.mark.parametrize("how", ["empty", "truncated", "bad header", "garbage", "other database"])
def test_a_damaged_storage_is_a_one_line_error_and_nothing_is_touched(finished, tmp_path, capsys, how):
    data, done = finished
    out = tmp_path / "sweep"
    shutil.copytree(done, out)
    _damage(out / "sweep.db", how)
    before = _snapshot(out)
    assert main(["sweep", "--data", str(data), "--out", str(out), *ONE_CONFIG]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep.db" in err[0], err
    assert _snapshot(out) == before


def test_a_checkpoint_path_from_the_storage_is_never_imported(finished, tmp_path, capsys):
    data, done = finished
    out = tmp_path / "sweep"
    shutil.copytree(done, out)
    flag = tmp_path / "evil-ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(flag)!r}, 'w').write('ran')\ndef build():\n    raise SystemExit('ran')\n")
    # someone with write access to the storage points the best trial at code, and its local copy is gone
    con = sqlite3.connect(out / "sweep.db")
    con.execute("UPDATE trial_user_attributes SET value_json = ? WHERE key = 'checkpoint'",
                (f'"{evil}:build"',))
    con.commit()
    con.close()
    shutil.rmtree(out / "trials")
    code = main(["sweep", "--data", str(data), "--out", str(out), *ONE_CONFIG, "--explain-best"])
    err = capsys.readouterr().err
    assert not flag.exists(), "code named in the storage was run"
    assert code == 2 and "not a voxplain checkpoint folder" in err, err


def test_a_sweep_that_learnt_nothing_says_so(tmp_path, capsys):
    # every image the same: any model predicts one class, at best the majority class's share
    data = _images(tmp_path / "images", {"a": 30, "b": 10}, identical=True)
    out = tmp_path / "sweep"
    assert main(["sweep", "--data", str(data), "--out", str(out), *ONE_CONFIG[:-1]]) == 0
    captured = capsys.readouterr()
    with open(out / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[0]["majority_baseline"]) == pytest.approx(0.75)
    assert rows[0]["beats_baseline"] == "False"
    assert "majority-class baseline 0.7500" in captured.out
    assert "does not beat the majority-class baseline" in captured.err


def test_majority_baseline_is_the_share_of_the_training_majority_class():
    import torch

    from voxplain.sweep.data import SweepData

    d = SweepData(torch.zeros(5, 1, 2, 2), torch.tensor([1, 1, 1, 0, 0]), torch.zeros(4, 1, 2, 2),
                  torch.tensor([0, 1, 0, 0]), ["a", "b"], ["grey"], "test")
    assert d.majority_baseline() == pytest.approx(0.25)
