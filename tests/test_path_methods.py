"""Integrated gradients, Guided IG and SmoothGrad against Captum, PAIR saliency and the axioms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from tiny_models import SpatialMean, classifier, linear, segnet
from voxplain import ClassTarget, SegmentationTarget, available_methods, explain
from voxplain.run import seeded_generator
from voxplain.methods.integrated_gradients import RULES, quadrature

captum_attr = pytest.importorskip("captum.attr")
saliency = pytest.importorskip("saliency.core")

RTOL = 1e-4  # max |ours - reference| <= RTOL * max |reference|


def _rel_err(ours: torch.Tensor, ref) -> float:
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    return float((ours.double() - ref).abs().max() / ref.abs().max())


def _case(kind: str):
    """(model, reference model for Captum, input, our target, Captum target)."""
    if kind == "cnn2d":
        model = classifier(dims=2)
        return model, model, torch.randn(2, 2, 16, 16), 1, 1
    if kind == "cnn3d":
        model = classifier(dims=3, seed=1)
        return model, model, torch.randn(2, 2, 12, 12, 12), 2, 2
    model = segnet(dims=3, seed=2)
    return model, SpatialMean(model), torch.randn(2, 2, 8, 8, 8), SegmentationTarget(1), 1


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [p.detach().clone() for p in model.parameters()])


def _same_state(model, before) -> bool:
    training, flags, params = _state(model)
    return (training == before[0] and flags == before[1]
            and all(torch.equal(a, b) for a, b in zip(params, before[2])))


def _captum(cls, model, *args):
    """A Captum attribution object for ``model`` in eval mode (restored by the caller)."""
    model.eval()
    return cls(model, *args)


# ---------------------------------------------------------------------------
# integrated gradients


@pytest.mark.parametrize("kind", ["cnn2d", "cnn3d", "seg3d"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("baseline", ["zeros", "tensor"])
def test_ig_matches_captum(kind, rule, baseline):
    torch.manual_seed(0)
    model, ref_model, x, target, ref_target = _case(kind)
    base = torch.randn(1, *x.shape[1:]) * 0.3 if baseline == "tensor" else "zeros"
    before = _state(model)
    ours = explain(model, x, target, ["integrated_gradients"],
                   {"integrated_gradients": {"steps": 7, "rule": rule, "baseline": base}})["integrated_gradients"]
    assert _same_state(model, before)
    ref = _captum(captum_attr.IntegratedGradients, ref_model).attribute(
        x, baselines=None if baseline == "zeros" else base.expand_as(x), target=ref_target,
        n_steps=7, method=rule)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert _rel_err(ours, ref) <= RTOL


def test_quadrature_matches_captum_numbers():
    from captum.attr._utils.approximation_methods import approximation_parameters

    for rule in RULES:
        step_sizes, alphas = approximation_parameters(rule)
        ours_alphas, ours_weights = quadrature(rule, 9)
        assert ours_alphas == alphas(9) and ours_weights == step_sizes(9)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_ig_completeness_with_gauss_legendre(batchnorm):
    torch.manual_seed(3)
    model = classifier(dims=3, batchnorm=batchnorm, seed=3)
    x = torch.randn(2, 2, 10, 10, 10)
    for baseline in ("zeros", "min", 0.5):
        ig = explain(model, x, 0, ["integrated_gradients"],
                     {"integrated_gradients": {"steps": 64, "rule": "gausslegendre", "baseline": baseline}})
        model.eval()
        with torch.no_grad():
            x0 = {"zeros": torch.zeros_like(x), "min": x.flatten(1).amin(1).view(-1, 1, 1, 1, 1).expand_as(x),
                  0.5: torch.full_like(x, 0.5)}[baseline]
            delta = model(x)[:, 0] - model(x0)[:, 0]
        model.train()
        total = ig["integrated_gradients"].flatten(1).sum(1)
        assert torch.all((total - delta).abs() <= 0.01 * delta.abs()), (baseline, total, delta)


@pytest.mark.parametrize("rule", RULES)
def test_ig_exact_on_a_linear_model(rule):
    torch.manual_seed(4)
    model = linear((2, 6, 6), classes=3)
    x, x0 = torch.randn(3, 2, 6, 6), torch.randn(2, 6, 6)
    steps = 5
    ig = explain(model, x, 2, ["integrated_gradients"],
                 {"integrated_gradients": {"steps": steps, "rule": rule, "baseline": x0}})["integrated_gradients"]
    w = model[1].weight[2].detach().view(2, 6, 6)
    # Captum's trapezoid weights (kept for agreement) sum to (steps - 1) / steps.
    scale = (steps - 1) / steps if rule == "riemann_trapezoid" else 1.0
    torch.testing.assert_close(ig, (x - x0) * w * scale, rtol=1e-5, atol=1e-6)


def test_ig_chunking_gives_the_same_result():
    torch.manual_seed(5)
    model, x = segnet(dims=3, seed=5), torch.randn(3, 2, 8, 8, 8)
    opts = {"integrated_gradients": {"steps": 10, "rule": "riemann_middle", "baseline": "max"}}
    target = SegmentationTarget(2, region="predicted")
    one = explain(model, x, target, ["integrated_gradients"], opts, batch_size=1000)["integrated_gradients"]
    by3 = explain(model, x, target, ["integrated_gradients"], opts, batch_size=3)["integrated_gradients"]
    small = explain(model, x, target, ["integrated_gradients"], opts, memory_budget="300KB")
    torch.testing.assert_close(by3, one, rtol=1e-5, atol=1e-6 * one.abs().max().item())
    torch.testing.assert_close(small["integrated_gradients"], one, rtol=1e-5, atol=1e-6 * one.abs().max().item())


def test_ig_baselines():
    torch.manual_seed(6)
    model, x = classifier(dims=2, seed=6), torch.randn(2, 2, 16, 16)
    opts = lambda b: {"integrated_gradients": {"steps": 4, "rule": "gausslegendre", "baseline": b}}  # noqa: E731
    run = lambda b: explain(model, x, 0, ["integrated_gradients"], opts(b))["integrated_gradients"]  # noqa: E731
    blurred = torch.from_numpy(ndimage.gaussian_filter(x.double().numpy(), (0, 0, 1.5, 1.5), mode="constant"))
    torch.testing.assert_close(run("blur:1.5"), run(blurred.float()), rtol=1e-4, atol=1e-6)
    lows = x.flatten(1).amin(1).view(2, 1, 1, 1).expand_as(x)
    torch.testing.assert_close(run("min"), run(lows.clone()), rtol=0, atol=0)
    torch.testing.assert_close(run(0.0), run("zeros"), rtol=0, atol=0)
    torch.testing.assert_close(run(np.zeros((2, 16, 16), np.float32)), run("zeros"), rtol=0, atol=0)
    assert torch.count_nonzero(run(x.clone())) == 0  # baseline == input: nothing to attribute


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"steps": 2.5}, "steps must be an int"),
    ({"rule": "simpson"}, "unknown rule 'simpson'"),
    ({"rule": "riemann_trapezoid", "steps": 1}, "needs steps >= 2"),
    ({"baseline": "mean"}, "baseline must be one of"),
    ({"baseline": "blur:wide"}, "blur:SIGMA"),
    ({"baseline": float("nan")}, "finite"),
    ({"baseline": torch.zeros(3, 16, 16)}, r"baseline tensor of shape \(3, 16, 16\) does not match"),
    ({"stepz": 3}, "unknown option"),
])
def test_ig_option_errors(options, message):
    model, x = classifier(dims=2), torch.randn(1, 2, 16, 16)
    with pytest.raises((ValueError, TypeError), match=message):
        explain(model, x, 0, ["integrated_gradients"], {"integrated_gradients": options})


# ---------------------------------------------------------------------------
# Guided IG


def _pair_guided_ig(model, x, cls, baseline=None, **kwargs):
    """PAIR's GuidedIG on one sample (C, *spatial), the model's gradients in float32."""
    def call_model(batch, call_model_args=None, expected_keys=None):
        t = torch.tensor(batch, dtype=torch.float32, requires_grad=True)
        out = model(t)
        score = out.flatten(2).mean(2)[:, cls] if out.ndim > 2 else out[:, cls]
        grad, = torch.autograd.grad(score.sum(), t)
        return {saliency.INPUT_OUTPUT_GRADIENTS: grad.numpy()}

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's deprecated quantile(interpolation=...)
        return saliency.GuidedIG().GetMask(x.numpy(), call_model, x_baseline=baseline, **kwargs)


@pytest.mark.parametrize("kind", ["cnn2d", "cnn3d", "seg3d"])
def test_guided_ig_matches_pair(kind):
    torch.manual_seed(7)
    model, _, x, target, cls = _case(kind)
    x[0, :, :3] = 0.0  # features equal to the baseline take the reference's special path
    steps, options = 24, {"fraction": 0.3, "max_dist": 0.05}
    ours = explain(model, x, target, ["guided_ig"], {"guided_ig": {"steps": steps, **options}})["guided_ig"]
    for i in range(x.shape[0]):
        ref = _pair_guided_ig(model, x[i], cls, x_steps=steps, **options)
        assert _rel_err(ours[i], ref) <= 1e-3
    model.train()


def test_guided_ig_matches_pair_with_a_tensor_baseline():
    torch.manual_seed(8)
    model, x = classifier(dims=2, seed=8), torch.randn(1, 2, 12, 12)
    base = torch.randn(1, 2, 12, 12) * 0.5
    ours = explain(model, x, 0, ["guided_ig"], {"guided_ig": {"steps": 30, "baseline": base}})["guided_ig"]
    ref = _pair_guided_ig(model, x[0], 0, baseline=base[0].numpy(), x_steps=30)
    assert _rel_err(ours[0], ref) <= 1e-3
    model.train()


def test_guided_ig_is_exact_on_a_linear_model():
    torch.manual_seed(12)
    model, x, x0 = linear((2, 6, 6)), torch.randn(2, 2, 6, 6), torch.randn(2, 2, 6, 6)
    ours = explain(model, x, 1, ["guided_ig"], {"guided_ig": {"steps": 10, "baseline": x0}})["guided_ig"]
    # Every feature travels its whole way under a constant gradient, whatever the path.
    w = model[1].weight[1].detach().view(2, 6, 6)
    torch.testing.assert_close(ours, (x - x0) * w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{"max_dist": 0.0}, {"fraction": 1.0}])
def test_guided_ig_is_ig_on_the_straight_path(options):
    torch.manual_seed(9)
    model, x = classifier(dims=3, seed=9), torch.randn(2, 2, 8, 8, 8)
    maps = explain(model, x, 1, ["guided_ig", "integrated_gradients"],
                   {"guided_ig": {"steps": 16, **options},
                    "integrated_gradients": {"steps": 16, "rule": "riemann_left"}})
    torch.testing.assert_close(maps["guided_ig"], maps["integrated_gradients"], rtol=1e-4,
                               atol=1e-5 * maps["integrated_gradients"].abs().max().item())


def test_guided_ig_options_and_zero_rows():
    model, x = classifier(dims=2), torch.randn(2, 2, 8, 8)
    out = explain(model, x, 0, ["guided_ig"], {"guided_ig": {"steps": 5, "baseline": x[:1].clone()}})
    assert torch.count_nonzero(out["guided_ig"][0]) == 0 and torch.count_nonzero(out["guided_ig"][1]) > 0
    for bad, message in [({"fraction": 1.5}, "fraction must be in"), ({"max_dist": -0.1}, "max_dist must be in"),
                         ({"steps": 0}, "steps must be"), ({"baseline": "none"}, "baseline must be")]:
        with pytest.raises(ValueError, match=message):
            explain(model, x, 0, ["guided_ig"], {"guided_ig": bad})


# ---------------------------------------------------------------------------
# SmoothGrad


def _noise_draws(seed: int, salt: str, rows: int, row_shape):
    """The noise SmoothGrad draws for ``rows`` copies (sample-major), recreated from the seed."""
    generator = seeded_generator(seed, salt)
    return [torch.randn(row_shape, generator=generator) for _ in range(rows)]


def _pair_smoothed(mask_method, x, noise, stdev_spread, magnitude):
    """PAIR's GetSmoothedMask on one sample, its np.random.normal replaced by our draws."""
    draws = iter(noise)
    original = saliency.base.np.random.normal
    saliency.base.np.random.normal = lambda loc, scale, size: scale * next(draws).double().numpy()
    try:
        return mask_method.GetSmoothedMask(x.numpy(), None, stdev_spread=stdev_spread, nsamples=len(noise),
                                           magnitude=magnitude)
    finally:
        saliency.base.np.random.normal = original


