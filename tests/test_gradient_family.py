"""The pixel-space gradient family against Captum, and its axioms.

vanilla_gradient, gradient_x_input, guided_backprop, gradcam and guided_gradcam,
on 1D/2D/3D classifiers and a 3D segmentation net, batches of two with one
target per sample.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import GuidedGradCam, InputXGradient, LayerAttribution, LayerGradCam, Saliency
from torch import nn

import voxplain
from tiny_models import SpatialMean, classifier, segnet
from voxplain import ClassTarget, SegmentationTarget, explain, gradcam_per_layer
from voxplain.engine import Engine
from voxplain.methods.layer_select import default_cam_layer, inspection_layers

FAMILY = ["vanilla_gradient", "gradient_x_input", "guided_backprop", "gradcam", "guided_gradcam"]
MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
RTOL = 1e-4


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


def _captum(model: nn.Module, x: torch.Tensor, target, layer: nn.Module) -> dict[str, torch.Tensor]:
    """The reference maps, computed by Captum on ``model`` in eval mode."""
    model.eval()
    mode = MODES[x.ndim - 2]
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    return {
        "vanilla_gradient": Saliency(model).attribute(x, target=target, abs=False),
        "gradient_x_input": InputXGradient(model).attribute(x, target=target),
        "guided_backprop": CaptumGuidedBackprop(model).attribute(x, target=target),
        "gradcam": LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode=mode),
        "guided_gradcam": GuidedGradCam(model, layer).attribute(x, target=target, interpolate_mode=mode),
    }


def _assert_close_to_reference(ours: dict, ref: dict) -> dict[str, float]:
    rel = {}
    for name in FAMILY:
        assert ours[name].shape == ref[name].shape, name
        scale = float(ref[name].detach().abs().max())
        assert scale > 0, f"reference {name} is all zero: the comparison would be empty"
        rel[name] = float((ours[name] - ref[name].detach()).abs().max()) / scale
        assert rel[name] <= RTOL, f"{name}: max difference {rel[name]:.2e} x max|ref|"
    return rel


def _case(kind: str):
    """(model to explain, Captum's model, input, our target, Captum's target, layer name)."""
    g = torch.Generator().manual_seed(7)
    if kind == "cnn1d":
        model = classifier(dims=1, seed=1)
        x = torch.randn(2, 2, 32, generator=g)
        return model, model, x, ClassTarget([0, 2]), [0, 2], "4"
    if kind == "cnn2d":
        model = classifier(dims=2, seed=2)
        x = torch.randn(2, 2, 20, 20, generator=g)
        return model, model, x, ClassTarget([2, 1]), [2, 1], "6"
    if kind == "cnn3d":
        model = classifier(dims=3, seed=3)
        x = torch.randn(2, 2, 12, 12, 12, generator=g)
        return model, model, x, ClassTarget([1, 0]), [1, 0], "2"
    if kind == "seg3d":
        model = segnet(dims=3, seed=4)
        with torch.no_grad():  # logits positive somewhere, so a CAM at the head is not all zero
            model.head.bias += 0.3
        x = torch.randn(2, 2, 12, 12, 12, generator=g)
        return model, SpatialMean(model), x, SegmentationTarget([0, 2]), [0, 2], "down.3"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["cnn1d", "cnn2d", "cnn3d", "seg3d"])
@pytest.mark.parametrize("default_layer", [False, True])
def test_agrees_with_captum(kind, default_layer):
    model, ref_model, x, target, ref_target, layer_name = _case(kind)
    if default_layer:
        with Engine(model) as engine:
            layer = default_cam_layer(engine, x)
        options = None
    else:
        layer = dict(model.named_modules())[layer_name]
        options = {"gradcam": {"layer": layer_name}, "guided_gradcam": {"layer": layer}}
    ours = explain(model, x, target, methods=FAMILY, options=options)
    ref = _captum(ref_model, x, ref_target, layer)
    _assert_close_to_reference(ours, ref)
    assert ours["gradcam"].shape == (x.shape[0], 1, *x.shape[2:])


def test_default_layers_of_tiny_models():
    x2 = torch.randn(1, 2, 16, 16)
    with Engine(classifier(dims=2)) as engine:
        assert default_cam_layer(engine, x2) is engine.model[6]  # last ReLU before global pooling
    net = segnet(dims=3)
    with Engine(net) as engine:
        # a dense-prediction net: the last decoder feature map, not the output head
        assert default_cam_layer(engine, torch.randn(1, 2, 8, 8, 8)) is net.dec


def test_inplace_relu_gives_the_same_maps_as_its_twin():
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(3))
    plain = explain(classifier(dims=2, inplace=False, seed=5), x, [0, 1], methods=FAMILY)
    model = classifier(dims=2, inplace=True, seed=5)
    inplace = explain(model, x, [0, 1], methods=FAMILY)
    for name in FAMILY:
        assert torch.equal(plain[name], inplace[name]), name
    assert _no_hooks(model) and model.training


def test_one_plain_and_one_guided_pass_serve_the_family(monkeypatch):
    calls = []
    original, original_recorded = Engine.gradients, Engine.backward_recorded

    def counting(self, *args, **kwargs):
        calls.append(bool(kwargs.get("guided", False)))
        return original(self, *args, **kwargs)

    def counting_recorded(self, *args, **kwargs):  # a pass served by the recorded first forward
        calls.append(bool(kwargs.get("guided", False)))
        return original_recorded(self, *args, **kwargs)

    traces = []
    original_trace = Engine.trace

    def counting_trace(self, x):
        traces.append(x.shape)
        return original_trace(self, x)

    monkeypatch.setattr(Engine, "gradients", counting)
    monkeypatch.setattr(Engine, "backward_recorded", counting_recorded)
    monkeypatch.setattr(Engine, "trace", counting_trace)
    explain(classifier(dims=2), torch.randn(2, 2, 16, 16), 0, methods=FAMILY)
    assert sorted(calls) == [False, True]
    assert len(traces) == 0  # Grad-CAM and guided Grad-CAM choose their layer from the first forward's trace


def test_gradcam_alone_and_under_smoothgrad():
    model = classifier(dims=3, seed=1)
    x = torch.randn(2, 2, 8, 8, 8)
    alone = voxplain.GradCAM(layer="2")(model, x, [0, 1])
    assert alone.shape == (2, 1, 8, 8, 8)
    base = {"base": "gradcam", "base_options": {"layer": "2"}}
    still = explain(model, x, [0, 1], methods=["smoothgrad"],
                    options={"smoothgrad": {**base, "noise_level": 0.0}})["smoothgrad"]
    torch.testing.assert_close(still, alone, rtol=0, atol=0)
    noisy = explain(model, x, [0, 1], methods=["smoothgrad"],
                    options={"smoothgrad": {**base, "samples": 3}}, batch_size=4)["smoothgrad"]
    assert noisy.shape == alone.shape and not torch.equal(noisy, alone)
    guided = explain(model, x, [0, 1], methods=["smoothgrad"],
                     options={"smoothgrad": {"base": "guided_gradcam", "samples": 2}})["smoothgrad"]
    assert guided.shape == x.shape and torch.isfinite(guided).all()


# ---------------------------------------------------------------------------
# axioms


class _NoActivation(nn.Module):
    def __init__(self, functional_relu: bool):
        super().__init__()
        self.functional_relu = functional_relu
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv1(x)
        if self.functional_relu:
            h = F.relu(h)
        h = self.conv2(F.max_pool2d(h, 2))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("functional_relu", [False, True])
def test_guided_backprop_is_the_gradient_without_activation_modules(functional_relu):
    torch.manual_seed(0)
    model = _NoActivation(functional_relu)
    x = torch.randn(2, 2, 12, 12)
    with pytest.warns(UserWarning, match="no activation module"):
        maps = explain(model, x, [0, 2], methods=["guided_backprop", "vanilla_gradient"])
    assert torch.equal(maps["guided_backprop"], maps["vanilla_gradient"])


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcam_equals_cam_on_a_gap_network(dims):
    """conv -> ReLU -> global average pool -> linear: y_k = sum_c w_kc mean_s(A_c) + b_k.

    dy_k/dA_c(s) = w_kc / V everywhere (V = voxels of A), so alpha_c = w_kc / V and
    Grad-CAM = ReLU(sum_c w_kc A_c) / V = ReLU(CAM_k) / V, CAM_k being Zhou et al.'s map.
    """
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    torch.manual_seed(dims)
    model = nn.Sequential(conv(2, 5, 3, padding=1), nn.ReLU(), conv(5, 4, 3, padding=1, stride=2), nn.ReLU(),
                          {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims](1), nn.Flatten(),
                          nn.Linear(4, 3))
    x = torch.randn(2, 2, *([12] * dims))
    classes = [2, 0]
    with torch.no_grad():
        acts = model[:4](x)
    volume = acts[0, 0].numel()
    weights = model[6].weight[classes]  # (B, C)
    cam = torch.einsum("bc,bc...->b...", weights, acts)[:, None]
    expected = torch.relu(cam) / volume

    at_layer = gradcam_per_layer(model, x, classes, layers=["3"], upsample=False)["3"]
    torch.testing.assert_close(at_layer, expected, rtol=1e-5, atol=1e-7)
    assert float(expected.max()) > 0
    upsampled = explain(model, x, classes, methods=["gradcam"])["gradcam"]  # default layer: "3"
    torch.testing.assert_close(upsampled, F.interpolate(expected, size=x.shape[2:], mode=MODES[dims],
                                                        align_corners=False), rtol=1e-5, atol=1e-7)


class _GuidedStep(torch.autograd.Function):
    """An activation whose backward is the guided rule, to build a reference twin."""

    @staticmethod
    def forward(ctx, x, fn):
        y = fn(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad.clamp(min=0) * (y > 0), None


class _GuidedTwin(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x):
        return _GuidedStep.apply(x, self.act)


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.2), nn.ELU(), nn.PReLU(), nn.ReLU6()],
                         ids=["leaky", "elu", "prelu", "relu6"])
def test_relu_family_is_guided_by_type(act):
    torch.manual_seed(1)
    convs = [nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]
    model = nn.Sequential(convs[0], act, convs[1], nn.ReLU(), *head)
    twin = nn.Sequential(convs[0], _GuidedTwin(act), convs[1], _GuidedTwin(nn.ReLU()), *head).eval()
    x = torch.randn(2, 2, 10, 10, requires_grad=True)
    maps = explain(model, x.detach(), [1, 2], methods=["guided_backprop", "vanilla_gradient"])
    twin(x)[[0, 1], [1, 2]].sum().backward()
    torch.testing.assert_close(maps["guided_backprop"], x.grad, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(maps["guided_backprop"], maps["vanilla_gradient"])


# ---------------------------------------------------------------------------
# layer choice


class _SharedNorm(nn.Module):
    """conv1 -> IN -> ReLU -> conv2 -> IN (the same IN module) -> relu -> mean -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.norm = nn.InstanceNorm3d(4)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.act(self.norm(self.conv1(x)))
        h = F.relu(self.norm(self.conv2(h)))
        return self.fc(h.mean(dim=(2, 3, 4)))


