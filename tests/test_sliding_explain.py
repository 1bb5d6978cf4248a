"""Explanations of a patch-trained model applied by sliding windows: every entry point, every method.

The references are autograd through MONAI's own ``sliding_window_inference`` on the
whole volume (vanilla gradient, IG) and MONAI's blending of per-window CAMs (Grad-CAM).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from monai.inferers import sliding_window_inference
from torch import nn

import voxplain
from tiny_models import classifier, segnet
from voxplain import SegmentationTarget, explain_detailed, gradcam_per_layer
from voxplain.engine import Engine
from voxplain.methods import available_methods
from voxplain.methods.gradcam import cam_from_gradients, upsample_cam
from voxplain.methods.integrated_gradients import quadrature
from voxplain.run import open_run
from voxplain.sliding_window import SlidingWindow

SW = {"roi_size": (16, 16, 16), "overlap": 0.5, "mode": "gaussian"}


def _model():
    return segnet(dims=3, in_channels=2, classes=3, seed=3).eval()


def _volume(shape=(24, 20, 16), seed=0):
    return torch.randn((1, 2) + shape, generator=torch.Generator().manual_seed(seed))


def _mask(shape=(24, 20, 16)):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[4:15, 3:12, 2:10] = True
    return mask


def _score(output: str, mask, k=1):
    def score(y):
        channel = y[:, k] if output == "logit" else torch.softmax(y, dim=1)[:, k]
        return (channel * mask).flatten(1).sum(1) / mask.sum()
    return score


def _monai_input_gradient(model, x, score):
    leaf = x.clone().requires_grad_(True)
    y = sliding_window_inference(leaf, SW["roi_size"], 1, model, overlap=SW["overlap"], mode=SW["mode"])
    (grad,) = torch.autograd.grad(score(y).sum(), leaf)
    return grad


def _rel(ours, ref):
    return float((ours - ref).abs().max() / ref.abs().max())


@contextlib.contextmanager
def _calls(model: nn.Module):
    seen = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("output", ["probability", "logit"])  # a nonlinear score, and an affine one (one pass)
def test_vanilla_gradient_and_ig_equal_autograd_through_monai(output):
    model, x, mask = _model(), _volume(), _mask()
    target = SegmentationTarget(1, region=mask, output=output)
    steps = 4
    maps = voxplain.explain(model, x, target, methods=["vanilla_gradient", "integrated_gradients"],
                            options={"integrated_gradients": {"steps": steps}}, sliding_window=SW, batch_size=3)
    score = _score(output, mask)
    assert _rel(maps["vanilla_gradient"], _monai_input_gradient(model, x, score)) <= 1e-5
    alphas, weights = quadrature("gausslegendre", steps)
    ig = x * sum(w * _monai_input_gradient(model, a * x, score) for a, w in zip(alphas, weights))
    assert _rel(maps["integrated_gradients"], ig) <= 1e-5


def test_gradcam_is_the_per_window_cam_blended_like_the_outputs():
    """The default layer is chosen on one window (the decoder feature map); its CAM per window, with the exact
    gradient of the whole-volume score, blended by MONAI's own sliding_window_inference."""
    model, x, mask = _model(), _volume(seed=5), _mask()
    score = _score("probability", mask, k=2)
    acts = []
    handle = model.dec.register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        leaf = x.clone().requires_grad_(True)
        y = sliding_window_inference(leaf, SW["roi_size"], 1, model, overlap=0.5, mode="gaussian")
        grads = torch.autograd.grad(score(y).sum(), acts)
    finally:
        handle.remove()
    cams = iter([upsample_cam(cam_from_gradients(a.detach(), g), SW["roi_size"]) for a, g in zip(acts, grads)])
    with torch.no_grad():
        ref = sliding_window_inference(x, SW["roi_size"], 1, lambda p: next(cams), overlap=0.5, mode="gaussian")
    ours = voxplain.explain(model, x, SegmentationTarget(2, region=mask, output="probability"),
                            methods=["gradcam"], sliding_window=SW)["gradcam"]
    assert ref.abs().max() > 0 and _rel(ours, ref) <= 1e-5
    layers = gradcam_per_layer(model, x, SegmentationTarget(2, region=mask, output="probability"),
                               layers=["dec"], sliding_window=SW)
    assert _rel(layers["dec"], ref) <= 1e-5