class _CaptumMask(saliency.CoreSaliency):
    """A PAIR saliency method whose GetMask is a Captum attribution of one sample."""

    def __init__(self, attribution, **kwargs):
        self.attribution, self.kwargs = attribution, kwargs

    def GetMask(self, x_value, call_model_function=None, call_model_args=None):
        x = torch.tensor(x_value, dtype=torch.float32)[None].requires_grad_(True)
        return self.attribution.attribute(x, **self.kwargs)[0].detach().double().numpy()


@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("kind", ["cnn2d", "seg3d"])
def test_smoothgrad_matches_pair_semantics(kind, magnitude):
    torch.manual_seed(10)
    model, ref_model, x, target, cls = _case(kind)
    samples, level, seed = 4, 0.2, 3
    ours = explain(model, x, target, ["smoothgrad"],
                   {"smoothgrad": {"samples": samples, "noise_level": level, "magnitude": magnitude}},
                   seed=seed, batch_size=3)["smoothgrad"]
    noise = _noise_draws(seed, "smoothgrad", x.shape[0] * samples, x.shape[1:])
    saliency_map = _CaptumMask(_captum(captum_attr.Saliency, ref_model), target=cls, abs=False)
    for i in range(x.shape[0]):
        ref = _pair_smoothed(saliency_map, x[i], noise[i * samples:(i + 1) * samples], level, magnitude)
        assert _rel_err(ours[i], ref) <= RTOL
    model.train()


