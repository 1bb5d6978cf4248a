"""The model zoo: every model runs forward and backward on tiny inputs; options are checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from voxplain.models import available_models, build_model
from voxplain.models.convnet import pooling_plan


def _forward_backward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    return out


def test_available_models():
    assert set(available_models()) >= {"cnn2d", "classifier3d", "unet3d"}


@pytest.mark.parametrize("blocks", [3, 5, 7])
@pytest.mark.parametrize("size", [32, 64])
def test_cnn2d_blocks(blocks, size):
    torch.manual_seed(0)
    model = build_model("cnn2d", blocks=blocks, in_channels=3, num_classes=4, image_size=size)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == blocks
    widths = [c.out_channels for c in convs]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    out = _forward_backward(model.train(), torch.randn(2, 3, size, size))
    assert out.shape == (2, 4)


def test_cnn2d_never_pools_to_zero():
    # 7 blocks on 64x64 would need 128 px to pool every block; pools stop at 1 px
    assert pooling_plan(7, (64, 64)) == [True] * 6 + [False]
    model = build_model("cnn2d", blocks=7, image_size=64).eval()
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 6
    # an input smaller than planned still runs (ceil-mode pooling keeps at least 1 px)
    assert model(torch.randn(1, 1, 8, 12)).shape == (1, 2)


@pytest.mark.parametrize("global_pool", ["avg", "max"])
def test_classifier3d(global_pool):
    torch.manual_seed(0)
    model = build_model("classifier3d", image_size=[16, 16, 16], global_pool=global_pool)
    out = _forward_backward(model.train(), torch.randn(2, 4, 16, 16, 16))
    assert out.shape == (2, 2)
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    pool = nn.AdaptiveAvgPool3d if global_pool == "avg" else nn.AdaptiveMaxPool3d
    assert isinstance(model.pool, pool)


@pytest.mark.parametrize("shape", [(16, 16, 16), (17, 20, 13)])
def test_unet3d_any_size(shape):
    torch.manual_seed(0)
    model = build_model("unet3d", channels=[4, 8, 16])
    out = _forward_backward(model.train(), torch.randn(2, 4, *shape))
    assert out.shape == (2, 3, *shape)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(isinstance(m, (nn.InstanceNorm3d, nn.GroupNorm)) for m in model.modules())
    assert all(not getattr(m, "inplace", False) for m in model.modules() if isinstance(m, nn.ReLU))


def test_unet3d_eval_is_affine_between_relus():
    # IG completeness needs eval-mode BatchNorm (no batch statistics): batch rows are independent
    model = build_model("unet3d", channels=[4, 8]).eval()
    x = torch.randn(3, 4, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), atol=1e-5, rtol=1e-4)


def test_build_model_records_config_and_rejects_unknown_options():
    model = build_model("cnn2d", blocks=5, image_size=(32, 32))
    assert model.voxplain_config == {"model": "cnn2d", "model_config": {"blocks": 5, "image_size": [32, 32]}}
    with pytest.raises(ValueError, match="unknown model 'resnet'.*cnn2d"):
        build_model("resnet")
    with pytest.raises(ValueError, match="unknown option.*'depth'"):
        build_model("unet3d", depth=3)


def test_wrong_input_shape_is_named():
    model = build_model("classifier3d").eval()
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 4, \*, \*, \*\), got \(1, 3, 8, 8, 8\)"):
        model(torch.randn(1, 3, 8, 8, 8))


@pytest.mark.parametrize("shape", [(16, 16, 16), (17, 20, 13)])
def test_unet3d_interp_any_size_without_strided_kernels(shape):
    torch.manual_seed(0)
    model = build_model("unet3d_interp", channels=[4, 8, 16], convs=[1, 2, 2])
    out = _forward_backward(model.train(), torch.randn(2, 4, *shape))
    assert out.shape == (2, 3, *shape)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(c.stride == (1, 1, 1) for c in convs)
    assert not any(isinstance(m, nn.ConvTranspose3d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    with pytest.raises(ValueError, match="one per level"):
        build_model("unet3d_interp", channels=[4, 8, 16], convs=[1, 2])


def _lattice_share(grad: torch.Tensor, period: int) -> float:
    # power of the map on frequencies that are multiples of 1/period per axis, zero excluded
    power = torch.fft.fftn(grad.double(), dim=(-3, -2, -1)).abs().pow(2).sum(0)
    idx = [torch.arange(0, n, n // period) for n in power.shape]
    on = power[idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]].sum() - power[0, 0, 0]
    return float(on / (power.sum() - power[0, 0, 0]))


def test_interp_unet_input_gradient_has_no_stride_checkerboard():
    # MONAI's UNet backpropagates through stride-2 kernels: much of its input gradient's power sits on
    # the period-2/4 lattice; the interpolating U-Net's share stays near a pattern-free map's (63 / 32767)
    x = torch.randn(1, 4, 32, 32, 32)
    shares = {}
    for name in ("unet3d", "unet3d_interp"):
        torch.manual_seed(0)
        model = build_model(name, channels=[4, 8, 16]).eval()
        xi = x.clone().requires_grad_(True)
        torch.sigmoid(model(xi)[:, 1]).mean().backward()
        shares[name] = _lattice_share(xi.grad[0], 4)
    assert shares["unet3d"] > 0.05
    assert shares["unet3d_interp"] < 0.01


def test_resnet3d_and_model_kinds():
    from voxplain.models.zoo import model_dims, model_task

    torch.manual_seed(0)
    model = build_model("resnet3d", widths=[4, 8, 8, 16], image_size=[16, 16, 16])
    out = _forward_backward(model.train(), torch.randn(2, 4, 16, 16, 16))
    assert out.shape == (2, 2)
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    assert [model_task(n) for n in ("cnn2d", "classifier3d", "resnet3d", "unet3d", "unet3d_interp")] == \
        ["classify"] * 3 + ["segment"] * 2
    assert model_dims("cnn2d") == 2 and model_dims("unet3d_interp") == 3


@pytest.mark.parametrize("name", ["resnet3d", "unet3d_interp"])
def test_neuroxai_methods_run_on_the_demo_architectures(name):
    # the demo explains these two with NeuroXAI's seven methods (guided backprop rewrites their ReLU modules)
    from voxplain import SegmentationTarget, explain
    from voxplain.explain import DEFAULT_METHODS

    torch.manual_seed(0)
    small = {"widths": [4, 4, 8, 8]} if name == "resnet3d" else {"channels": [4, 8]}
    model = build_model(name, **small).eval()
    target = None if name == "resnet3d" else SegmentationTarget(1, activation="sigmoid")
    x = torch.randn(1, 4, 16, 16, 16)
    options = {"integrated_gradients": {"steps": 3}, "guided_ig": {"steps": 3}, "smoothgrad": {"samples": 2}}
    maps = explain(model, x, target, methods=DEFAULT_METHODS, options=options)
    assert set(maps) == set(DEFAULT_METHODS)
    for method, m in maps.items():
        assert m.shape[0] == 1 and m.shape[2:] == x.shape[2:] and torch.isfinite(m).all(), method
        assert m.abs().sum() > 0, method