def test_default_layer_skips_a_conv_feeding_instance_norm():
    torch.manual_seed(0)
    model = _SharedNorm()
    x = torch.randn(1, 2, 8, 8, 8)
    with Engine(model) as engine:
        assert default_cam_layer(engine, x) is model.act
    # why: InstanceNorm cancels every channel's spatial mean, so the CAM at the conv feeding it is zero
    cams = gradcam_per_layer(model, x, 0, layers=["conv2", "act"])
    assert list(cams) == ["act", "conv2"]  # execution order
    assert float(cams["conv2"].abs().max()) < 1e-3 * float(cams["act"].abs().max())  # float32 rounding
    assert float(cams["act"].max()) > 0


def test_unknown_layer_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'.*Available layers: 0, 1, 2, 3, 4"):
        explain(classifier(dims=2), torch.randn(1, 2, 8, 8), 0, methods=["gradcam"],
                options={"gradcam": {"layer": "conv9"}})


class _WithUnused(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.unused = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.net(x)


def test_layer_that_is_not_spatial_or_does_not_run_is_an_error():
    model = classifier(dims=2)
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="not a spatial feature map"):
        explain(model, x, 0, methods=["gradcam"], options={"gradcam": {"layer": "9"}})
    model = _WithUnused(model)
    with pytest.raises(ValueError, match="does not run"):
        explain(model, x, 0, methods=["guided_gradcam"], options={"guided_gradcam": {"layer": "unused"}})
    with pytest.raises(ValueError, match="not a submodule"):
        explain(model, x, 0, methods=["gradcam"], options={"gradcam": {"layer": nn.ReLU()}})
    assert _no_hooks(model)