def test_smoothgrad_ig_matches_pair_semantics():
    torch.manual_seed(11)
    model, x = classifier(dims=2, seed=11), torch.randn(2, 2, 12, 12)
    samples, seed = 3, 5
    ours = explain(model, x, 2, ["smoothgrad_ig"],
                   {"smoothgrad_ig": {"samples": samples, "base_options": {"steps": 6, "rule": "riemann_middle"}}},
                   seed=seed)["smoothgrad_ig"]
    noise = _noise_draws(seed, "smoothgrad_ig", x.shape[0] * samples, x.shape[1:])
    ig = _CaptumMask(_captum(captum_attr.IntegratedGradients, model), target=2, n_steps=6, method="riemann_middle")
    for i in range(x.shape[0]):
        ref = _pair_smoothed(ig, x[i], noise[i * samples:(i + 1) * samples], 0.15, False)
        assert _rel_err(ours[i], ref) <= RTOL
    model.train()


@pytest.mark.parametrize("base, base_options", [("vanilla_gradient", None), ("gradient_x_input", None),
                                                ("integrated_gradients", {"steps": 5})])
def test_smoothgrad_without_noise_is_its_base(base, base_options):
    model, x = classifier(dims=3), torch.randn(2, 2, 8, 8, 8)
    options = {"smoothgrad": {"base": base, "base_options": base_options, "noise_level": 0.0, "samples": 3},
               base: base_options or {}}
    maps = explain(model, x, 0, ["smoothgrad", base], options)
    assert torch.equal(maps["smoothgrad"], maps[base])
    squared = explain(model, x, 0, ["smoothgrad"],
                      {"smoothgrad": {**options["smoothgrad"], "magnitude": True}})["smoothgrad"]
    assert torch.equal(squared, maps[base] ** 2)


