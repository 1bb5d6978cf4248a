"""Cohorts on a real Dask cluster: `explain` / `evaluate` with --scheduler (and --workers) on a phantom cohort.

The module starts a `dask scheduler` and two `dask worker` processes on loopback
(free ports, one thread each, no nanny: a killed worker stays dead) and kills them
at the end, also when a test fails. The model is a tiny 3D classifier checkpoint
made here; the cohort is a 6-case phantom at 3 mm, cropped to 32^3 by the checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dask
import nibabel as nib
import numpy as np
import pytest
import torch

from voxplain.atomic import MARKER_NAME, PART_OWNER_NAME, is_intact
from voxplain.cli import main
from voxplain.models import build_model, save_checkpoint

pytest.importorskip("distributed")

CASES = 6
FAST = ["--methods", "vanilla_gradient,gradcam", "--quiet"]
START_TIMEOUT = 120  # s for the cluster to come up on a loaded machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass


class Cluster:
    """A scheduler and named workers started as processes; ``kill(name)`` sends a worker SIGKILL."""

    def __init__(self, workers: tuple[str, ...], log_dir: Path):
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        dask = [sys.executable, "-m", "dask"]
        port = self.address.rsplit(":", 1)[1]
        try:
            self._start(dask + ["scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
                        log_dir / "scheduler.log", env)
            for name in workers:
                self.workers[name] = self._start(
                    dask + ["worker", self.address, "--name", name, "--nthreads", "1", "--no-nanny",
                            "--no-dashboard", "--host", "127.0.0.1", "--local-directory", str(log_dir / name)],
                    log_dir / f"{name}.log", env)
            self._wait_for(len(workers))
        except BaseException:
            self.stop()
            raise

    def _start(self, cmd, log: Path, env) -> subprocess.Popen:
        with open(log, "wb") as fh:
            p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def _wait_for(self, n: int) -> None:
        from distributed import Client

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with Client(self.address, timeout="5s") as client:
                    client.wait_for_workers(n, timeout=max(1, deadline - time.monotonic()))
                    return
            except (OSError, TimeoutError):
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"the Dask cluster at {self.address} did not start") from None
                time.sleep(0.5)

    def kill(self, pid: int) -> None:
        """SIGKILL the worker process ``pid`` and reap it (a zombie would still count as alive)."""
        os.kill(pid, signal.SIGKILL)
        next(p for p in self.procs if p.pid == pid).wait(timeout=30)

    def stop(self) -> None:
        _stop(self.procs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(("w1", "w2"), tmp_path_factory.mktemp("dask"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    assert main(["phantom", "--out", str(root / "c"), "--subjects", str(CASES), "--resolution", "3", "--seed", "3",
                 "--quiet"]) == 0
    return root / "c"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny untrained 3D grade classifier that sees a 32^3 crop."""
    torch.manual_seed(0)
    net = build_model("classifier3d", in_channels=4, num_classes=2, blocks=2, base_width=4)
    path = tmp_path_factory.mktemp("models") / "grade"
    save_checkpoint(net, {"task": "classify", "class_names": ["LGG", "HGG"], "input_size": [32, 32, 32]}, path)
    return path


def _explain(model, cohort, out, *extra) -> int:
    return main(["explain", "--model", str(model), "--input", str(cohort), "--out", str(out), *FAST, *extra])


def _summaries(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))}


def _provenance_aside(value):
    """A summary without what says how and where it was made: the command, the worker, seconds taken."""
    if isinstance(value, dict):
        return {k: _provenance_aside(v) for k, v in value.items() if k not in ("command", "cohort", "seconds")}
    if isinstance(value, list):
        return [_provenance_aside(v) for v in value]
    return value


def _parts(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.is_dir() and (p / PART_OWNER_NAME).exists()]


