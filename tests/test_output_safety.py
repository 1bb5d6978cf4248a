"""Output folders: voxplain replaces only what it wrote, and cleans up after Ctrl-C, SIGTERM and SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from voxplain.cli import main
from voxplain.models import build_model, save_checkpoint

METHODS = ["--methods", "vanilla_gradient", "--quiet"]
MARKER_NAME = ".voxplain-output.json"


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A tiny 2D checkpoint and a grey PNG it can explain."""
    root = tmp_path_factory.mktemp("safety")
    torch.manual_seed(0)
    save_checkpoint(build_model("cnn2d", in_channels=1, num_classes=2, blocks=2, base_width=4),
                    {"task": "classify", "class_names": ["a", "b"], "input_size": [16, 16]}, root / "cnn")
    png = root / "x.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)).save(png)
    return root / "cnn", png


def _explain(out: Path, cnn, capsys=None) -> tuple[int, str]:
    model, png = cnn
    code = main(["explain", "--model", str(model), "--input", str(png), *METHODS, "--out", str(out)])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_folder(path: Path, files: dict[str, str]) -> dict[str, bytes]:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return _snapshot(path)


# -- item 1: explain, inspect, demo, evaluate ------------------------------------------------------

@pytest.mark.parametrize("files", [
    {"index.html": "<html>my site</html>", "photo.jpg": "jpeg bytes", "notes.txt": "my notes"},
    {"summary.json": "{}", "results.csv": "a,b\n1,2\n"},
])
def test_explain_never_replaces_a_folder_voxplain_did_not_write(tmp_path, capsys, cnn, files):
    out = tmp_path / "website"
    before = _user_folder(out, files)
    code, err = _explain(out, cnn, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a voxplain output" in err, err
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["website"]  # no part folder left either


def test_a_rerun_replaces_its_own_output_but_not_files_added_to_it(tmp_path, capsys, cnn):
    out = tmp_path / "report"
    assert _explain(out, cnn, capsys)[0] == 0
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["kind"] == "explain" and "report.html" in marker["files"] and "summary.json" in marker["files"]
    assert _explain(out, cnn, capsys)[0] == 0  # its own earlier output: replaced
    (out / "my_notes.txt").write_text("added by the user")
    before = _snapshot(out)
    code, err = _explain(out, cnn, capsys)
    assert code == 2 and "my_notes.txt" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before
    # a file of the report edited by the user (another size) is not voxplain's any more either
    (out / "my_notes.txt").unlink()
    (out / "report.html").write_text("edited")
    code, err = _explain(out, cnn, capsys)
    assert code == 2 and "report.html" in err
    assert (out / "report.html").read_text() == "edited"


def test_explain_refuses_another_commands_output(tmp_path, capsys, cnn):
    model, _ = cnn
    before = _snapshot(model)
    code, err = _explain(model, cnn, capsys)  # --out pointing at the checkpoint by mistake
    assert code == 2 and "checkpoint" in err
    assert _snapshot(model) == before


def test_inspect_and_demo_and_evaluate_refuse_user_folders(tmp_path, capsys, cnn):
    model, png = cnn
    for argv in (["inspect", "--model", str(model), "--input", str(png), "--quiet"],
                 ["demo", "--preset", "tiny", "--quiet"],
                 ["evaluate", "--model", str(model), "--data", str(tmp_path), "--quiet"],
                 ["train", "--data", str(tmp_path), "--quiet"]):
        out = tmp_path / argv[0]
        before = _user_folder(out, {"index.html": "mine", "photo.jpg": "mine too"})
        start = time.monotonic()
        code = main([*argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "not a voxplain output" in err, (argv[0], err)
        assert time.monotonic() - start < 60, f"{argv[0]} refused only after doing its work"
        assert _snapshot(out) == before


# -- item 2: phantom ----------------------------------------------------------------------------

def test_phantom_never_deletes_user_files(tmp_path, capsys):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "notes.txt").write_text("notes")
    (out / "my_scan.nii.gz").write_bytes(b"\x1f\x8b not really")
    before = _snapshot(out)
    code = main(["phantom", "--out", str(out), "--subjects", "1", "--resolution", "3", "--quiet"])
    assert code == 2 and "not a voxplain output" in capsys.readouterr().err
    assert _snapshot(out) == before
    fresh = tmp_path / "fresh"
    assert main(["phantom", "--out", str(fresh), "--subjects", "1", "--resolution", "3", "--quiet"]) == 0
    assert json.loads((fresh / MARKER_NAME).read_text())["kind"] == "phantom"
    assert main(["phantom", "--out", str(fresh), "--subjects", "1", "--resolution", "3", "--quiet"]) == 0


# -- item 3: sweep --------------------------------------------------------------------------------

def test_sweep_never_touches_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "sweep"
    before = _user_folder(out, {"trials.csv": "my,own\n1,2\n", "best_model/mymodel.pt": "weights"})
    code = main(["sweep", "--quick", "--out", str(out), "--blocks", "1", "--batch-sizes", "8",
                 "--learning-rates", "1e-3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "not a voxplain output" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before


# -- the mechanism itself ----------------------------------------------------------------------------

def test_atomic_dir_marker_lists_every_file_and_nested_outputs_count(tmp_path):
    from voxplain.atomic import OutputFolderError, atomic_dir, check_replaceable

    dest = tmp_path / "out"
    with atomic_dir(dest, kind="test") as tmp:
        (tmp / "a.txt").write_text("a")
        with atomic_dir(tmp / "sub", kind="inner") as inner:
            (inner / "b.bin").write_bytes(b"bb")
    marker = json.loads((dest / MARKER_NAME).read_text())
    assert marker["files"] == {"a.txt": 1, "sub/.voxplain-output.json": marker["files"]["sub/.voxplain-output.json"],
                               "sub/b.bin": 2}
    assert check_replaceable(dest, "test") == dest
    with pytest.raises(OutputFolderError, match="inner output"):
        check_replaceable(dest / "sub", "other")
    (dest / "c.txt").write_text("user")
    with pytest.raises(OutputFolderError, match="c.txt"):
        check_replaceable(dest, "test")
    # an error inside leaves the old output as it was and no part folder
    (dest / "c.txt").unlink()
    before = _snapshot(dest)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(dest, kind="test") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert _snapshot(dest) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_files_added_while_working_stop_the_swap(tmp_path):
    from voxplain.atomic import OutputFolderError, atomic_dir

    dest = tmp_path / "out"
    with atomic_dir(dest, kind="test") as tmp:
        (tmp / "a.txt").write_text("a")
    with pytest.raises(OutputFolderError, match="late.txt"):
        with atomic_dir(dest, kind="test") as tmp:
            (tmp / "a.txt").write_text("new")
            (dest / "late.txt").write_text("the user saved this meanwhile")
    assert (dest / "late.txt").is_file() and (dest / "a.txt").read_text() == "a"


def test_claimed_folder_records_what_voxplain_writes_into_it(tmp_path):
    from voxplain.atomic import OutputFolderError, atomic_file, claim_folder

    folder = claim_folder(tmp_path / "grow", "sweep", expected=["db.sqlite"])
    (folder / "db.sqlite").write_bytes(b"x" * 10)
    with atomic_file(folder / "table.csv") as tmp:
        tmp.write_text("a,b\n")
    save_checkpoint(build_model("cnn2d", in_channels=1, num_classes=2, blocks=1, base_width=2),
                    {"task": "classify"}, folder / "trials" / "t1")
    (folder / "db.sqlite").write_bytes(b"x" * 99)  # a database changes size: listed without one
    assert claim_folder(folder, "sweep") == folder
    (folder / "trials" / "mine.pt").write_text("user")
    with pytest.raises(OutputFolderError, match="trials/mine.pt"):
        claim_folder(folder, "sweep")


# -- item 14: SIGTERM and SIGKILL ------------------------------------------------------------------

SLOW_MODEL = '''
import time, torch

class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        time.sleep(0.05)
        return self.conv(x).mean(dim=(2, 3))

def build():
    return Slow()
'''


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "voxplain", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_part(proc: subprocess.Popen, parent: Path, name: str, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = [p for p in parent.glob(f".{name}.*.part") if p.is_dir()]
        if parts:
            return parts[0]
        if proc.poll() is not None:
            pytest.fail(f"ended before it could be stopped: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no part folder appeared in time")


def _slow_explain(tmp_path: Path, out: str) -> list[str]:
    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL)
    png = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((12, 12)) * 255).astype(np.uint8)).save(png)
    return ["explain", "--model", "slowmodel.py:build", "--random-weights", "--input", str(png), "--methods",
            "integrated_gradients",
            "--option", "integrated_gradients.steps=2000", "--option", "integrated_gradients.rule=riemann_middle",
            "--batch-size", "1", "--quiet", "--out", out]


@pytest.mark.slow
def test_sigterm_of_explain_removes_its_part_folder(tmp_path):
    proc = _start(_slow_explain(tmp_path, "out"), tmp_path)
    _wait_for_part(proc, tmp_path, "out")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["voxplain: terminated"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slowmodel.py", "x.png"]


SWALLOWING_MODEL = '''
import signal
import torch
from torch import nn


class _Finaliser:
    def __del__(self):
        # the handler's exception is raised inside __del__, where Python prints and drops it
        signal.raise_signal(signal.SIGTERM)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fired = False

    def forward(self, x):
        if not self.fired:
            self.fired = True
            _Finaliser()
        return self.conv(x).mean((2, 3))


def build():
    return Model()
'''


def test_sigterm_swallowed_by_a_finaliser_still_stops_before_the_output_is_kept(tmp_path):
    (tmp_path / "swallow.py").write_text(SWALLOWING_MODEL)
    png = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((12, 12)) * 255).astype(np.uint8)).save(png)
    proc = _start(["explain", "--model", "swallow.py:build", "--random-weights", "--input", str(png),
                   "--methods", "vanilla_gradient", "--quiet", "--out", "out"], tmp_path)
    _, err = proc.communicate(timeout=120)
    assert "Exception ignored" in err  # the stop really was swallowed where it was raised ...
    assert proc.returncode == 143, err  # ... and still ended the command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swallow.py", "x.png"]


def test_a_recorded_stop_keeps_an_atomic_folder_out(tmp_path):
    from voxplain.atomic import atomic_dir
    from voxplain.interrupt import Terminated, clear_stop_request, request_stop

    try:
        with pytest.raises(Terminated):
            with atomic_dir(tmp_path / "out", kind="explain") as part:
                (part / "map.txt").write_text("half")
                try:
                    request_stop(signal.SIGTERM)
                except Terminated:
                    pass  # what a finaliser does with it
    finally:
        clear_stop_request()  # never leave the request to the tests that follow
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_of_demo_removes_its_part_folder(tmp_path):
    proc = _start(["demo", "--preset", "tiny", "--quiet", "--out", "demo"], tmp_path)
    _wait_for_part(proc, tmp_path, "demo")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_later_run_removes_the_part_folder_of_a_killed_run(tmp_path, cnn):
    proc = _start(_slow_explain(tmp_path, "out"), tmp_path)
    part = _wait_for_part(proc, tmp_path, "out")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert part.is_dir()  # SIGKILL cannot be handled: the part stays ...
    # ... a live process's part is never touched ...
    alive = tmp_path / ".out.live0000.part"
    alive.mkdir()
    (alive / ".voxplain-part.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    # ... nor a hidden folder voxplain did not make
    foreign = tmp_path / ".out.mine.part"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    model, png = cnn
    assert main(["explain", "--model", str(model), "--input", str(png), *METHODS, "--out",
                 str(tmp_path / "out")]) == 0
    assert not part.exists() and alive.is_dir() and (foreign / "keep.txt").is_file()
    assert (tmp_path / "out" / "report.html").is_file()