class _HalfSquare(torch.nn.Module):
    """F(x) = sum(x^2) / 2 per row, so dF/dx = x: a vanilla gradient shows the point it was taken at."""

    def forward(self, x):
        return 0.5 * (x * x).flatten(1).sum(1, keepdim=True)


def test_smoothgrad_noise_scale_is_rounded_once_as_the_references_do():
    # sigma = float32(noise_level * (max - min)) with the product in float64 (Python floats in Captum and
    # PAIR): a float32 noise level is one rounding more, enough to move an ill-conditioned net's map
    x = torch.linspace(0.0, 0.37, 12).reshape(1, 1, 3, 4)  # range 0.37: 0.15 * 0.37 rounds apart
    level, samples = 0.15, 4
    ours = explain(_HalfSquare(), x, 0, ["smoothgrad"], {"smoothgrad": {"samples": samples, "noise_level": level}},
                   seed=2)["smoothgrad"]
    sigma = torch.tensor(level * float(x.max() - x.min()), dtype=torch.float32)
    assert sigma != torch.tensor(level, dtype=torch.float32) * (x.max() - x.min())  # the case tells them apart
    noise = _noise_draws(2, "smoothgrad", samples, x.shape[1:])
    expected = torch.stack([x[0] + sigma * n for n in noise]).sum(0) / samples
    assert torch.equal(ours[0], expected)