def test_every_case_once_on_both_workers_same_files_as_one_process_and_a_rerun_does_nothing(
        tmp_path, cluster, cohort, model):
    out = tmp_path / "out"
    assert _explain(model, cohort, out, "--scheduler", cluster.address) == 0
    summaries = _summaries(out)
    assert len(summaries) == CASES
    assert all(is_intact(out / name, "explain") for name in summaries)
    assert not _parts(out)
    workers = {s["settings"]["cohort"]["worker"]["name"] for s in summaries.values()}
    assert workers == {"w1", "w2"}
    # the model is loaded once per worker, not once per case
    assert {s["settings"]["cohort"]["worker"]["model_loads"] for s in summaries.values()} == {1}
    with open(out / "failures.csv") as fh:
        assert list(csv.reader(fh)) == [["case", "worker", "reason"]]
    index = (out / "index.html").read_text()
    assert index.count('/report.html"') == CASES and "failed</span>" not in index

    # the single-process loop writes the same case reports (provenance aside)
    single = tmp_path / "single"
    assert _explain(model, cohort, single) == 0
    for name, s in summaries.items():
        one = json.loads((single / name / "summary.json").read_text())
        assert _provenance_aside(s) == _provenance_aside(one)
        for per_method in s["studies"][0]["maps"].values():
            for rel in per_method.values():
                a, b = nib.load(out / name / rel), nib.load(single / name / rel)
                np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
                np.testing.assert_array_equal(a.affine, b.affine)

    # the same command again: every case complete, nothing explained or written
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    stamps.pop(out / "index.html"), stamps.pop(out / "failures.csv"), stamps.pop(out / MARKER_NAME)
    assert _explain(model, cohort, out, "--scheduler", cluster.address) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_other_settings_redo_cases_and_a_foreign_file_stops_the_run_before_any_work(tmp_path, cluster, cohort,
                                                                                  model, capsys):
    small = tmp_path / "small"
    small.mkdir()
    for name in ("PHANTOM_001", "PHANTOM_002"):
        shutil.copytree(cohort / name, small / name)
    out = tmp_path / "out"
    assert _explain(model, small, out, "--scheduler", cluster.address) == 0
    before = {n: s["settings"]["cohort"]["fingerprint"] for n, s in _summaries(out).items()}
    capsys.readouterr()
    # a file voxplain did not write: refused up front (exit 2, one line), nothing redone, the file kept
    (out / "phantom_002" / "notes.txt").write_text("mine")
    code = _explain(model, small, out, "--scheduler", cluster.address, "--seed", "1")
    err = capsys.readouterr().err
    assert code == 2 and "phantom_002/notes.txt" in err and len(err.strip().splitlines()) == 1
    assert {n: s["settings"]["cohort"]["fingerprint"] for n, s in _summaries(out).items()} == before
    assert (out / "phantom_002" / "notes.txt").read_text() == "mine"
    # moved away: other settings redo both cases
    (out / "phantom_002" / "notes.txt").unlink()
    assert _explain(model, small, out, "--scheduler", cluster.address, "--seed", "1") == 0
    after = {n: s["settings"]["cohort"]["fingerprint"] for n, s in _summaries(out).items()}
    assert after.keys() == before.keys() and all(after[n] != before[n] for n in before)


