"""The fault and bad-input probe of issue 13, rerunnable: every bad input gets one line, no traceback, no loss.

Each probe sets up user files under ``user/`` (a snapshot is taken before and
after), runs a command (in this process, or as a subprocess for signals) or an
API call, and is counted as

* answered in one line: an expected refusal that exited 2 with exactly one line
  on stderr (API: raised a ValueError/TypeError/FileNotFoundError with a message);
* right: an input that should work and did, with its result checked;
* a traceback: anything escaping the command or a multi-line error;
* files lost: user files missing or changed afterwards.

Run ``python tests/test_bad_input_probe.py`` for the table; the test asserts
0 tracebacks, 0 files lost and every probe as expected.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import voxplain
from voxplain.cli import main
from test_input_safety import MODALITIES, SHAPE, write_case
from voxplain.models import build_model, save_checkpoint

FAST = ["--methods", "vanilla_gradient", "--quiet"]


@dataclass
class Outcome:
    code: int | None  # exit code (None: an exception escaped)
    err: str
    out: str = ""
    escaped: str = ""  # traceback of an exception that escaped


@dataclass
class Probe:
    item: str
    name: str
    expect: str  # "error" (one-line refusal) or "ok"
    run: Callable[[Path, dict], Outcome]
    check: Callable[[Path, Outcome], str | None] | None = None  # extra condition; returns what is wrong


PROBES: list[Probe] = []


def probe(item: str, name: str, expect: str = "error", check=None):
    def register(fn):
        PROBES.append(Probe(item, name, expect, fn, check))
        return fn
    return register


# -- helpers ------------------------------------------------------------------------------------------

#: the probe being run: its user folder and the snapshot taken right before its (last) command
_CURRENT: dict = {}


def _before_command() -> None:
    if "user" in _CURRENT:
        _CURRENT["before"] = snapshot(_CURRENT["user"])


def cli(*argv, cwd: Path | None = None) -> Outcome:
    _before_command()
    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        return Outcome(code, err.getvalue(), out.getvalue())
    except SystemExit as exc:  # argparse
        return Outcome(exc.code if isinstance(exc.code, int) else 2, err.getvalue(), out.getvalue())
    except ProbeTimeout:
        raise
    except BaseException:  # noqa: BLE001 - the probe counts it
        return Outcome(None, err.getvalue(), out.getvalue(), traceback.format_exc())
    finally:
        os.chdir(old)


def api(fn: Callable[[], object]) -> Outcome:
    _before_command()
    try:
        fn()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        return Outcome(2, f"{type(exc).__name__}: {' '.join(str(exc).split())}\n")
    except ProbeTimeout:
        raise
    except BaseException:  # noqa: BLE001
        return Outcome(None, "", escaped=traceback.format_exc())
    return Outcome(0, "")


def subprocess_cli(argv: list[str], cwd: Path, stop: Callable[[subprocess.Popen], None]) -> Outcome:
    _before_command()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "voxplain", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stop(proc)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    return Outcome(proc.returncode, err, out, escaped=err if "Traceback" in err else "")


def wait_for_part(proc: subprocess.Popen, parent: Path, name: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(parent.glob(f".{name}.*.part")):
            time.sleep(0.3)
            return
        time.sleep(0.05)


def write_png(path: Path, size=(16, 16), sixteen: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    values = (rng.random(size) * (65535 if sixteen else 255)).astype(np.uint16 if sixteen else np.uint8)
    Image.fromarray(values).save(path)
    return path


def user_files(tmp: Path, files: dict[str, str | bytes], folder: str = "user") -> Path:
    root = tmp / folder
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def module_file(tmp: Path, name: str, body: str) -> str:
    (tmp / f"{name}.py").write_text("import torch\nfrom torch import nn\n" + body)
    return f"{tmp / name}.py:build"


# -- shared models -------------------------------------------------------------------------------

def make_models(root: Path) -> dict:
    torch.manual_seed(0)
    models = {}
    models["cnn"] = save_checkpoint(build_model("cnn2d", in_channels=1, num_classes=2, blocks=2, base_width=4),
                                    {"task": "classify", "class_names": ["a", "b"], "input_size": [16, 16]},
                                    root / "cnn")
    models["grade"] = save_checkpoint(build_model("classifier3d", in_channels=4, num_classes=2, blocks=1,
                                                  base_width=2), {"task": "classify"}, root / "grade")
    models["unet"] = save_checkpoint(build_model("unet3d", in_channels=4, out_channels=3, channels=[4, 8],
                                                 num_res_units=0),
                                     {"task": "segment", "region_names": ["TC", "WT", "ET"],
                                      "output": "sigmoid regions"}, root / "unet")
    models["png"] = write_png(root / "x.png")
    for label in ("a", "b"):  # a 2D image folder, one sub-folder per class
        for i in range(6):
            write_png(root / "images" / label / f"{i}.png")
    models["images"] = root / "images"
    models["case"] = write_case(root / "cases", "CASE")
    return models


def finished_sweep(root: Path) -> tuple[Path, Path]:
    images = root / "sweep-images"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for i in range(16):
            img = rng.normal(80, 20, (16, 16)) + 100 * (label == "b")
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(images / label / f"{i}.png")
    out = root / "sweep-done"
    code = cli("sweep", "--data", images, "--out", out, *SWEEP_ONE)
    assert code.code == 0, code.err
    return images, out


SWEEP_ONE = ["--blocks", "1", "--batch-sizes", "8", "--learning-rates", "1e-3", "--epochs", "1",
             "--image-size", "16", "--quiet"]


# -- items 1-3: output folders ------------------------------------------------------------------------

@probe("13.1", "explain --out a website folder")
def _(tmp, m):
    out = user_files(tmp, {"index.html": "<html/>", "photo.jpg": b"\xff\xd8", "notes.txt": "notes"})
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--out", out)


@probe("13.1", "explain --out a folder with summary.json and results.csv")
def _(tmp, m):
    out = user_files(tmp, {"summary.json": "{}", "results.csv": "a\n1\n"})
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--out", out)


def _earlier_report_then(name: str, text: str):
    def run(tmp, m):
        out = tmp / "user" / "report"
        assert cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--out", out).code == 0
        (out / name).write_text(text)
        return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--out", out)
    return run


probe("13.1", "explain --out an earlier report plus a user file")(_earlier_report_then("my_notes.txt", "mine"))
probe("13.1", "explain --out an earlier report with report.html edited")(_earlier_report_then("report.html", "edit"))


@probe("13.1", "explain --out the checkpoint folder")
def _(tmp, m):
    model = tmp / "user" / "ckpt"
    shutil.copytree(m["cnn"], model)
    return cli("explain", "--model", model, "--input", m["png"], *FAST, "--out", model)


@probe("13.1", "explain --out its own earlier report", expect="ok",
       check=lambda tmp, o: None if (tmp / "out" / "report.html").is_file() else "no report")
def _(tmp, m):
    for _ in range(2):
        code = cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--out", tmp / "out")
    return code


@probe("13.1", "inspect --out a user folder")
def _(tmp, m):
    out = user_files(tmp, {"index.html": "x", "a.txt": "y"})
    return cli("inspect", "--model", m["cnn"], "--input", m["png"], "--quiet", "--out", out)


@probe("13.1", "demo --out a user folder")
def _(tmp, m):
    return cli("demo", "--preset", "tiny", "--quiet", "--out", user_files(tmp, {"index.html": "x", "b.jpg": "y"}))


@probe("13.1", "evaluate --out a user folder")
def _(tmp, m):
    out = user_files(tmp, {"metrics.json": "{}", "mine.txt": "y"})
    return cli("evaluate", "--model", m["cnn"], "--data", m["images"], "--methods", "vanilla_gradient", "--metrics",
               "complexity", "--randomisation-cases", "0", "--quiet", "--out", out)


@probe("13.1", "train --out a user folder")
def _(tmp, m):
    out = user_files(tmp, {"model.pt": b"mine", "config.json": "{}"})
    return cli("train", "--data", m["images"], "--epochs", "1", "--size", "16", "--quiet", "--out", out)


@probe("13.1", "explain --out an existing file")
def _(tmp, m):
    out = user_files(tmp, {"out": "a file"}) / "out"
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--out", out)


@probe("13.2", "phantom --out a folder with notes.txt and a NIfTI")
def _(tmp, m):
    out = user_files(tmp, {"notes.txt": "n", "scan.nii.gz": b"\x1f\x8b"})
    return cli("phantom", "--out", out, "--subjects", "1", "--resolution", "3", "--quiet")


@probe("13.3", "sweep --out a folder with trials.csv and best_model/mymodel.pt")
def _(tmp, m):
    out = user_files(tmp, {"trials.csv": "mine", "best_model/mymodel.pt": b"w"})
    return cli("sweep", "--quick", "--out", out, *SWEEP_ONE)


@probe("13.3", "sweep resume with a user file added to trials/")
def _(tmp, m):
    images, done = m["sweep"]
    out = tmp / "user" / "sweep"
    shutil.copytree(done, out)
    (out / "trials" / "mine.pt").write_text("mine")
    return cli("sweep", "--data", images, "--out", out, *SWEEP_ONE)


# -- item 4: damaged storage ------------------------------------------------------------------------

def _damaged(how: str):
    def run(tmp, m):
        images, done = m["sweep"]
        out = tmp / "user" / "sweep"
        shutil.copytree(done, out)
        db = out / "sweep.db"
        raw = db.read_bytes()
        db.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 3], "bad header": b"x" * 16 + raw[16:],
                        "garbage": os.urandom(len(raw))}[how])
        return cli("sweep", "--data", images, "--out", out, *SWEEP_ONE)
    return run


for _how in ("empty", "truncated", "bad header", "garbage"):
    probe("13.4", f"sweep.db {_how}")(_damaged(_how))


# -- item 5: code named in storage -------------------------------------------------------------------

def _evil_storage(value: str | None, remove_trials: bool = True):
    def run(tmp, m):
        images, done = m["sweep"]
        out = tmp / "sweep"  # voxplain's own folder: it may update its files; what must not happen is the code
        shutil.copytree(done, out)
        flag = tmp / "evil-ran"
        (tmp / "evil.py").write_text(f"open({str(flag)!r}, 'w').write('ran')\ndef build():\n    pass\n")
        con = sqlite3.connect(out / "sweep.db")
        con.execute("UPDATE trial_user_attributes SET value_json = ? WHERE key = 'checkpoint'",
                    (json.dumps(value.format(tmp=tmp)),))
        con.commit()
        con.close()
        if remove_trials:
            shutil.rmtree(out / "trials")
        return cli("sweep", "--data", images, "--out", out, *SWEEP_ONE, "--explain-best")
    return run


def _evil_not_run(tmp, o):
    return "evil.py ran" if (tmp / "evil-ran").exists() else None


probe("13.5", "storage checkpoint = evil.py:build", check=_evil_not_run)(_evil_storage("{tmp}/evil.py:build"))
probe("13.5", "storage checkpoint = os:getcwd", check=_evil_not_run)(_evil_storage("os:getcwd"))
probe("13.5", "storage checkpoint = a file", check=_evil_not_run)(_evil_storage("{tmp}/evil.py"))


# -- item 6: pickles and what runs code ------------------------------------------------------------

@probe("13.6", "a whole pickled model", check=lambda tmp, o: "safer" in o.err and "TorchScript" in o.err
       and "still recommends TorchScript" or None)
def _(tmp, m):
    torch.save(nn_linear(), tmp / "whole.pt")
    return cli("explain", "--model", tmp / "whole.pt", "--input", m["png"], *FAST, "--out", tmp / "o")


def nn_linear():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2 * 14 * 14, 2))


@probe("13.6", "a state_dict given as the model")
def _(tmp, m):
    torch.save(nn_linear().state_dict(), tmp / "weights.pt")
    return cli("explain", "--model", tmp / "weights.pt", "--input", m["png"], *FAST, "--out", tmp / "o")


# -- item 7: 16-bit images ---------------------------------------------------------------------------

def _deep_check(tmp, o):
    data = json.loads((tmp / "o" / "summary.json").read_text())
    return None if data["studies"] else "no study"


@probe("13.7", "16-bit PNG", expect="ok", check=_deep_check)
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", write_png(tmp / "deep.png", sixteen=True), *FAST,
               "--out", tmp / "o")


@probe("13.7", "16-bit PNG read at full depth (API)", expect="ok")
def _(tmp, m):
    from voxplain.report.inputs import load_cases

    def run():
        image = load_cases([write_png(tmp / "deep.png", (64, 64), sixteen=True)])[0].image
        assert len(np.unique(image)) > 256, "clipped to 8 bits"
    return api(run)


@probe("13.7", "16-bit TIFF", expect="ok", check=_deep_check)
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", write_png(tmp / "deep.tif", sixteen=True), *FAST,
               "--out", tmp / "o")


@probe("13.7", "a PNG that is not an image")
def _(tmp, m):
    (tmp / "bad.png").write_bytes(b"\x89PNG not really")
    return cli("explain", "--model", m["cnn"], "--input", tmp / "bad.png", *FAST, "--out", tmp / "o")


# -- item 8: grids -----------------------------------------------------------------------------------

_SHIFT = np.eye(4)
_SHIFT[:3, 3] = [5, 0, 0]


@probe("13.8", "case folder, flair 5 mm off")
def _(tmp, m):
    return cli("explain", "--model", m["grade"], "--input", write_case(tmp, "OFF", {"flair": _SHIFT}), *FAST,
               "--out", tmp / "o")


@probe("13.8", "separate NIfTI files, flair 5 mm off")
def _(tmp, m):
    case = write_case(tmp, "OFF", {"flair": _SHIFT})
    return cli("explain", "--model", m["grade"], "--input", *[case / f"OFF_{x}.nii.gz" for x in MODALITIES],
               *FAST, "--out", tmp / "o")


@probe("13.8", "case folder, flair stored LPS on the same grid", expect="ok")
def _(tmp, m):
    return cli("explain", "--model", m["grade"], "--input", write_case(tmp, "LPS", flipped=("flair",)), *FAST,
               "--out", tmp / "o")


@probe("13.8", "case folder, t2 of another shape")
def _(tmp, m):
    case = write_case(tmp, "SHAPE")
    nib.save(nib.Nifti1Image(np.ones((12, 14, 11), np.float32), np.eye(4)), case / "SHAPE_t2.nii.gz")
    return cli("explain", "--model", m["grade"], "--input", case, *FAST, "--out", tmp / "o")


@probe("13.8", "case folder with a NaN voxel")
def _(tmp, m):
    return cli("explain", "--model", m["grade"], "--input", write_case(tmp, "NAN", nan=True), *FAST,
               "--out", tmp / "o")


# -- item 9: names -----------------------------------------------------------------------------------

def _distinct_rows(tmp, o):
    import re

    links = re.findall(r'href="([^"]+)"', (tmp / "o" / "index.html").read_text())
    return None if len(set(links)) == len(links) == 2 else f"index links {links}"


@probe("13.9", "cases 'Case 1' and 'case_1'", expect="ok", check=_distinct_rows)
def _(tmp, m):
    write_case(tmp / "cases", "Case 1")
    write_case(tmp / "cases", "case_1", seed=1)
    return cli("explain", "--model", m["grade"], "--input", tmp / "cases", *FAST, "--out", tmp / "o")


# -- items 10-12: empty lists, budgets, absurd options ----------------------------------------------

@probe("13.10", "API methods=[]")
def _(tmp, m):
    return api(lambda: voxplain.explain(nn_linear(), torch.rand(1, 1, 16, 16), 0, methods=[]))


@probe("13.10", "CLI --methods ''")
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", m["png"], "--methods", "", "--quiet", "--out", tmp / "o")


@probe("13.10", "API memory_budget='1KB'")
def _(tmp, m):
    return api(lambda: voxplain.explain(nn_linear(), torch.rand(1, 1, 16, 16), 0, ["vanilla_gradient"],
                                        memory_budget="1KB"))


@probe("13.10", "CLI --memory-budget 1KB")
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--memory-budget", "1KB",
               "--out", tmp / "o")


@probe("13.10", "CLI --memory-budget lots")
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--memory-budget", "lots",
               "--out", tmp / "o")


@probe("13.11", "a row larger than the budget (3D U-Net, 4x48^3, 8MB)")
def _(tmp, m):
    model = voxplain.models.load_model(m["unet"])
    return api(lambda: voxplain.explain(model, torch.zeros(1, 4, 48, 48, 48), voxplain.SegmentationTarget(0),
                                        ["vanilla_gradient"], memory_budget="8MB"))


@probe("13.11", "CLI a case larger than --memory-budget")
def _(tmp, m):
    return cli("explain", "--model", m["unet"], "--input", m["case"], *FAST, "--memory-budget", "64KB",
               "--out", tmp / "o")


for _rule in ("riemann_trapezoid", "gausslegendre"):
    probe("13.12", f"integrated_gradients.steps=1e9 ({_rule})")(
        lambda tmp, m, rule=_rule: cli("explain", "--model", m["cnn"], "--input", m["png"], "--quiet", "--methods",
                                       "integrated_gradients", "--option", "integrated_gradients.steps=1000000000",
                                       "--option", f"integrated_gradients.rule={rule}", "--out", tmp / "o"))

for _method, _option in (("smoothgrad", "samples"), ("guided_ig", "steps"), ("blur_ig", "steps"),
                         ("xrai", "steps")):
    probe("13.12", f"{_method}.{_option}=1e9")(
        lambda tmp, m, method=_method, option=_option: cli(
            "explain", "--model", m["cnn"], "--input", m["png"], "--quiet", "--methods", method,
            "--option", f"{method}.{option}=1000000000", "--out", tmp / "o"))


@probe("13.12", "integrated_gradients.steps=-3")
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", m["png"], "--quiet", "--methods", "integrated_gradients",
               "--option", "integrated_gradients.steps=-3", "--out", tmp / "o")


@probe("13.12", "--option without a method")
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--option", "steps=3", "--out", tmp / "o")


@probe("13.12", "--option with an unknown name")
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--option",
               "vanilla_gradient.colour=red", "--out", tmp / "o")


# -- item 13: hostile names ----------------------------------------------------------------------

def _no_angle_in_json(tmp, o):
    page = (tmp / "o" / "report.html").read_text()
    start = page.index('id="voxplain-data">') + len('id="voxplain-data">')
    body = page[start:page.index("</script>", start)]
    return "'<' in the embedded JSON" if "<" in body else None


@probe("13.13", "case named <!--<script>", expect="ok", check=_no_angle_in_json)
def _(tmp, m):
    return cli("explain", "--model", m["grade"], "--input", write_case(tmp, "<!--<script>"), *FAST,
               "--out", tmp / "o")


@probe("13.13", "class named </script><!--", expect="ok", check=_no_angle_in_json)
def _(tmp, m):
    torch.manual_seed(0)
    save_checkpoint(build_model("cnn2d", in_channels=1, num_classes=2, blocks=1, base_width=2),
                    {"task": "classify", "class_names": ["</script><!--", "<b>&"], "input_size": [16, 16]},
                    tmp / "named")
    return cli("explain", "--model", tmp / "named", "--input", m["png"], *FAST, "--out", tmp / "o")


# -- item 14: signals -----------------------------------------------------------------------------------

def _slow(tmp: Path) -> list[str]:
    model = module_file(tmp, "slow", "import time\nclass S(nn.Module):\n    def __init__(self):\n"
                        "        super().__init__()\n        self.c = nn.Conv2d(1, 2, 3, padding=1)\n"
                        "    def forward(self, x):\n        time.sleep(0.05)\n"
                        "        return self.c(x).mean(dim=(2, 3))\ndef build():\n    return S()\n")
    write_png(tmp / "s.png")
    return ["explain", "--model", model, "--random-weights", "--input", str(tmp / "s.png"), "--methods",
            "integrated_gradients",
            "--option", "integrated_gradients.steps=2000", "--option", "integrated_gradients.rule=riemann_middle",
            "--batch-size", "1", "--quiet", "--out", "o"]


def _no_parts(tmp, o):
    left = [p.name for p in tmp.iterdir() if p.name.startswith(".o.") or p.name == "o"]
    return f"left behind: {left}" if left else None


def _term(proc_dir):
    def stop(proc):
        wait_for_part(proc, proc_dir, "o")
        proc.send_signal(signal.SIGTERM)
    return stop


@probe("13.14", "SIGTERM during explain", expect="terminated", check=_no_parts)
def _(tmp, m):
    return subprocess_cli(_slow(tmp), tmp, _term(tmp))


@probe("13.14", "SIGTERM during demo", expect="terminated", check=_no_parts)
def _(tmp, m):
    return subprocess_cli(["demo", "--preset", "tiny", "--quiet", "--out", "o"], tmp, _term(tmp))


def _rerun_cleaned(tmp, o):
    left = [p.name for p in tmp.glob(".o.*")]
    return f"left behind: {left}" if left or not (tmp / "o" / "report.html").is_file() else None


@probe("13.14", "SIGKILL during explain, then a re-run", expect="ok", check=_rerun_cleaned)
def _(tmp, m):
    def kill(proc):
        wait_for_part(proc, tmp, "o")
        proc.send_signal(signal.SIGKILL)

    subprocess_cli(_slow(tmp), tmp, kill)
    assert any(tmp.glob(".o.*.part"))
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--out", tmp / "o")


# -- item 15: messages ----------------------------------------------------------------------------------

@probe("13.15", "singular affine")
def _(tmp, m):
    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), None)
    img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, tmp / "flat.nii.gz")
    return cli("explain", "--model", m["grade"], "--input", tmp / "flat.nii.gz", *FAST, "--out", tmp / "o")


@probe("13.15", "config.json weights=../../../../etc/passwd")
def _(tmp, m):
    ckpt = tmp / "ckpt"
    shutil.copytree(m["cnn"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "weights": "../../../../etc/passwd"}))
    return cli("explain", "--model", ckpt, "--input", m["png"], *FAST, "--out", tmp / "o")


@probe("13.15", "config.json that is not JSON")
def _(tmp, m):
    ckpt = tmp / "ckpt"
    shutil.copytree(m["cnn"], ckpt)
    (ckpt / "config.json").write_text("{not json")
    return cli("explain", "--model", ckpt, "--input", m["png"], *FAST, "--out", tmp / "o")


_HEADS = ("class M(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
          "        self.c = nn.Conv2d(1, 2, 3, padding=1)\n    def forward(self, x):\n        f = self.c(x)\n"
          "        return {RET}\ndef build():\n    return M()\n")


def _heads(returns: str, *extra: str):
    def run(tmp, m):
        model = module_file(tmp, "heads", _HEADS.replace("{RET}", returns))
        return cli("explain", "--model", model, "--random-weights", "--input", m["png"], *FAST, *extra,
                   "--out", tmp / "o")
    return run


_TUPLE, _DICT = "f.mean(dim=(2, 3)), f", "{'logits': f.mean(dim=(2, 3)), 'f': f}"
probe("13.15", "a model returning a tuple")(_heads(_TUPLE))
probe("13.15", "a model returning a dict")(_heads(_DICT))
probe("13.15", "a model returning a dict, --output-key logits", expect="ok")(_heads(_DICT, "--output-key", "logits"))
probe("13.15", "--output-key 7 on a tuple of two")(_heads(_TUPLE, "--output-key", "7"))
probe("13.15", "a model returning a string")(_heads("'hello'"))


@probe("13.15", "--memory-budget 1TB", expect="ok")
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--memory-budget", "1TB",
               "--out", tmp / "o")


@probe("13.15", "inspect a model without conv layers")
def _(tmp, m):
    model = module_file(tmp, "flat", "class F(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                        "        self.n = nn.BatchNorm2d(1).eval()\n        self.fc = nn.Linear(256, 2)\n"
                        "    def forward(self, x):\n        return self.fc(self.n(x).flatten(1))\n"
                        "def build():\n    return F()\n")
    return cli("inspect", "--model", model, "--random-weights", "--input", m["png"], "--quiet", "--out", tmp / "o")


@probe("13.15", "inspect --layer that does not exist")
def _(tmp, m):
    return cli("inspect", "--model", m["cnn"], "--input", m["png"], "--quiet", "--layer", "nope", "--out", tmp / "o")


# -- item 16: a sweep that learnt nothing -----------------------------------------------------------

@probe("13.16", "sweep on identical images says it does not beat the baseline", expect="ok",
       check=lambda tmp, o: None if "does not beat the majority-class baseline" in o.err else "no warning")
def _(tmp, m):
    same = np.full((16, 16), 90, np.uint8)
    for label, n in (("a", 24), ("b", 8)):
        (tmp / "img" / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(same).save(tmp / "img" / label / f"{i}.png")
    return cli("sweep", "--data", tmp / "img", "--out", tmp / "o", *SWEEP_ONE[:-1])


# -- general bad inputs ----------------------------------------------------------------------------

@probe("general", "missing input")
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", tmp / "nope.png", *FAST, "--out", tmp / "o")


@probe("general", "missing model")
def _(tmp, m):
    return cli("explain", "--model", tmp / "nope", "--input", m["png"], *FAST, "--out", tmp / "o")


@probe("general", "empty file as the model")
def _(tmp, m):
    (tmp / "empty.pt").write_bytes(b"")
    return cli("explain", "--model", tmp / "empty.pt", "--input", m["png"], *FAST, "--out", tmp / "o")


@probe("general", "unknown method")
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", m["png"], "--methods", "magic", "--quiet", "--out",
               tmp / "o")


@probe("general", "target out of range")
def _(tmp, m):
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--target", "9", "--out", tmp / "o")


@probe("general", "model expecting other channels")
def _(tmp, m):
    return cli("explain", "--model", m["grade"], "--input", m["png"], *FAST, "--out", tmp / "o")


@probe("general", "a text file as input")
def _(tmp, m):
    (tmp / "notes.txt").write_text("hello")
    return cli("explain", "--model", m["cnn"], "--input", tmp / "notes.txt", *FAST, "--out", tmp / "o")


@probe("general", "an empty folder as input")
def _(tmp, m):
    (tmp / "empty").mkdir()
    return cli("explain", "--model", m["cnn"], "--input", tmp / "empty", *FAST, "--out", tmp / "o")


@probe("general", "--device cuda without CUDA")
def _(tmp, m):
    if torch.cuda.is_available():
        return Outcome(2, "skipped: CUDA is available\n")
    return cli("explain", "--model", m["cnn"], "--input", m["png"], *FAST, "--device", "cuda", "--out", tmp / "o")


@probe("general", "evaluate --cases 0")
def _(tmp, m):
    return cli("evaluate", "--model", m["grade"], "--data", m["case"].parent, "--cases", "0", "--quiet",
               "--out", tmp / "o")


@probe("general", "phantom --subjects -1")
def _(tmp, m):
    return cli("phantom", "--out", tmp / "o", "--subjects", "-1", "--quiet")


@probe("general", "API input with NaN")
def _(tmp, m):
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 3, 3] = float("nan")
    return api(lambda: voxplain.explain(nn_linear(), x, 0, ["vanilla_gradient"]))


@probe("general", "API input of the wrong rank")
def _(tmp, m):
    return api(lambda: voxplain.explain(nn_linear(), torch.zeros(16, 16), 0, ["vanilla_gradient"]))


# -- the run ------------------------------------------------------------------------------------------

@dataclass
class Row:
    probe: Probe
    outcome: Outcome
    verdict: str  # "one line", "right", "traceback", "wrong"
    lost: list[str]
    note: str = ""


class ProbeTimeout(BaseException):
    """A probe ran past its time (e.g. an absurd option taken at its word)."""


def _timeout(signum, frame):
    raise ProbeTimeout()


def run_probe(p: Probe, root: Path, shared: dict, seconds: int = 300) -> Row:
    tmp = Path(tempfile.mkdtemp(dir=root))
    _CURRENT.clear()
    _CURRENT.update(user=tmp / "user", before={})
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(seconds)
    try:
        outcome = p.run(tmp, shared)
    except ProbeTimeout:
        outcome = Outcome(None, "", escaped=f"no answer within {seconds} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        before = _CURRENT.pop("before", {})
        _CURRENT.clear()
    after = snapshot(tmp / "user")
    lost = sorted(k for k, v in before.items() if after.get(k) != v)
    lines = outcome.err.strip().splitlines()
    note = ""
    if outcome.escaped.startswith("no answer within"):
        verdict, note = "timeout", outcome.escaped
    elif outcome.escaped or "Traceback" in outcome.err:
        verdict = "traceback"
        note = (outcome.escaped or outcome.err).strip().splitlines()[-1]
    elif p.expect == "error":
        verdict = "one line" if outcome.code == 2 and len(lines) == 1 else "wrong"
        note = lines[0] if lines else f"exit {outcome.code}"
    elif p.expect == "terminated":
        verdict = "right" if outcome.code == 143 and lines == ["voxplain: terminated"] else "wrong"
        note = f"exit {outcome.code}: {' | '.join(lines)}"
    else:
        verdict = "right" if outcome.code == 0 else "wrong"
        note = f"exit {outcome.code}" + (f": {lines[-1]}" if lines and outcome.code else "")
    if p.check is not None and verdict in ("one line", "right"):
        problem = p.check(tmp, outcome)
        if problem:
            verdict, note = "wrong", problem
    return Row(p, outcome, verdict, lost, note)


def run_all(root: Path) -> list[Row]:
    shared = make_models(root / "shared")
    shared["sweep"] = finished_sweep(root / "shared")
    return [run_probe(p, root, shared) for p in PROBES]


def summary(rows: list[Row]) -> str:
    errors = [r for r in rows if r.probe.expect == "error"]
    lines = [f"{'item':7} {'verdict':10} {'lost':4}  probe: what came back", "-" * 100]
    for r in rows:
        lines.append(f"{r.probe.item:7} {r.verdict:10} {len(r.lost):4}  {r.probe.name}: {r.note[:160]}")
    lines.append("-" * 100)
    lines.append(f"{len(rows)} probes: {len(errors)} bad inputs to refuse, "
                 f"{sum(r.verdict == 'one line' for r in errors)} answered with one line; "
                 f"{sum(r.probe.expect != 'error' for r in rows)} inputs or interruptions to handle, "
                 f"{sum(r.verdict == 'right' for r in rows)} handled right; "
                 f"{sum(r.verdict == 'traceback' for r in rows)} tracebacks; "
                 f"{sum(r.verdict == 'timeout' for r in rows)} timeouts; "
                 f"{sum(r.verdict == 'wrong' for r in rows)} wrong; "
                 f"{sum(len(r.lost) for r in rows)} files lost")
    return "\n".join(lines)


@pytest.mark.slow
def test_every_bad_input_gets_one_line_and_nothing_is_lost(tmp_path):
    rows = run_all(tmp_path)
    print("\n" + summary(rows))
    bad = [f"{r.probe.item} {r.probe.name}: {r.verdict} {r.note} {r.outcome.escaped[-800:]}" for r in rows
           if r.verdict not in ("one line", "right") or r.lost]
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        print(summary(run_all(Path(d))))