def test_smoothgrad_seed_and_batching():
    model, x = segnet(dims=3), torch.randn(2, 2, 8, 8, 8)
    target, opts = SegmentationTarget(0), {"smoothgrad": {"samples": 5}}
    a = explain(model, x, target, ["smoothgrad"], opts, seed=1)["smoothgrad"]
    b = explain(model, x, target, ["smoothgrad"], opts, seed=1)["smoothgrad"]
    c = explain(model, x, target, ["smoothgrad"], opts, seed=2)["smoothgrad"]
    d = explain(model, x, target, ["smoothgrad"], opts, seed=1, batch_size=2)["smoothgrad"]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(d, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_smoothgrad_options():
    from voxplain import SmoothGrad, SmoothGradIG, create_method
    from voxplain.methods.integrated_gradients import IntegratedGradients

    sg = create_method("smoothgrad_ig", {"base_options": {"steps": 7}})
    assert isinstance(sg, SmoothGradIG) and sg.base.steps == 7 and sg.options()["base"] == "integrated_gradients"
    smoothed_ig = SmoothGrad(base=IntegratedGradients(steps=3))
    assert smoothed_ig.base.steps == 3
    assert smoothed_ig.options()["base_options"] == {"steps": 3, "rule": "gausslegendre", "baseline": "zeros"}
    for bad, message in [({"base": "nope"}, "unknown method 'nope'"),
                         ({"base_options": {"stepz": 1}}, "unknown option"),
                         ({"noise_level": -1}, "noise_level must be"),
                         ({"samples": 0}, "samples must be"),
                         ({"magnitude": "yes"}, "magnitude must be")]:
        with pytest.raises((ValueError, TypeError), match=message):
            create_method("smoothgrad", bad)
    with pytest.raises(ValueError, match="base_options"):
        SmoothGrad(base=IntegratedGradients(), base_options={"steps": 3})


@pytest.mark.skipif("gradcam" not in available_methods(), reason="gradcam not registered")
def test_smoothgrad_over_a_single_channel_base():
    model, x = classifier(dims=2), torch.randn(2, 2, 16, 16)
    opts = {"smoothgrad": {"base": "gradcam", "noise_level": 0.0}}
    maps = explain(model, x, ClassTarget(1), ["smoothgrad", "gradcam"], opts)
    assert maps["smoothgrad"].shape == (2, 1, 16, 16)
    assert torch.equal(maps["smoothgrad"], maps["gradcam"])
    noisy = explain(model, x, 1, ["smoothgrad"], {"smoothgrad": {"base": "gradcam", "samples": 3}})
    assert noisy["smoothgrad"].shape == (2, 1, 16, 16)


def test_per_sample_baseline_serves_noisy_copies():
    torch.manual_seed(13)
    model, x = classifier(dims=2, seed=13), torch.randn(2, 2, 12, 12)
    base = torch.randn(2, 2, 12, 12)  # one baseline per original sample
    ig_opts = {"steps": 4, "rule": "gausslegendre", "baseline": base}
    maps = explain(model, x, 0, ["smoothgrad_ig", "integrated_gradients"],
                   {"smoothgrad_ig": {"base_options": ig_opts, "noise_level": 0.0}, "integrated_gradients": ig_opts})
    assert torch.equal(maps["smoothgrad_ig"], maps["integrated_gradients"])
    noisy = explain(model, x, 0, ["smoothgrad_ig"], {"smoothgrad_ig": {"base_options": ig_opts, "samples": 3}},
                    batch_size=2, seed=4)["smoothgrad_ig"]
    noise = _noise_draws(4, "smoothgrad_ig", 6, x.shape[1:])
    ig = _captum(captum_attr.IntegratedGradients, model)
    for i in range(2):
        sigma = 0.15 * (x[i].max() - x[i].min())
        copies = torch.stack([x[i] + sigma * n for n in noise[3 * i:3 * i + 3]])
        ref = ig.attribute(copies, baselines=base[i:i + 1].expand_as(copies), target=0, n_steps=4,
                           method="gausslegendre").mean(0)
        assert _rel_err(noisy[i], ref) <= RTOL
    model.train()


# ---------------------------------------------------------------------------
# integrated gradients with steps="auto"


def test_auto_steps_are_the_fewest_doublings_within_the_tolerance():
    from voxplain import explain_detailed
    from voxplain.methods.completeness import completeness

    model = classifier(dims=2, seed=4)
    x = torch.randn(3, 2, 12, 12, generator=torch.Generator().manual_seed(4))
    tolerance = 0.003
    out = explain_detailed(model, x, 1, ["integrated_gradients"],
                           {"integrated_gradients": {"steps": "auto", "tolerance": tolerance}})
    extras, got = out.extras["integrated_gradients"], out.maps["integrated_gradients"]
    with torch.no_grad():
        fx, f0 = model.eval()(x)[:, 1], model(torch.zeros_like(x))[:, 1]
    for i, used in enumerate(extras["steps_used"]):
        # the same steps with a fixed count give the same map, and every smaller doubling misses the tolerance
        fixed = explain(model, x[i:i + 1], 1, ["integrated_gradients"],
                        {"integrated_gradients": {"steps": used}})["integrated_gradients"]
        torch.testing.assert_close(got[i:i + 1], fixed, rtol=1e-5, atol=1e-7)
        assert extras["completeness"]["error"][i] <= tolerance or used == 256  # the default cap
        n = used // 2
        while n >= 4:
            smaller = explain(model, x[i:i + 1], 1, ["integrated_gradients"],
                              {"integrated_gradients": {"steps": n}})["integrated_gradients"]
            assert completeness(smaller, fx[i:i + 1], f0[i:i + 1])["error"][0] > tolerance
            n //= 2
    assert len(set(extras["steps_used"])) > 1  # chosen per sample


def test_auto_steps_stop_at_the_cap_and_say_so():
    from voxplain import explain_detailed

    model = classifier(dims=2, seed=2)
    x = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(5))
    with pytest.warns(RuntimeWarning, match="stopped at its cap of 8"):
        out = explain_detailed(model, x, 1, ["integrated_gradients"],
                               {"integrated_gradients": {"steps": "auto", "tolerance": 1e-6, "max_steps": 8}})
    assert out.extras["integrated_gradients"]["steps_used"] == [8]
    assert out.options["integrated_gradients"]["steps"] == "auto"
    from voxplain.report import methods_summary  # what summary.json says

    summary = methods_summary(out)["integrated_gradients"]
    assert summary["steps_used"] == [8] and summary["options"]["steps"] == "auto"