def test_a_broken_case_fails_alone_with_its_reason_on_a_local_cluster(tmp_path, cohort, model, capsys):
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    (data / "PHANTOM_003" / "PHANTOM_003_t1.nii.gz").write_bytes(b"not a NIfTI file")
    out = tmp_path / "out"
    code = _explain(model, data, out, "--workers", "1")  # a local cluster (one process: cheaper to start)
    err = capsys.readouterr().err
    assert code == 1
    assert f"1 of {CASES} cases failed, see {out.resolve() / 'failures.csv'}" in err
    with open(out / "failures.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == ["PHANTOM_003"]
    assert "PHANTOM_003_t1.nii.gz" in rows[0]["reason"] and "\n" not in rows[0]["reason"]
    index = (out / "index.html").read_text()
    assert "1 failed" in index and "PHANTOM_003_t1.nii.gz" in index
    done = [n for n in _summaries(out)]
    assert len(done) == CASES - 1 and "phantom_003" not in done
    assert not (out / "phantom_003").exists() and not _parts(out)


def test_a_worker_killed_mid_case_and_the_cohort_still_completes(tmp_path, cohort, model):
    log = tmp_path / "logs"
    log.mkdir()
    own = Cluster(("k1", "k2"), log)
    try:
        out = tmp_path / "out"
        # cases slow enough (IG, 16 steps) to catch one mid-write
        cmd = [sys.executable, "-m", "voxplain", "explain", "--model", str(model), "--input", str(cohort),
               "--out", str(out), "--methods", "vanilla_gradient,integrated_gradients", "--option",
               "integrated_gradients.steps=16", "--scheduler", own.address, "--quiet"]
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            victim = None
            deadline = time.monotonic() + 300
            while victim is None and run.poll() is None and time.monotonic() < deadline:
                for part in _parts(out) if out.exists() else []:
                    try:
                        owner = json.loads((part / PART_OWNER_NAME).read_text())
                    except (OSError, ValueError):
                        continue
                    victim = owner["pid"], part
                    break
                time.sleep(0.02)
            assert victim is not None, "no case was caught mid-write"
            pid, part = victim
            assert pid in {p.pid for p in own.workers.values()}
            own.kill(pid)
            killed_mid_write = part.exists()  # else it finished just before the signal
            _, err = run.communicate(timeout=600)
        finally:
            _stop([run])
        assert run.returncode == 0, err.decode()
        summaries = _summaries(out)
        assert len(summaries) == CASES and all(is_intact(out / n, "explain") for n in summaries)
        assert not _parts(out)  # the dead worker's half-written folder was removed by the next attempt
        assert own.workers[next(n for n, p in own.workers.items() if p.pid == pid)].poll() is not None
        if killed_mid_write:  # its case was given to the other worker
            survivor = next(n for n, p in own.workers.items() if p.pid != pid)
            assert summaries[part.name.split(".")[1]]["settings"]["cohort"]["worker"]["name"] == survivor
    finally:
        own.stop()


def test_evaluate_on_the_cluster_gives_the_same_metrics(tmp_path, cluster, cohort, model):
    args = ["evaluate", "--model", str(model), "--data", str(cohort), "--methods", "vanilla_gradient,gradcam",
            "--steps", "4", "--metrics", "faithfulness,complexity,localisation,randomisation", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "dask"), "--scheduler", cluster.address]) == 0
    for name in ("metrics.json", "metrics_per_case.json", "metrics.csv", "curves.json", "randomisation.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes(), name
    per_case = json.loads((tmp_path / "dask" / "metrics_per_case.json").read_text())
    assert len(per_case["cases"]) == CASES


def test_model_grid_and_random_weights_flow_through_the_cluster_as_in_one_process(tmp_path, cluster, cohort):
    """--spacing resamples every case on the workers and --random-weights reaches them (and the red alert)."""
    small = tmp_path / "small"
    small.mkdir()
    for name in ("PHANTOM_001", "PHANTOM_002"):
        shutil.copytree(cohort / name, small / name)
    for table in cohort.glob("*.*"):  # subjects.csv (the grades), cohort.json
        shutil.copy(table, small / table.name)
    (tmp_path / "factory.py").write_text(
        "import torch\nfrom voxplain.models import build_model\n\n\ndef make():\n    torch.manual_seed(0)\n"
        "    return build_model('classifier3d', in_channels=4, num_classes=2, blocks=2, base_width=4)\n")
    spec = f"{tmp_path / 'factory.py'}:make"
    extra = ["--random-weights", "--spacing", "4"]
    assert _explain(spec, small, tmp_path / "dask", "--scheduler", cluster.address, *extra) == 0
    assert _explain(spec, small, tmp_path / "one", *extra) == 0
    summaries = _summaries(tmp_path / "dask")
    assert len(summaries) == 2
    for name, s in summaries.items():
        assert s["settings"]["random_weights"] is True
        assert s["settings"]["model_grid"]["spacing_mm"] == [4.0, 4.0, 4.0]
        assert s["settings"]["model_grid"]["from"]["spacing"] == "command line"
        assert "RANDOM WEIGHTS" in (tmp_path / "dask" / name / "report.html").read_text()
        one = json.loads((tmp_path / "one" / name / "summary.json").read_text())
        assert _provenance_aside(s) == _provenance_aside(one)
    # other grid settings are other results: the cases are redone
    before = {n: s["settings"]["cohort"]["fingerprint"] for n, s in summaries.items()}
    assert _explain(spec, small, tmp_path / "dask", "--scheduler", cluster.address, "--random-weights",
                    "--spacing", "5") == 0
    assert all(s["settings"]["cohort"]["fingerprint"] != before[n] for n, s in _summaries(tmp_path / "dask").items())

    args = ["evaluate", "--model", spec, "--data", str(small), "--methods", "vanilla_gradient", "--steps", "4",
            "--metrics", "faithfulness,localisation,randomisation", "--quiet", *extra]
    assert main([*args, "--out", str(tmp_path / "e1")]) == 0
    assert main([*args, "--out", str(tmp_path / "e2"), "--scheduler", cluster.address]) == 0
    for name in ("metrics.json", "metrics_per_case.json", "randomisation.json"):
        assert (tmp_path / "e1" / name).read_bytes() == (tmp_path / "e2" / name).read_bytes(), name


def test_cluster_options_refuse_what_they_cannot_run(tmp_path, cohort, model, capsys):
    code = _explain(model, cohort / "PHANTOM_001", tmp_path / "o", "--workers", "2")
    assert code == 2 and "single case" in capsys.readouterr().err
    code = main(["evaluate", "--demo", "--out", str(tmp_path / "e"), "--workers", "2", "--quiet"])
    assert code == 2 and "--model and --data" in capsys.readouterr().err
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code = _explain(model, cohort, tmp_path / "o", "--scheduler", f"tcp://127.0.0.1:{_free_port()}")
    assert code == 2 and "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_case_with_an_empty_region_is_skipped_and_its_sanity_checks_go_to_the_next_case_on_both_engines():
    """No cluster: the task functions run in this process, the same code the workers run."""
    from voxplain.cohort.evaluate import randomise_task
    from voxplain.evaluate.runner import EvalCase, MetricsAccumulator, evaluate_case, evaluate_cases, randomise_case
    from voxplain.targets import BratsRegionTarget

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 3, 1), torch.nn.Conv3d(3, 3, 1)).eval()
    target = BratsRegionTarget("WT", layout="regions", channels=("TC", "WT", "ET"), region="predicted")
    low = torch.full((4, 8, 8, 8), -50.0)
    with torch.no_grad():  # make the empty case truly empty: every WT logit below zero
        assert (net(low[None])[:, 1] < 0).all() or (net(-low[None])[:, 1] < 0).all()
    empty = low if (net(low[None])[:, 1] < 0).all() else -low
    cases = [EvalCase("empty", empty, target), EvalCase("tumour", torch.randn(4, 8, 8, 8), target)]
    kw = dict(families=["complexity", "randomisation"], seed=0)
    one = evaluate_cases(net, cases, ["vanilla_gradient"], randomisation_cases=1, **kw)
    assert set(one.settings["skipped_cases"]) == {"empty"} and "empty" in one.settings["skipped_cases"]["empty"]
    assert list(one.randomisation) == ["tumour"]  # the skipped case did not take the only slot

    # the cluster's path: scores, then the checks of the first case not skipped
    scored = [{"status": "done", "scores": evaluate_case(net, c, ["vanilla_gradient"], None, kw["families"])}
              for c in cases]
    assert scored[0]["scores"].skipped and scored[1]["scores"].skipped is None
    # a skipped case's checks end before the job is read (so the next case takes the slot)
    assert randomise_task(None, 0, "empty", scored[0])["status"] == "skipped"
    acc = MetricsAccumulator(["vanilla_gradient"])
    checks = randomise_case(net, cases[1], ["vanilla_gradient"], seed=0,
                            check_target=scored[1]["scores"].check_target)
    acc.add(scored[0]["scores"]), acc.add(scored[1]["scores"], checks)
    two = acc.result(one.settings)
    assert json.dumps(two.per_case, sort_keys=True) == json.dumps(one.per_case, sort_keys=True)  # NaN-safe
    assert two.settings["skipped_cases"] == one.settings["skipped_cases"]


_PAGE_FAULTS = """
import resource, sys, torch
from voxplain.host_heap import own_process_heap

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        torch.empty(1 << 20).fill_(1.0)  # 4 MiB: under the 32 MiB threshold, over Dask's 64 KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

as_started = faults()
changed = own_process_heap()
faults()  # the first blocks come from the heap once
print(as_started, faults(), changed)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_a_worker_started_with_dasks_malloc_setting_reuses_freed_tensor_memory_again():
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536: each 4 MiB tensor is then a new mapping whose
    # ~1000 pages fault in on first touch; once reset, freed blocks are reused and barely fault
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], env=env, capture_output=True, text=True, check=True)
    as_started, after, changed = done.stdout.split()
    assert changed == "True"
    assert int(as_started) > 40 * 500, done.stdout
    assert int(after) < int(as_started) / 20, done.stdout