def test_gradcam_per_layer_walks_the_conv_blocks_in_one_pass():
    model = classifier(dims=2, seed=2)
    x = torch.randn(2, 2, 16, 16)
    cams = gradcam_per_layer(model, x, [0, 1])
    assert list(cams) == ["2", "6"]  # each conv's block output (after BN and ReLU)
    for name, cam in cams.items():
        single = explain(model, x, [0, 1], methods=["gradcam"], options={"gradcam": {"layer": name}})
        torch.testing.assert_close(cam, single["gradcam"], rtol=0, atol=0)
    assert _no_hooks(model) and model.training


# ---------------------------------------------------------------------------
# MONAI


def test_monai_basic_unet_agrees_with_captum():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=3, in_channels=2, out_channels=3, features=(4, 4, 4, 4, 4, 4),
                    act="relu", norm="batch")
    x = torch.randn(2, 2, 16, 16, 16)
    layer = "upcat_2.convs.conv_1"  # a MONAI Convolution block (conv -> ADN with activation "A")
    ours = explain(net, x, SegmentationTarget([1, 2]), methods=FAMILY,
                   options={"gradcam": {"layer": layer}, "guided_gradcam": {"layer": layer}})
    ref = _captum(SpatialMean(net), x, [1, 2], dict(net.named_modules())[layer])
    _assert_close_to_reference(ours, ref)