def test_every_method_runs_under_sliding_windows_and_the_model_comes_back_unchanged():
    model, x = segnet(dims=3, in_channels=2, classes=3, seed=1).train(), _volume((10, 10, 8), seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"integrated_gradients": {"steps": 2}, "guided_ig": {"steps": 2}, "blur_ig": {"steps": 2},
               "smoothgrad": {"samples": 2}, "smoothgrad_ig": {"samples": 2, "base_options": {"steps": 2}},
               "xrai": {"steps": 2, "min_pixel_diff": 1}, "occlusion": {"window": 5}}
    result = explain_detailed(model, x, SegmentationTarget(1), methods=available_methods(), options=options,
                              sliding_window={"roi_size": (8, 8, 8), "overlap": 0.25, "mode": "constant",
                                              "sw_batch_size": 2})
    for name, m in result.maps.items():
        assert m.shape[0] == 1 and m.shape[2:] == x.shape[2:] and m.shape[1] in (1, 2), name
        assert torch.isfinite(m).all() and m.abs().max() > 0, name
    assert model.training and all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_one_window_over_the_whole_volume_gives_every_method_the_plain_result():
    """With the window the size of the volume (constant blending) the stitched output is the model's output:
    every method must give what it gives without sliding windows."""
    model, x = segnet(dims=3, in_channels=2, classes=3, seed=4).eval(), _volume((8, 8, 8), seed=3)
    options = {"integrated_gradients": {"steps": 3}, "guided_ig": {"steps": 3},
               "blur_ig": {"steps": 4, "max_sigma": 2.0},  # not blurred flat at once: a map above rounding noise
               "smoothgrad": {"samples": 2}, "smoothgrad_ig": {"samples": 2, "base_options": {"steps": 2}},
               "xrai": {"steps": 2, "min_pixel_diff": 1}, "occlusion": {"window": 4}}
    target = SegmentationTarget(2, output="probability")
    plain = explain_detailed(model, x, target, methods=available_methods(), options=options).maps
    windowed = explain_detailed(model, x, target, methods=available_methods(), options=options,
                                sliding_window={"roi_size": (8, 8, 8), "mode": "constant"}).maps
    for name in plain:
        if name == "occlusion":  # score drops of ~1e-4 from scores of ~0.3: float32 rounding of the scores
            torch.testing.assert_close(windowed[name], plain[name], rtol=0, atol=1e-7)
        else:
            assert _rel(windowed[name], plain[name]) <= 1e-5, name


def test_no_recorded_first_pass_and_memory_bounded_by_one_window_batch():
    model, x = _model(), _volume()
    sw = SlidingWindow(SW["roi_size"], overlap=0.5, sw_batch_size=2)
    with _calls(model) as seen:
        with open_run(model, x, SegmentationTarget(1), sliding_window=sw, memory_budget="64MB") as run:
            assert run._input.first is None and run.output.shape == (1, 3, 24, 20, 16)
            run.gradients(x.repeat(5, 1, 1, 1, 1), torch.zeros(5, dtype=torch.long))
            per_pass = run.engine.rows_per_pass(tuple(x.shape[1:]))
    assert max(s[0] for s in seen) <= 2 and {s[2:] for s in seen} == {(16, 16, 16)}
    # the budget minus one window batch's need, over each row's volume-sized buffers
    engine = Engine(model, memory_budget="64MB", sliding_window=sw)
    with engine:
        window_need = 2 * engine._estimate_row_bytes((2, 16, 16, 16))
        per_row = 4 * (24 * 20 * 16) * (4 * 2 + 3 * 3 + 2)
        assert engine.rows_per_pass((2, 24, 20, 16)) == per_pass == (64 * 2**20 - window_need) // per_row