def test_auto_steps_options_are_checked():
    from voxplain import create_method

    for bad in ({"steps": "many"}, {"steps": "auto", "tolerance": 0}, {"steps": "auto", "tolerance": 1.5},
                {"steps": "auto", "max_steps": 2}):
        with pytest.raises(ValueError):
            create_method("integrated_gradients", bad)


def test_path_methods_alone_take_no_graph_at_the_input_and_no_size_forward():
    # the forward that fixes the target serves no gradient here: it runs without a graph, and it
    # sizes the row for the chunking, so no forward of its own is needed for that
    model = classifier(dims=2)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append((i[0].shape[0], torch.is_grad_enabled())))
    try:
        explain(model, torch.randn(1, 2, 12, 12), 0, ["integrated_gradients"],
                {"integrated_gradients": {"steps": 4, "rule": "riemann_trapezoid"}})
    finally:
        handle.remove()
    assert calls == [(1, False), (4, True)]


def test_auto_steps_with_the_nested_rule_reuse_every_gradient():
    from voxplain import explain_detailed
    from voxplain.methods.completeness import completeness

    model = classifier(dims=2, seed=4)
    x = torch.randn(3, 2, 12, 12, generator=torch.Generator().manual_seed(4))
    tolerance = 0.003
    out = explain_detailed(model, x, 1, ["integrated_gradients"],
                           {"integrated_gradients": {"steps": "auto", "rule": "nested", "tolerance": tolerance}})
    extras, got = out.extras["integrated_gradients"], out.maps["integrated_gradients"]
    with torch.no_grad():
        fx, f0 = model.eval()(x)[:, 1], model(torch.zeros_like(x))[:, 1]
    for i, used in enumerate(extras["steps_used"]):
        assert used in (3, 7, 15, 31, 63, 127, 255)
        assert extras["passes"][i] == used  # each doubling evaluated only the new points
        # the same steps with a fixed count give the same map, and every smaller doubling misses the tolerance
        fixed = explain(model, x[i:i + 1], 1, ["integrated_gradients"],
                        {"integrated_gradients": {"steps": used, "rule": "nested"}})["integrated_gradients"]
        torch.testing.assert_close(got[i:i + 1], fixed, rtol=1e-5, atol=1e-7)
        assert extras["completeness"]["error"][i] <= tolerance or used == 255
        n = (used - 1) // 2
        while n >= 3:
            smaller = explain(model, x[i:i + 1], 1, ["integrated_gradients"],
                              {"integrated_gradients": {"steps": n, "rule": "nested"}})["integrated_gradients"]
            assert completeness(smaller, fx[i:i + 1], f0[i:i + 1])["error"][0] > tolerance
            n = (n - 1) // 2
    # Gauss-Legendre's doublings cannot reuse points: every step count tried is paid for
    gl = explain_detailed(model, x, 1, ["integrated_gradients"],
                          {"integrated_gradients": {"steps": "auto", "tolerance": tolerance}}).extras
    for used, passes in zip(gl["integrated_gradients"]["steps_used"], gl["integrated_gradients"]["passes"]):
        assert passes == sum(4 * 2 ** k for k in range(8) if 4 * 2 ** k <= used)


def test_nested_rule_integrates_smooth_functions_to_high_order():
    from voxplain.methods.integrated_gradients import quadrature

    for steps, limit in ((7, 1e-5), (15, 1e-7)):
        alphas, weights = quadrature("nested", steps)
        assert 0 < alphas[0] and alphas[-1] < 1 and abs(sum(weights) - 1) < 1e-12
        assert abs(sum(w * math.exp(a) for a, w in zip(alphas, weights)) - (math.e - 1)) < limit
    # the points of 2 * (steps + 1) - 1 steps include those of steps
    coarse, fine = quadrature("nested", 7)[0], quadrature("nested", 15)[0]
    assert all(min(abs(c - f) for f in fine) < 1e-12 for c in coarse)
