"""Benchmark of the issue-2 methods: voxplain against Captum and PAIR ``saliency``.

Not a test: it times, checks that the maps agree, and prints tables.

* Table 1, per model (a 2D CNN on 1x1x224x224 and a 3D U-Net with BatchNorm on
  1x4x64^3): each of the eight methods in voxplain (a single-method ``explain()``
  call, as a user makes it) and in its reference with identical options, the
  median of interleaved repeats (at least ``--repeats``; a fast method until about a
  second per side), the ratio reference/ours and the largest difference between the
  maps relative to the reference's largest magnitude.
  Guided IG is compared with PAIR's ``GuidedIG``. For SmoothGrad, Captum's
  ``NoiseTunnel`` is made to draw the same noise as voxplain (seed 0).
* ``explain()`` with the seven NeuroXAI methods against the sum of seven
  single-method calls.
* Integrated gradients against ``steps`` times the model's own forward+backward
  at its best batch size.
* Gradient passes for 1% completeness on the shipped demo models (2D slice CNN, 3D grade
  classifier, 3D U-Net; once, whatever the sizes): Captum's IG at its defaults, the fewest
  Captum steps within 1%, and ours with ``steps="auto"``.
* Peak resident memory of integrated gradients on 1x4x128^3 with
  ``memory_budget="2GB"``, measured in a fresh subprocess.

Usage::

    python benchmarks/bench_core.py            # full sizes (slow on a CPU)
    python benchmarks/bench_core.py --quick    # smaller inputs and fewer steps
    python benchmarks/bench_core.py --only integrated_gradients
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bench_common import SpatialMean, freeze, load_average, randomise_batchnorm

import voxplain
from voxplain import ClassTarget, Engine, SegmentationTarget, explain
from voxplain.run import seeded_generator
from voxplain.methods.layer_select import default_cam_layer
from voxplain.models.zoo import build_model

METHODS = ("vanilla_gradient", "gradient_x_input", "guided_backprop", "integrated_gradients",
           "smoothgrad", "gradcam", "guided_gradcam", "guided_ig")
FRACTION, MAX_DIST, NOISE_LEVEL = 0.25, 0.02, 0.15
#: warm-up calls of each side before timing
WARM_UP_CALLS = 2
#: a method faster than this per call is timed more often than --repeats says (at most MAX_REPEATS
#: times a side): a median of five 10 ms calls moves by 10-20% on a shared 2-core machine
MIN_TIMED_SECONDS, MAX_REPEATS = 1.0, 40
#: timings of the model's own pass per batch size, and of IG against the floor, at least
FLOOR_REPEATS = 5


@dataclass
class Case:
    """One model and input, in voxplain's terms and in the references' terms."""

    name: str
    model: nn.Module  # explained by voxplain
    x: torch.Tensor
    target: object  # voxplain target
    ref_model: nn.Module  # explained by Captum / PAIR: (B, K) output
    cls: int
    layer: nn.Module  # the Grad-CAM layer, the same module for both
    mode: str  # interpolation mode of Grad-CAM


def make_cases(quick: bool, which: set[str]) -> list[Case]:
    torch.manual_seed(0)
    cases = []
    if "2d" in which:
        size = 112 if quick else 224
        model = freeze(build_model("cnn2d", blocks=5, in_channels=1, num_classes=2, image_size=size))
        x = torch.randn(1, 1, size, size)
        cases.append(Case(f"cnn2d (5 blocks), 1x1x{size}x{size}", model, x, ClassTarget(1), model, 1,
                          _cam_layer(model, x), "bilinear"))
    if "3d" in which:
        size = 32 if quick else 64
        model = freeze(build_model("unet3d"))
        randomise_batchnorm(model)
        x = torch.randn(1, 4, size, size, size)
        cases.append(Case(f"unet3d (MONAI UNet, BatchNorm), 1x4x{size}^3", model, x, SegmentationTarget(1),
                          SpatialMean(model).eval(), 1, _cam_layer(model, x), "trilinear"))
    return cases


def _cam_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with Engine(model) as engine:
        return default_cam_layer(engine, x)


# ---------------------------------------------------------------------------
# the two sides


def ours(case: Case, method: str, options: dict) -> torch.Tensor:
    return explain(case.model, case.x, case.target, methods=[method], options={method: options} if options else None)[method]


def reference(case: Case, method: str, options: dict, rows: int) -> torch.Tensor:
    import captum.attr as ca

    m, x, t = case.ref_model, case.x, case.cls
    if method == "vanilla_gradient":
        return ca.Saliency(m).attribute(x, target=t, abs=False)
    if method == "gradient_x_input":
        return ca.InputXGradient(m).attribute(x, target=t)
    if method == "guided_backprop":
        return ca.GuidedBackprop(m).attribute(x, target=t)
    if method == "integrated_gradients":
        return ca.IntegratedGradients(m).attribute(x, baselines=0.0, target=t, n_steps=options["steps"],
                                                   method=options["rule"], internal_batch_size=rows)
    if method == "smoothgrad":
        sigma = NOISE_LEVEL * float(x.max() - x.min())
        with _same_noise_as_ours(x):
            return ca.NoiseTunnel(ca.Saliency(m)).attribute(x, nt_type="smoothgrad",
                                                            nt_samples=options["samples"],
                                                            nt_samples_batch_size=rows, stdevs=sigma, target=t,
                                                            abs=False)
    if method == "gradcam":
        cam = ca.LayerGradCam(m, case.layer).attribute(x, target=t, relu_attributions=True)
        return ca.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode=case.mode)
    if method == "guided_gradcam":
        return ca.GuidedGradCam(m, case.layer).attribute(x, target=t, interpolate_mode=case.mode)
    if method == "guided_ig":
        return _pair_guided_ig(m, x, t, options)
    raise ValueError(method)


@contextlib.contextmanager
def _same_noise_as_ours(x: torch.Tensor):
    """Make Captum's NoiseTunnel draw the noise that voxplain's SmoothGrad draws (seed 0).

    NoiseTunnel draws ``torch.normal(0, stdev_expanded)`` per batch of noisy copies;
    voxplain draws ``randn(row_shape)`` per copy from its seeded generator, in order.
    """
    generator = seeded_generator(0, "smoothgrad")
    original = torch.normal

    def normal(mean, std, *args, **kwargs):
        rows = [torch.randn(tuple(x.shape[1:]), generator=generator) for _ in range(std.shape[0])]
        return mean + std * torch.stack(rows).to(std.dtype)

    torch.normal = normal
    try:
        yield
    finally:
        torch.normal = original


def _pair_guided_ig(model: nn.Module, x: torch.Tensor, cls: int, options: dict) -> torch.Tensor:
    import saliency.core as saliency

    def call_model(batch, call_model_args=None, expected_keys=None):
        t = torch.from_numpy(np.asarray(batch)).to(x.dtype).requires_grad_(True)
        grad, = torch.autograd.grad(model(t)[:, cls].sum(), t)
        return {saliency.INPUT_OUTPUT_GRADIENTS: grad.numpy()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's deprecated quantile(interpolation=...)
        mask = saliency.GuidedIG().GetMask(x[0].numpy(), call_model, x_baseline=np.zeros(x.shape[1:]),
                                           x_steps=options["steps"], fraction=options["fraction"],
                                           max_dist=options["max_dist"])
    return torch.from_numpy(np.asarray(mask, dtype=np.float32))[None]


def method_options(method: str, case: Case, steps: int, gig_steps: int, samples: int) -> dict:
    return {
        "integrated_gradients": {"steps": steps, "rule": "riemann_trapezoid"},
        "smoothgrad": {"samples": samples, "noise_level": NOISE_LEVEL},
        "guided_ig": {"steps": gig_steps, "fraction": FRACTION, "max_dist": MAX_DIST},
        "gradcam": {"layer": case.layer},
        "guided_gradcam": {"layer": case.layer},
    }.get(method, {})


# ---------------------------------------------------------------------------
# timing helpers


def timed(fn):
    """Wall seconds and result of ``fn()``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_both(fn):
    """Wall seconds, CPU seconds (all threads) and result of ``fn()``.

    CPU time is less sensitive than wall time to other processes sharing the cores.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def compare(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double().reshape(b.shape), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


AGREEMENT = 1e-5  # max |ours - reference| / max |reference| for "the same map"


def double_case(case: Case) -> Case:
    """The case in float64 (a copy of the model): the reference computed there is the accuracy yardstick."""
    import copy

    model = copy.deepcopy(case.model).double()
    ref = model if case.ref_model is case.model else SpatialMean(model).eval()
    layer = dict(model.named_modules())[next(n for n, m in case.model.named_modules() if m is case.layer)]
    return Case(case.name, model, case.x.double(), case.target, ref, case.cls, layer, case.mode)


def agreement(case: Case, method: str, opts: dict, rows: int, ours_map, ref_map) -> dict:
    """Does our map equal the reference's (to AGREEMENT relative)? Where float32 itself is not that
    accurate for this model (the reference differs from its own float64 result by more), ours passes if
    it is as close to the float64 result as the reference is."""
    diff = compare(ours_map, ref_map)
    out = {"diff": diff, "agree": diff <= AGREEMENT}
    if not out["agree"]:
        exact = reference(double_case(case), method, opts, rows)
        out["ours_vs_f64"], out["ref_vs_f64"] = compare(ours_map, exact), compare(ref_map, exact)
        out["agree"] = out["ours_vs_f64"] <= max(AGREEMENT, 1.5 * out["ref_vs_f64"])
    return out


def bench_methods(case: Case, methods, repeats: int, steps: int, gig_steps: int, samples: int) -> list[dict]:
    with Engine(case.model) as engine:
        rows = engine.rows_per_chunk(tuple(case.x.shape[1:]))
    # warm-up: first calls pay for library initialisation and kernel selection, and ours for the
    # one-off channels-last trial of this model and row shape (remembered for the model; a kind of
    # pass is measured at its second meeting): what is timed is the steady state a user has from then on
    for _ in range(WARM_UP_CALLS):
        ours(case, "vanilla_gradient", {})
        ours(case, "integrated_gradients", {"steps": 16})
    reference(case, "vanilla_gradient", {}, rows)
    results = []
    for method in methods:
        opts = method_options(method, case, steps, gig_steps, samples)
        ours_t, ref_t, ours_c, ref_c = [], [], [], []
        r, count = 0, repeats
        while r < count:
            # alternate who goes first, so that drifting load hits both sides alike
            order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
            for side in order:
                if side == "ours":
                    t, c, ours_map = timed_both(lambda: ours(case, method, opts))
                    ours_t.append(t)
                    ours_c.append(c)
                else:
                    t, c, ref_map = timed_both(lambda: reference(case, method, opts, rows))
                    ref_t.append(t)
                    ref_c.append(c)
            if r == 0:  # a fast method is repeated until about MIN_TIMED_SECONDS per side were timed
                count = max(repeats, min(MAX_REPEATS, math.ceil(MIN_TIMED_SECONDS / max(ours_t[0], ref_t[0]))))
            r += 1
        ours_s, ref_s = statistics.median(ours_t), statistics.median(ref_t)
        cpu_ratio = statistics.median(ref_c) / statistics.median(ours_c)
        agree = agreement(case, method, opts, rows, ours_map, ref_map)
        results.append({"case": case.name, "method": method, "ours_s": ours_s, "ref_s": ref_s,
                        "ours_cpu": statistics.median(ours_c), "ref_cpu": statistics.median(ref_c),
                        "ratio": ref_s / ours_s, "cpu_ratio": cpu_ratio, "repeats": count, **agree,
                        "reference": "PAIR GuidedIG" if method == "guided_ig" else "Captum",
                        "options": {k: (v if not isinstance(v, nn.Module) else "default layer")
                                    for k, v in opts.items()}})
        print(f"  {method:22s} ours {ours_s:8.3f} s  ref {ref_s:8.3f} s  ratio {ref_s / ours_s:5.2f}  "
              f"(CPU {cpu_ratio:5.2f}, {count} repeats)  diff {_agreement_text(results[-1])}", flush=True)
    return results


def _agreement_text(r: dict) -> str:
    text = f"{r['diff']:.1e}"
    if "ours_vs_f64" in r:
        text += f" (vs float64: ours {r['ours_vs_f64']:.1e}, reference {r['ref_vs_f64']:.1e})"
    return text


def bench_explain_all(case: Case, repeats: int, steps: int, gig_steps: int, samples: int) -> dict:
    options = {m: method_options(m, case, steps, gig_steps, samples) for m in voxplain.DEFAULT_METHODS}
    options = {m: o for m, o in options.items() if o}
    together, separate, together_cpu, separate_cpu = [], [], [], []
    for _ in range(repeats):
        t, c, _maps = timed_both(lambda: explain(case.model, case.x, case.target, options=options))
        together.append(t)
        together_cpu.append(c)
        total = total_cpu = 0.0
        for m in voxplain.DEFAULT_METHODS:
            t, c, _maps = timed_both(lambda: ours(case, m, options.get(m, {})))
            total += t
            total_cpu += c
        separate.append(total)
        separate_cpu.append(total_cpu)
    return {"case": case.name, "together_s": statistics.median(together),
            "separate_s": statistics.median(separate),
            "ratio": statistics.median(separate) / statistics.median(together),
            "cpu_ratio": statistics.median(separate_cpu) / statistics.median(together_cpu)}


def bench_ig_vs_model(case: Case, repeats: int, steps: int) -> dict:
    """IG with ``steps`` points against ``steps`` x the model's own forward+backward at its best batch size.

    The best batch size is found first (the median of at least FLOOR_REPEATS passes per size); then
    IG calls and floor calls (``steps`` rows' worth of passes at that size) alternate, at least
    FLOOR_REPEATS times each, so that load drifting during the measurement hits both alike.
    """
    with Engine(case.model) as engine:
        rows = engine.rows_per_pass(tuple(case.x.shape[1:]))
        chunk_rows = engine.rows_per_chunk(tuple(case.x.shape[1:]))
    sizes = sorted({1, 2, 4, 8, 16, 32, min(rows, steps)} & set(range(1, min(rows, steps) + 1)))

    def model_step(bs: int):
        xb = case.x.expand(bs, *case.x.shape[1:]).clone()

        def step():
            xg = xb.clone().requires_grad_(True)
            score = case.ref_model(xg)[:, case.cls].sum()
            torch.autograd.grad(score, xg)
        return step

    per_row = {}
    for bs in sizes:
        step = model_step(bs)
        step()  # warm-up
        per_row[bs] = statistics.median(timed(step)[0] for _ in range(max(repeats, FLOOR_REPEATS))) / bs
    best_bs = min(per_row, key=per_row.get)
    step, passes = model_step(best_bs), math.ceil(steps / best_bs)
    opts = {"steps": steps, "rule": "riemann_trapezoid"}
    ig_t, floor_t = [], []
    calls = [("ig", lambda: ours(case, "integrated_gradients", opts)),
             ("floor", lambda: [step() for _ in range(passes)])]
    for r in range(max(repeats, FLOOR_REPEATS)):
        for name, call in (calls if r % 2 == 0 else calls[::-1]):
            t = timed(call)[0]
            if name == "ig":
                ig_t.append(t)
            else:
                floor_t.append(t * steps / (passes * best_bs))  # steps rows' worth
    ig, floor = statistics.median(ig_t), statistics.median(floor_t)
    return {"case": case.name, "ig_s": ig, "model_s": floor, "best_batch": best_bs, "engine_rows": chunk_rows,
            "overhead": ig / floor - 1.0, "per_row": per_row}


COMPLETENESS = 0.01  # the relative completeness error both sides must reach in the passes comparison


def bench_ig_passes(case: Case, max_steps: int = 256) -> dict:
    """Gradient passes for 1% completeness: Captum's IG at its defaults (Gauss-Legendre, 50 steps), the
    fewest Captum steps (4, 8, 16, ... as a user would search) within 1%, and ours with ``steps="auto"``
    with Gauss-Legendre (4, 8, 16, ... steps, none reused between doublings) and with the ``nested`` rule
    (3, 7, 15, ... steps, each doubling reusing every gradient so far).

    Completeness error: |sum of the map - (F(x) - F(0))| / |F(x) - F(0)|, F the reference's (B, K) score.
    Ours report the gradient passes they spent (``extras["passes"]``: every step count tried).
    """
    import captum.attr as ca

    with torch.no_grad():
        delta = float(case.ref_model(case.x)[0, case.cls] - case.ref_model(torch.zeros_like(case.x))[0, case.cls])

    def error(attr: torch.Tensor) -> float:
        return abs(float(attr.double().sum()) - delta) / max(abs(delta), 1e-30)

    ig = ca.IntegratedGradients(case.ref_model)
    default_s, default_map = timed(lambda: ig.attribute(case.x, baselines=0.0, target=case.cls))
    captum_steps, captum_error, steps = None, None, 4
    while steps <= max_steps:
        captum_error = error(ig.attribute(case.x, baselines=0.0, target=case.cls, n_steps=steps))
        if captum_error <= COMPLETENESS:
            captum_steps = steps
            break
        steps *= 2
    result = {"case": case.name, "captum_default_error": error(default_map), "captum_default_s": default_s,
              "captum_steps": captum_steps, "captum_steps_error": captum_error}
    for key, rule in (("auto", "gausslegendre"), ("nested", "nested")):
        opts = {"integrated_gradients": {"steps": "auto", "rule": rule, "tolerance": COMPLETENESS,
                                         "max_steps": max_steps}}
        seconds, out = timed(lambda: voxplain.explain_detailed(case.model, case.x, case.target,
                                                               ["integrated_gradients"], opts))
        extras = out.extras["integrated_gradients"]
        result.update({f"{key}_steps": extras["steps_used"][0], f"{key}_passes": extras["passes"][0],
                       f"{key}_error": error(out.maps["integrated_gradients"]), f"{key}_s": seconds})
    return result


def demo_cases() -> list[Case]:
    """The shipped demo models (``voxplain demo``) on a phantom HGG subject (3 mm, as they were trained),
    centre-cropped or padded to each model's input size and standardised per channel; 2D: the middle
    axial slice. Their trained nonlinearity is what makes the completeness comparison informative
    (an untrained net is nearly linear along the path: 4 steps suffice on both sides)."""
    import json

    from voxplain.data import generate_subject
    from voxplain.models.checkpoint import load_model, shipped_checkpoint

    image = torch.from_numpy(generate_subject("bench", "HGG", False, seed=3, resolution=3).image)
    cases = []
    for name in ("demo-slices", "demo-grade", "demo-unet"):
        config = json.loads((shipped_checkpoint(name) / "config.json").read_text())
        size = tuple(config["input_size"])
        vol = image if len(size) == 3 else image[..., image.shape[-1] // 2]
        vol = _crop_or_pad(vol, size)
        vol = (vol - vol.mean(dim=tuple(range(1, vol.ndim)), keepdim=True)) / vol.flatten(1).std(dim=1).clamp_min(
            1e-6).view(-1, *([1] * len(size)))
        model = freeze(load_model(name))
        x = vol[None].float()
        if config.get("task") == "segment":
            target, ref, cls = SegmentationTarget(1), SpatialMean(model).eval(), 1
        else:
            with torch.no_grad():
                cls = int(model(x).argmax(dim=1))
            target, ref = ClassTarget(cls), model
        cases.append(Case(f"{name} ({config.get('model')}), 1x{'x'.join(map(str, x.shape[1:]))}", model, x,
                          target, ref, cls, None, ""))
    return cases


def _crop_or_pad(vol: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``vol`` (C, *spatial) centre-cropped or zero-padded to ``size``."""
    for axis, n in enumerate(size, start=1):
        have = vol.shape[axis]
        if have > n:
            vol = vol.narrow(axis, (have - n) // 2, n)
        elif have < n:
            pad = [0, 0] * (vol.ndim - 1 - axis) + [(n - have) // 2, n - have - (n - have) // 2]
            vol = torch.nn.functional.pad(vol, pad)
    return vol


# ---------------------------------------------------------------------------
# peak memory in a fresh process


def peak_rss_kb() -> int:
    """Peak resident memory of this process in KiB.

    ``VmHWM`` belongs to the process image, whereas ``ru_maxrss`` also keeps the peak
    of the parent at the time of the fork; fall back to it where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(size: int, steps: int, budget: str) -> None:
    torch.manual_seed(0)
    model = freeze(build_model("unet3d"))
    x = torch.randn(1, 4, size, size, size)
    before = peak_rss_kb()
    with Engine(model, memory_budget=budget) as engine:
        rows = engine.rows_per_pass(tuple(x.shape[1:]))
    start = time.perf_counter()
    explain(model, x, SegmentationTarget(1), methods=["integrated_gradients"],
            options={"integrated_gradients": {"steps": steps}}, memory_budget=budget)
    seconds = time.perf_counter() - start
    peak = peak_rss_kb()
    print(json.dumps({"before_kb": before, "peak_kb": peak, "rows_per_pass": rows, "seconds": seconds}))


def bench_memory(size: int, steps: int, budget: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(size), "--steps", str(steps),
           "--budget", budget]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(size=size, steps=steps, budget=budget)
    return result


# ---------------------------------------------------------------------------


SIZES = {"quick": dict(steps=16, gig_steps=16, samples=8, memory=64),
         "full": dict(steps=50, gig_steps=50, samples=25, memory=128)}
IG_FLOOR_LIMIT = 0.15  # IG may cost at most this much over steps x the model's best-batch forward+backward


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="quick,full",
                        help="comma-separated sizes to run, in one table: quick (112^2, 32^3, 16 steps, 8 samples) "
                             "and/or full (224^2, 64^3, 50 steps, 25 samples); default both")
    parser.add_argument("--quick", action="store_true", help="the quick size only (same as --sizes quick)")
    parser.add_argument("--only", choices=METHODS, help="benchmark this method only (and skip the extras)")
    parser.add_argument("--models", default="2d,3d", help="comma-separated subset of 2d,3d")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median); default 3, 3D full: 1")
    parser.add_argument("--steps", type=int, default=None, help="IG steps (default per size: 16 / 50)")
    parser.add_argument("--gig-steps", type=int, default=None, help="Guided IG steps (default per size: 16 / 50)")
    parser.add_argument("--samples", type=int, default=None, help="SmoothGrad samples (default per size: 8 / 25)")
    parser.add_argument("--memory-size", type=int, default=None, help="edge of the memory test volume (64 quick, "
                        "128 full; 0 skips the test)")
    parser.add_argument("--memory-steps", type=int, default=None, help="IG steps of the memory test (default --steps)")
    parser.add_argument("--budget", default="2GB", help="memory budget of the memory test")
    parser.add_argument("--judge", choices=("wall", "cpu"), default="wall",
                        help="which time decides PASS (wall on an idle machine; cpu when the machine is shared)")
    parser.add_argument("--no-extras", action="store_true", help="only the method table")
    parser.add_argument("--no-demo-models", action="store_true",
                        help="skip the 1%%-completeness passes on the shipped demo models")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        memory_child(args.memory_child, args.steps or 16, args.budget)
        return 0
    sizes = ["quick"] if args.quick else [v.strip() for v in args.sizes.split(",") if v.strip()]
    if not sizes or any(v not in SIZES for v in sizes):
        parser.error(f"--sizes takes quick and/or full, got {args.sizes!r}")
    methods = (args.only,) if args.only else METHODS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{load_average()}", flush=True)

    out: dict = {"methods": [], "explain_all": [], "ig_floor": [], "ig_passes": [], "memory": [],
                 "judge": args.judge}
    for size in sizes:
        preset = SIZES[size]
        steps, gig_steps = args.steps or preset["steps"], args.gig_steps or preset["gig_steps"]
        samples = args.samples or preset["samples"]
        print(f"\n== {size}: steps {steps}, guided IG steps {gig_steps}, SmoothGrad samples {samples}", flush=True)
        for case in make_cases(size == "quick", set(args.models.split(","))):
            repeats = args.repeats or (1 if (case.x.ndim == 5 and size == "full") else 3)
            print(f"\n{case.name} (repeats {repeats})", flush=True)
            for r in bench_methods(case, methods, repeats, steps, gig_steps, samples):
                out["methods"].append({**r, "size": size})
            if args.only or args.no_extras:
                continue
            out["explain_all"].append({**bench_explain_all(case, repeats, steps, gig_steps, samples), "size": size})
            out["ig_floor"].append({**bench_ig_vs_model(case, repeats, steps), "size": size})
        if not (args.only or args.no_extras) and args.memory_size != 0:
            edge = args.memory_size or preset["memory"]
            out["memory"].append(bench_memory(edge, args.memory_steps or steps, args.budget))
    if not (args.only or args.no_extras or args.no_demo_models):
        print("\n== gradient passes for 1% completeness on the shipped demo models", flush=True)
        for case in demo_cases():
            print(f"{case.name}", flush=True)
            out["ig_passes"].append({**bench_ig_passes(case), "size": "demo"})

    print_tables(out)
    print(f"load average at the end: {load_average()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_tables(out: dict) -> None:
    judge = out.get("judge", "wall")
    print(f"\n| size | model | method | ours (s) | reference (s) | reference/ours | same, CPU time | speed "
          f"({judge}) | max rel. difference | same map |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out["methods"]:
        ref = "" if r["reference"] == "Captum" else f" ({r['reference']})"
        ratio = r["ratio"] if judge == "wall" else r["cpu_ratio"]
        print(f"| {r.get('size', '')} | {r['case']} | {r['method']}{ref} | {r['ours_s']:.3f} | {r['ref_s']:.3f} "
              f"| {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {_verdict(ratio >= 1.0)} | {_agreement_text(r)} "
              f"| {_verdict(r['agree'])} |")
    if out["explain_all"]:
        print("\n| size | model | explain() with the seven (s) | seven single calls (s) | single/together "
              "| same, CPU time |")
        print("|---|---|---|---|---|---|")
        for r in out["explain_all"]:
            print(f"| {r.get('size', '')} | {r['case']} | {r['together_s']:.3f} | {r['separate_s']:.3f} "
                  f"| {r['ratio']:.2f} | {r.get('cpu_ratio', float('nan')):.2f} |")
    if out["ig_floor"]:
        print(f"\n| size | model | IG (s) | steps x model fwd+bwd at best batch (s) | best batch | engine rows/pass "
              f"| IG overhead | within {IG_FLOOR_LIMIT:.0%} |")
        print("|---|---|---|---|---|---|---|---|")
        for r in out["ig_floor"]:
            print(f"| {r.get('size', '')} | {r['case']} | {r['ig_s']:.3f} | {r['model_s']:.3f} | {r['best_batch']} "
                  f"| {r['engine_rows']} | {100 * r['overhead']:+.1f}% | {_verdict(r['overhead'] <= IG_FLOOR_LIMIT)} |")
    if out.get("ig_passes"):
        print(f"\n| size | model | Captum IG defaults (50 steps): completeness error | Captum steps for "
              f"{COMPLETENESS:.0%} (doubling from 4) | ours auto, Gauss-Legendre: steps / passes / error "
              f"| ours auto, nested: steps / passes / error | Captum defaults (s) | ours GL (s) | ours nested (s) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in out["ig_passes"]:
            captum = str(r["captum_steps"]) if r["captum_steps"] else f"> 256 ({r['captum_steps_error']:.1%})"
            print(f"| {r.get('size', '')} | {r['case']} | {r['captum_default_error']:.2%} | {captum} "
                  f"| {r['auto_steps']} / {r['auto_passes']} / {r['auto_error']:.2%} "
                  f"| {r['nested_steps']} / {r['nested_passes']} / {r['nested_error']:.2%} "
                  f"| {r['captum_default_s']:.3f} | {r['auto_s']:.3f} | {r['nested_s']:.3f} |")
    for mem in out["memory"] or []:
        print(f"\nIG {mem['steps']} steps on 1x4x{mem['size']}^3, memory_budget={mem['budget']!r}: peak RSS "
              f"{mem['peak_kb'] / 1024**2:.2f} GiB (process before explain: {mem['before_kb'] / 1024**2:.2f} GiB), "
              f"{mem['rows_per_pass']} row(s) per pass, {mem['seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
