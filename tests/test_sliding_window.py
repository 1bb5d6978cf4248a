"""Sliding-window inference and its patch-by-patch gradients against MONAI's sliding_window_inference."""

from __future__ import annotations

import pytest
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import sliding_window_inference

from tiny_models import segnet
from voxplain.sliding_window import SlidingWindow, window_weight_map


def _model():
    return segnet(dims=3, in_channels=2, classes=3, seed=3).eval()


def _volume(shape=(24, 20, 16), rows=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((rows, 2) + shape, generator=g)


def _region(shape):
    """A fixed box of the output grid: the region target's support."""
    mask = torch.zeros(shape)
    mask[4:15, 3:12, 2:10] = 1
    return mask


def _sigmoid_region_score(mask, k=1):
    """A nonlinear whole-volume score: the mean sigmoid probability of class k over a region."""
    return lambda y: (torch.sigmoid(y[:, k]) * mask).flatten(1).sum(1) / mask.sum()


def _logit_region_score(mask, k=2):
    """An affine score: the mean logit of class k over a region."""
    return lambda y: (y[:, k] * mask).flatten(1).sum(1) / mask.sum()


def _monai_gradient(model, x, score_fn, sw: SlidingWindow):
    leaf = x.clone().requires_grad_(True)
    y = sliding_window_inference(leaf, sw.roi_size, sw.sw_batch_size, model, overlap=sw.overlap, mode=sw.mode,
                                 sigma_scale=sw.sigma_scale, padding_mode=sw.padding_mode, cval=sw.cval)
    scores = score_fn(y)
    (grad,) = torch.autograd.grad(scores.sum(), leaf)
    return y.detach(), scores.detach(), grad


def _assert_rel(ours, ref, rtol=1e-5):
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("sw_batch_size", [1, 3])
def test_window_weights_and_positions_are_monai_s(mode, sw_batch_size):
    roi = (16, 12, 16)
    torch.testing.assert_close(window_weight_map(roi, mode), compute_importance_map(roi, mode=mode), rtol=0, atol=0)
    seen = []

    def predictor(patch, coords):
        seen.extend(tuple((s.start, s.stop) for s in c[2:]) for c in coords)
        return patch[:, :1]

    x = _volume((24, 20, 16), rows=2)
    sliding_window_inference(x, roi, sw_batch_size, predictor, overlap=0.5, mode=mode, with_coord=True)
    sw = SlidingWindow(roi, overlap=0.5, mode=mode, sw_batch_size=sw_batch_size)
    plan = sw.plan(x.shape[2:])
    ours = [tuple((s.start, s.stop) for s in plan.window_slices(w)) for _ in range(2) for w in range(len(plan.windows))]
    assert ours == seen


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_stitched_forward_equals_monai(mode):
    model, x = _model(), _volume(rows=2)
    sw = SlidingWindow(16, overlap=0.5, mode=mode, sw_batch_size=2)
    with torch.no_grad():
        ref = sliding_window_inference(x, 16, 2, model, overlap=0.5, mode=mode)
    ours = sw.forward(model, x)
    assert ours.shape == (2, 3, 24, 20, 16)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_vanilla_gradient_equals_autograd_through_monai(mode):
    model, x = _model(), _volume()
    mask = _region(x.shape[2:])
    score_fn = _sigmoid_region_score(mask)
    sw = SlidingWindow((16, 16, 16), overlap=0.5, mode=mode, sw_batch_size=1)
    y_ref, s_ref, g_ref = _monai_gradient(model, x, score_fn, sw)
    result = sw.gradients(model, x, score_fn)
    _assert_rel(result.inputs, g_ref)
    torch.testing.assert_close(result.scores, s_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(result.output, y_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_integrated_gradients_equal_autograd_through_monai(mode):
    """IG with 4 Gauss-Legendre points: all path points in one call (rows), windows batched across rows."""
    model, x = _model(), _volume(seed=1)
    baseline = torch.zeros_like(x)
    nodes, weights = torch.tensor([0.0694318, 0.3300095, 0.6699905, 0.9305682]), \
        torch.tensor([0.1739274, 0.3260726, 0.3260726, 0.1739274])
    path = baseline + nodes.view(-1, 1, 1, 1, 1) * (x - baseline)
    score_fn = _sigmoid_region_score(_region(x.shape[2:]), k=0)
    sw = SlidingWindow(16, overlap=0.5, mode=mode, sw_batch_size=3)
    _, _, g_ref = _monai_gradient(model, path, score_fn, sw)
    grads = sw.gradients(model, path, score_fn).inputs
    ig_ref = (x - baseline) * (weights.view(-1, 1, 1, 1, 1) * g_ref).sum(0, keepdim=True)
    ig = (x - baseline) * (weights.view(-1, 1, 1, 1, 1) * grads).sum(0, keepdim=True)
    _assert_rel(grads, g_ref)
    _assert_rel(ig, ig_ref)


def test_affine_score_takes_one_pass_and_gives_the_same_gradient():
    model, x = _model(), _volume(rows=2, seed=2)
    score_fn = _logit_region_score(_region(x.shape[2:]))
    sw = SlidingWindow(16, overlap=0.5, mode="gaussian", sw_batch_size=2)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        two_pass = sw.gradients(model, x, score_fn)
        n_two = len(calls)
        one_pass = sw.gradients(model, x, score_fn, affine_score=True)
    finally:
        handle.remove()
    assert len(calls) - n_two == n_two // 2
    _, s_ref, g_ref = _monai_gradient(model, x, score_fn, sw)
    _assert_rel(one_pass.inputs, g_ref)
    _assert_rel(two_pass.inputs, g_ref)
    torch.testing.assert_close(one_pass.scores, s_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate"])
def test_volume_smaller_than_the_window_is_padded_as_monai_pads_it(padding_mode):
    """Axis 1 (10 voxels) is shorter than the window (16): padded 3 before, 3 after; gradient folds back."""
    model, x = _model(), _volume((24, 10, 16), seed=4)
    score_fn = _sigmoid_region_score(_region((24, 10, 16))[:, :10])
    sw = SlidingWindow((16, 16, -1), overlap=(0.5, 0.25, 0.0), mode="gaussian", padding_mode=padding_mode,
                       cval=0.5 if padding_mode == "constant" else 0.0)
    y_ref, _, g_ref = _monai_gradient(model, x, score_fn, sw)
    result = sw.gradients(model, x, score_fn)
    assert sw.plan(x.shape[2:]).pad == ((0, 0), (3, 3), (0, 0))
    torch.testing.assert_close(result.output, y_ref, rtol=1e-6, atol=1e-6)
    _assert_rel(result.inputs, g_ref)


def test_the_model_never_sees_more_than_sw_batch_size_windows():
    model, x = _model(), _volume(rows=3)
    sw = SlidingWindow(16, overlap=0.5, sw_batch_size=2)
    n_windows = len(sw.plan(x.shape[2:]).windows)
    shapes = []
    handle = model.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    try:
        sw.gradients(model, x, _sigmoid_region_score(_region(x.shape[2:])))
    finally:
        handle.remove()
    assert {s[1:] for s in shapes} == {(2, 16, 16, 16)}
    assert max(s[0] for s in shapes) == 2
    # one stitching pass and one gradient pass, each over every window of every row
    assert sum(s[0] for s in shapes) == 2 * 3 * n_windows


def test_gradcam_under_sliding_windows_is_the_blended_per_window_cam():
    """Reference: exact dF/dA per window through MONAI's graph, CAM per window, blended by MONAI itself."""
    from voxplain.methods.gradcam import cam_from_gradients, upsample_cam

    model, x = _model(), _volume(seed=5)
    layer = model.dec
    score_fn = _sigmoid_region_score(_region(x.shape[2:]), k=2)
    sw = SlidingWindow(16, overlap=0.5, mode="gaussian", sw_batch_size=1)
    acts = []
    handle = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        leaf = x.clone().requires_grad_(True)
        y = sliding_window_inference(leaf, 16, 1, model, overlap=0.5, mode="gaussian")
        grads = torch.autograd.grad(score_fn(y).sum(), acts)
    finally:
        handle.remove()
    cams = iter([upsample_cam(cam_from_gradients(a.detach(), g), (16, 16, 16)) for a, g in zip(acts, grads)])
    with torch.no_grad():
        ref = sliding_window_inference(x, 16, 1, lambda p: next(cams), overlap=0.5, mode="gaussian")
    result = sw.gradients(model, x, score_fn, capture=[layer], input_gradient=False)
    assert result.inputs is None
    assert ref.abs().max() > 0
    _assert_rel(result.layer_maps[0], ref)
    assert all(not m._forward_hooks for m in model.modules())


def test_window_outputs_that_are_not_on_the_window_grid_are_refused():
    def classifier(p):
        return p.flatten(2).mean(2)

    with pytest.raises(ValueError, match=r"output \(b, K, \*roi\)"):
        SlidingWindow(8).forward(classifier, _volume((8, 8, 8)))
    with pytest.raises(ValueError, match="overlap"):
        SlidingWindow(8, overlap=1.0).forward(classifier, _volume((8, 8, 8)))
    with pytest.raises(ValueError, match="roi_size"):
        SlidingWindow((8, 8)).forward(classifier, _volume((8, 8, 8)))


def test_two_dimensional_inputs_work_too():
    model = segnet(dims=2, in_channels=2, classes=3, seed=0).eval()
    x = torch.randn(1, 2, 30, 22)
    sw = SlidingWindow((16, 16), overlap=0.25, mode="gaussian")
    score_fn = lambda y: torch.sigmoid(y[:, 1]).mean((1, 2))  # noqa: E731
    _, _, g_ref = _monai_gradient(model, x, score_fn, sw)
    _assert_rel(sw.gradients(model, x, score_fn).inputs, g_ref)