def test_windows_the_region_does_not_reach_are_not_run_for_an_affine_score():
    """A logit mean over a small region near one corner: only the windows covering it run (one pass)."""
    model, x = _model(), _volume((32, 32, 16))
    mask = torch.zeros(32, 32, 16, dtype=torch.bool)
    mask[1:4, 1:4, 2:5] = True
    target = SegmentationTarget(0, region=mask)  # logits: affine in the output
    with open_run(model, x, target, sliding_window=SW) as run:
        with _calls(model) as seen:
            grads = run.gradients(x, torch.zeros(1, dtype=torch.long))
    assert len(seen) == 1  # 9 windows on the volume, one covers the region
    assert _rel(grads.inputs, _monai_input_gradient(model, x, _score("logit", mask, k=0))) <= 1e-5


def test_sliding_window_settings_are_checked_and_classifiers_refused():
    model, x = _model(), _volume()
    with pytest.raises(ValueError, match="roi_size"):
        voxplain.explain(model, x, SegmentationTarget(1), methods=["vanilla_gradient"],
                         sliding_window={"roi": (16, 16, 16)})
    with pytest.raises(TypeError, match="sliding_window"):
        voxplain.explain(model, x, SegmentationTarget(1), methods=["vanilla_gradient"], sliding_window=(16, 16, 16))
    net = classifier(dims=3)
    with pytest.raises(ValueError, match=r"\(b, K, \*roi\)"):
        voxplain.explain(net, _volume((16, 16, 16)), 0, methods=["vanilla_gradient"], sliding_window=SW)
    assert all(not m._forward_hooks for m in net.modules())


def test_inspection_under_sliding_windows_traces_one_window():
    model, x = _model(), _volume()
    with open_run(model, x, SegmentationTarget(1), sliding_window=SW) as run:
        shapes = {info.name: info.output_shape for info in run.trace()}
        activations = run.layer_outputs([model.dec])[0]
    assert shapes["head"] == (1, 3, 16, 16, 16) and activations.shape == (1, 4, 16, 16, 16)
    cams = gradcam_per_layer(model, x, SegmentationTarget(1), sliding_window=SW)
    assert list(cams) and all(c.shape == (1, 1, 24, 20, 16) for c in cams.values())
    with pytest.raises(ValueError, match="upsample=False"):
        gradcam_per_layer(model, x, SegmentationTarget(1), sliding_window=SW, upsample=False)


def test_a_budget_one_window_batch_cannot_fit_is_refused_before_it_runs():
    from voxplain.memory import MemoryBudgetError

    model, x = _model(), _volume()
    with pytest.raises(MemoryBudgetError, match="window.*sw_batch_size"):
        voxplain.explain(model, x.repeat(2, 1, 1, 1, 1), SegmentationTarget(1), methods=["vanilla_gradient"],
                         sliding_window={**SW, "sw_batch_size": 4}, memory_budget="100KB")
    assert all(not m._forward_hooks for m in model.modules())


def test_one_row_smaller_than_its_window_is_still_sized_and_refused_over_budget():
    from voxplain.memory import MemoryBudgetError

    model, x = _model(), _volume((4, 4, 4))  # the row is tiny; the 16^3 window it is padded to is not
    with _calls(model) as seen, pytest.raises(MemoryBudgetError, match="window.*sw_batch_size"):
        voxplain.explain(model, x, SegmentationTarget(1), methods=["vanilla_gradient"], sliding_window=SW,
                         memory_budget="100KB")
    assert all(shape[2:] != (16, 16, 16) or shape[0] == 1 for shape in seen)  # at most the one sizing window
    assert all(not m._forward_hooks for m in model.modules())