def test_monai_defaults_leaky_inplace_instance_norm():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=3, in_channels=2, out_channels=2, features=(4, 4, 4, 4, 4, 4))
    net.train()
    x = torch.randn(1, 2, 32, 32, 32)  # InstanceNorm needs > 1 voxel at the 1/16 bottleneck
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "nothing to guide" warning: LeakyReLU modules are found
        maps = explain(net, x, SegmentationTarget(1), methods=FAMILY)
    for name, m in maps.items():
        assert torch.isfinite(m).all() and float(m.abs().max()) > 0, name
    assert not torch.allclose(maps["guided_backprop"], maps["vanilla_gradient"])
    assert _no_hooks(net) and net.training
    with Engine(net) as engine:
        layers = inspection_layers(engine, x)
    names = [n for n, _ in layers]
    assert names[0] == "conv_0.conv_0.adn.A" and all(
        n.endswith((".A", "upsample.deconv", "final_conv")) for n in names)  # after the norm, never before
    cams = gradcam_per_layer(net, x, SegmentationTarget(1))
    assert list(cams) == names


def test_public_names():
    for name in ["GuidedBackprop", "GradCAM", "GuidedGradCAM", "gradcam_per_layer"]:
        assert name in voxplain.__all__
    assert voxplain.create_method("gradcam", {"layer": "x"}).layer == "x"
    with pytest.raises(ValueError, match="unknown option"):
        voxplain.create_method("guided_gradcam", {"layers": "x"})


# ---------------------------------------------------------------------------
# which activations are guided


def _mixed_activations(seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.1),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


def test_relu_only_option_agrees_with_captum():
    model, x, layer = _mixed_activations(), torch.randn(2, 2, 10, 10), "4"
    opts = {"guided_backprop": {"activations": "relu"}, "guided_gradcam": {"activations": "relu", "layer": layer}}
    with pytest.warns(UserWarning, match=r"left unguided.*ELU x1, LeakyReLU x1"):
        ours = explain(model, x, [0, 2], methods=["guided_backprop", "guided_gradcam"], options=opts)
    # Captum's GuidedBackprop (and GuidedGradCam) rewrite nn.ReLU modules only
    ref_gbp = CaptumGuidedBackprop(model).attribute(x, target=[0, 2])
    ref_ggc = GuidedGradCam(model, model[4]).attribute(x, target=[0, 2], interpolate_mode="bilinear")
    for name, ref in (("guided_backprop", ref_gbp), ("guided_gradcam", ref_ggc)):
        scale = float(ref.abs().max())
        assert scale > 0 and float((ours[name] - ref).abs().max()) <= RTOL * scale, name
    # the default set also guides LeakyReLU and ELU, which changes the map
    default = explain(model, x, [0, 2], methods=["guided_backprop"])["guided_backprop"]
    assert not torch.allclose(default, ours["guided_backprop"])


def test_unguided_nonlinearities_are_named_in_warnings_and_extras():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    x = torch.randn(1, 2, 8, 8)
    with pytest.warns(UserWarning, match=r"guided_backprop: .*left unguided.*GELU x1, SiLU x1.*functional"):
        out = voxplain.explain_detailed(model, x, 0, methods=["guided_backprop", "guided_gradcam", "vanilla_gradient"])
    for name in ("guided_backprop", "guided_gradcam"):
        (line,) = out.extras[name]["warnings"]
        assert line.startswith(f"{name}: ") and "GELU x1, SiLU x1" in line and "\n" not in line
    assert "warnings" not in out.extras["vanilla_gradient"]
    # a model of ReLU-family modules only: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = voxplain.explain_detailed(classifier(dims=2), x, 0, methods=["guided_backprop"])
    assert quiet.extras["guided_backprop"] == {}


def test_activations_option_is_checked():
    with pytest.raises(ValueError, match="activations must be one of 'relu_family', 'relu'"):
        voxplain.create_method("guided_backprop", {"activations": "gelu"})
    with pytest.raises(ValueError, match="activations must be one of"):
        voxplain.create_method("guided_gradcam", {"activations": None})
