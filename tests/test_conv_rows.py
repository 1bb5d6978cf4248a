"""One-row 3D convolutions run as two rows on the CPU: same maps, same model, only where it pays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam, Saliency
from torch import nn
from torch.overrides import TorchFunctionMode

from tiny_models import SpatialMean, segnet
from voxplain import SegmentationTarget, explain
from voxplain.conv_rows import OneRowConvolutions, available
from voxplain.engine import Engine

pytestmark = pytest.mark.skipif(not available(), reason="PyTorch built without oneDNN: nothing is padded")


class _Rows(TorchFunctionMode):
    """Records the rows every 3D convolution runs on. Opened outside voxplain's own mode, it sees
    the calls that mode passes on (modes hand calls down their stack)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.conv3d or func is torch.conv_transpose3d:
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def _conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 1),
                         nn.ConvTranspose3d(8, 4, 2, stride=2), nn.ReLU(), nn.AdaptiveAvgPool3d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


def test_same_values_and_gradients_as_one_row():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 32, 32, 32, requires_grad=True)
    w, wt = torch.randn(8, 4, 3, 3, 3), torch.randn(8, 4, 3, 3, 3)
    plain = F.conv_transpose3d(F.conv3d(x, w, padding=1), wt, stride=2)
    g_plain, = torch.autograd.grad(plain.square().sum(), x)
    with OneRowConvolutions():
        padded = F.conv_transpose3d(F.conv3d(x, w, padding=1), wt, stride=2)
    g_padded, = torch.autograd.grad(padded.square().sum(), x)
    assert padded.shape == plain.shape
    assert torch.allclose(padded, plain, rtol=1e-5, atol=1e-5 * float(plain.detach().abs().max()))
    assert torch.allclose(g_padded, g_plain, rtol=1e-5, atol=1e-5 * float(g_plain.abs().max()))


def test_only_slow_large_one_row_convolutions_are_doubled():
    w3, w1 = torch.randn(8, 4, 3, 3, 3), torch.randn(8, 4, 1, 1, 1)
    with torch.no_grad(), _Rows() as calls, OneRowConvolutions():
        torch.conv3d(torch.randn(1, 4, 32, 32, 32), w3, padding=1)  # 3.5 M column entries: doubled
        torch.conv3d(torch.randn(1, 4, 32, 32, 32), w1)  # 1x1x1: no column matrix
        torch.conv3d(torch.randn(1, 4, 8, 8, 8), w3, padding=1)  # 55 K entries: cheap as it is
        torch.conv3d(torch.randn(2, 4, 32, 32, 32), w3, padding=1)  # two rows: PyTorch's fast kernel already
        torch.conv3d(torch.randn(1, 4, 32, 32, 32), w3, padding="same")  # string padding: left alone
    assert calls.rows == [2, 1, 1, 2, 1]


def test_explain_agrees_with_captum_and_pads_the_one_row_pass():
    model = segnet(dims=3, seed=4).eval()
    with torch.no_grad():
        model.head.bias += 0.3
    x = torch.randn(1, 2, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    layer = model.down
    ref_grad = Saliency(SpatialMean(model)).attribute(x, target=1, abs=False)
    cam = LayerGradCam(SpatialMean(model), layer).attribute(x, target=1, relu_attributions=True)
    ref_cam = LayerAttribution.interpolate(cam, (32, 32, 32), interpolate_mode="trilinear")
    with _Rows() as calls:
        ours = explain(model, x, SegmentationTarget(1), methods=["vanilla_gradient", "gradcam"],
                       options={"gradcam": {"layer": "down"}})
    assert 2 in calls.rows  # the one-row pass ran its large convolutions as two rows ...
    for name, ref in (("vanilla_gradient", ref_grad), ("gradcam", ref_cam)):
        rel = float((ours[name] - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-5, f"{name}: {rel:.1e}"  # ... and gave Captum's maps
        assert ours[name].shape[0] == 1


def test_hooks_on_a_convolution_see_one_row_and_the_model_comes_back_unchanged():
    model = _conv_net()
    seen = []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append((i[0].shape[0], o.shape[0])))
    try:
        explain(model, torch.randn(1, 2, 32, 32, 32), 1, methods=["vanilla_gradient"])
    finally:
        handle.remove()
    assert seen and all(rows == (1, 1) for rows in seen)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert not torch.overrides._is_torch_function_mode_enabled()


def test_a_row_too_large_to_double_is_not_padded():
    model = _conv_net()
    x = torch.randn(1, 2, 32, 32, 32)
    with Engine(model) as engine:
        per_row = engine._estimate_row_bytes(tuple(x.shape[1:]))
    with _Rows() as calls, Engine(model, memory_budget=int(1.5 * per_row)) as engine:
        engine.forward(x)
    assert calls.rows and max(calls.rows) == 1
    with _Rows() as calls, Engine(model, memory_budget=3 * per_row) as engine:
        engine.forward(x)
    assert max(calls.rows) == 2


def test_no_padding_under_sliding_windows():
    # their memory budget counts one window batch once: doubling its convolutions is not budgeted
    from voxplain.sliding_window import SlidingWindow

    model = segnet(dims=3)
    with _Rows() as calls, Engine(model) as engine:
        engine.forward(torch.randn(1, 2, 32, 32, 32))
    assert max(calls.rows) == 2  # the same window alone is padded ...
    with _Rows() as calls, Engine(model, sliding_window=SlidingWindow((32, 32, 32), overlap=0.5,
                                                                     sw_batch_size=1)) as engine:
        engine.forward(torch.randn(1, 2, 48, 32, 32))
    assert calls.rows and max(calls.rows) == 1  # ... but not as a sliding window
