"""The public explain() API: model hygiene, input checks, chunking, sharing, display helpers."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import voxplain
from tiny_models import classifier, segnet
from voxplain import ClassTarget, SegmentationTarget, explain
from voxplain.hooks import _guided_forward_hook
from voxplain.methods import method_class, option_names

SEVEN = {"vanilla_gradient", "guided_backprop", "integrated_gradients", "guided_ig", "smoothgrad",
         "gradcam", "guided_gradcam"}
#: the issue-2 methods, which must run on every model below
CORE = SEVEN | {"gradient_x_input"}
#: small settings so that every method runs in well under a second on tiny inputs
FAST = {"steps": 6, "samples": 3, "max_sigma": 3.0}


def _fast_options(name: str) -> dict:
    valid = option_names(method_class(name))
    options = {k: v for k, v in FAST.items() if k in valid}
    if name == "smoothgrad_ig":
        options["base_options"] = {"steps": 4}
    return options


def _options(names) -> dict:
    return {n: opts for n in names if (opts := _fast_options(n))}


def _registered(*names: str) -> None:
    missing = [n for n in names if n not in voxplain.available_methods()]
    if missing:
        pytest.skip(f"method(s) {missing} not registered yet")


class Snapshot:
    """Everything explaining must leave as it was on a model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.training = [m.training for m in model.modules()]
        self.requires_grad = [p.requires_grad for p in model.parameters()]
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.devices = [t.device for t in list(model.parameters()) + list(model.buffers())]

    def assert_unchanged(self) -> None:
        model = self.model
        for name, m in model.named_modules():
            assert not m._forward_hooks, f"forward hook left on {name!r}"
            assert not m._forward_pre_hooks, f"forward pre-hook left on {name!r}"
            assert not m._backward_hooks, f"backward hook left on {name!r}"
            assert not getattr(m, "_backward_pre_hooks", None), f"backward pre-hook left on {name!r}"
        assert [m.training for m in model.modules()] == self.training
        assert [p.requires_grad for p in model.parameters()] == self.requires_grad
        state = model.state_dict()
        assert state.keys() == self.state.keys()
        for k, v in self.state.items():
            assert torch.equal(state[k], v), f"{k} changed"
        assert [t.device for t in list(model.parameters()) + list(model.buffers())] == self.devices
        assert all(p.grad is None for p in model.parameters())


def _hygiene_model() -> nn.Module:
    """Training mode with one submodule in eval, a frozen parameter, in-place ReLUs."""
    model = classifier(dims=2, inplace=True)
    model[1].eval()
    model[0].bias.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------
# model hygiene


@pytest.mark.parametrize("name", voxplain.available_methods())
def test_model_unchanged_after_each_method(name):
    model = _hygiene_model()
    snap = Snapshot(model)
    x = torch.randn(2, 2, 12, 12)
    x_copy = x.clone()
    try:
        maps = explain(model, x, 1, methods=[name], options=_options([name]))
    except (ValueError, TypeError, NotImplementedError) as err:
        snap.assert_unchanged()
        if name in CORE:
            raise
        pytest.skip(f"{name} does not apply to a 2D classifier: {err}")
    snap.assert_unchanged()
    assert torch.equal(x, x_copy), "the input was modified"
    assert maps[name].dtype == torch.float32 and maps[name].device.type == "cpu"
    assert torch.isfinite(maps[name]).all()


@pytest.mark.parametrize("name", voxplain.available_methods())
def test_monai_segmentation_net_with_each_method(name):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=(4, 8), strides=(2,),
                 num_res_units=1, norm="batch")
    snap = Snapshot(model)
    x = torch.randn(1, 2, 16, 16, 16)
    try:
        maps = explain(model, x, SegmentationTarget(2), methods=[name], options=_options([name]))
    except (ValueError, TypeError, NotImplementedError) as err:
        snap.assert_unchanged()
        if name in CORE:
            raise
        pytest.skip(f"{name} does not apply to a 3D segmentation net: {err}")
    snap.assert_unchanged()
    expected_channels = 1 if method_class(name).single_channel else 2
    assert maps[name].shape == (1, expected_channels, 16, 16, 16)
    assert torch.isfinite(maps[name]).all()


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("boom in backward")


class FailingNet(nn.Module):
    """A classifier that raises in its n-th forward call, or in the backward of its n-th call."""

    def __init__(self, fail_in: str, fail_at: int):
        super().__init__()
        self.net = classifier(dims=2, inplace=True)
        self.fail_in, self.fail_at = fail_in, fail_at
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        failing = self.calls == self.fail_at
        if failing and self.fail_in == "forward":
            raise RuntimeError("boom in forward")
        out = self.net(x)
        # at the output, so that every backward reaches it (Grad-CAM's stops at its layer)
        return _FailInBackward.apply(out) if failing else out


# The first call fixes the target (and is kept to serve the first gradients); later calls are
# the methods' own passes, so each failure below happens with the method's hooks installed.
@pytest.mark.parametrize("name,fail_in,fail_at", [
    ("vanilla_gradient", "backward", 1), ("guided_backprop", "backward", 1), ("gradcam", "backward", 1),
    ("guided_gradcam", "forward", 2), ("guided_gradcam", "backward", 2),
    ("integrated_gradients", "forward", 3), ("integrated_gradients", "backward", 2),
    ("smoothgrad", "forward", 3), ("guided_ig", "forward", 4), ("guided_ig", "backward", 3),
])
def test_model_unchanged_after_a_method_raises_midway(name, fail_in, fail_at):
    _registered(name)
    model = FailingNet(fail_in, fail_at)
    model.net[0].weight.requires_grad_(False)
    snap = Snapshot(model)
    with pytest.raises(RuntimeError, match=f"boom in {fail_in}"):
        explain(model, torch.randn(1, 2, 12, 12), 0, methods=[name], options=_options([name]),
                batch_size=1)
    assert model.calls == fail_at
    snap.assert_unchanged()


def test_model_unchanged_after_a_bad_gradcam_layer():
    _registered("gradcam")
    model = _hygiene_model()
    snap = Snapshot(model)
    with pytest.raises(ValueError) as info:
        explain(model, torch.randn(1, 2, 12, 12), 0, methods=["gradcam"],
                options={"gradcam": {"layer": "encoder.99"}})
    assert "encoder.99" in str(info.value)
    assert re.search(r"(?i)available.*0, 1, 2", str(info.value))  # the layer names are listed
    snap.assert_unchanged()


def test_model_unchanged_when_the_first_forward_fails():
    model = classifier(dims=2, in_channels=2)
    snap = Snapshot(model)
    with pytest.raises(ValueError, match=r"expects 2 channel\(s\), the input has 3"):
        explain(model, torch.randn(1, 3, 12, 12), 0, methods=["vanilla_gradient"])
    snap.assert_unchanged()


# ---------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_non_finite_input(value, what):
    x = torch.randn(1, 2, 8, 8)
    x[0, 1, 3, 4] = value
    with pytest.raises(ValueError, match=what):
        explain(classifier(dims=2), x, 0, methods=["vanilla_gradient"])


def test_large_finite_input_is_not_mistaken_for_infinite():
    from voxplain.explain import check_input

    x = torch.full((1, 1, 4, 4), 3e38)  # its sum overflows float32
    assert torch.equal(check_input(x), x)
    x[0, 0, 1, 1] = float("-inf")
    with pytest.raises(ValueError, match="0 NaN and 1 infinite"):
        check_input(x)


@pytest.mark.parametrize("shape", [(8, 8), (2, 8), (1, 1, 2, 4, 4, 4), (4,)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\).*got %d dim" % len(shape)):
        explain(classifier(dims=2), torch.randn(*shape), 0, methods=["vanilla_gradient"])


def test_wrong_dtype_and_type():
    with pytest.raises(TypeError, match="floating-point.*int64"):
        explain(classifier(dims=2), torch.ones(1, 2, 8, 8, dtype=torch.long), 0, methods=["vanilla_gradient"])
    with pytest.raises(TypeError, match="torch.Tensor or numpy array"):
        explain(classifier(dims=2), [[1.0]], 0, methods=["vanilla_gradient"])
    with pytest.raises(ValueError, match="empty"):
        explain(classifier(dims=2), torch.ones(0, 2, 8, 8), 0, methods=["vanilla_gradient"])


def test_numpy_and_float64_input_are_accepted():
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    a = explain(classifier(dims=2), x, 0, methods=["vanilla_gradient"])["vanilla_gradient"]
    b = explain(classifier(dims=2), x.numpy(), 0, methods=["vanilla_gradient"])["vanilla_gradient"]
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_channel_count_the_model_rejects():
    with pytest.raises(ValueError, match=r"expects 2 channel\(s\), the input has 4") as info:
        explain(classifier(dims=3, in_channels=2), torch.randn(1, 4, 8, 8, 8), 0, methods=["vanilla_gradient"])
    assert "(1, 4, 8, 8, 8)" in str(info.value)


def test_class_index_out_of_range():
    with pytest.raises(IndexError, match=r"class index 7 is out of range.*0\.\.2"):
        explain(classifier(dims=2), torch.randn(1, 2, 8, 8), 7, methods=["vanilla_gradient"])
    with pytest.raises(ValueError, match="SegmentationTarget"):
        explain(segnet(dims=2), torch.randn(1, 2, 8, 8), 1, methods=["vanilla_gradient"])


def test_unknown_method_lists_available_and_suggests():
    with pytest.raises(ValueError) as info:
        explain(classifier(dims=2), torch.randn(1, 2, 8, 8), 0, methods=["vanila_gradient"])
    msg = str(info.value)
    assert "unknown method 'vanila_gradient'" in msg
    assert "Did you mean vanilla_gradient" in msg
    assert all(name in msg for name in voxplain.available_methods())


def test_method_option_errors():
    model, x = classifier(dims=2), torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['stepz'\].*valid options"):
        _registered("integrated_gradients")
        explain(model, x, 0, methods=["integrated_gradients"], options={"integrated_gradients": {"stepz": 4}})


def test_unknown_option_for_an_option_less_method():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['abs'\].*valid options: none"):
        explain(classifier(dims=2), torch.randn(1, 2, 8, 8), 0, methods=["vanilla_gradient"],
                options={"vanilla_gradient": {"abs": True}})


def test_options_for_a_method_not_run_and_duplicates():
    model, x = classifier(dims=2), torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"options given for method\(s\) \['gradcam'\] that are not among"):
        explain(model, x, 0, methods=["vanilla_gradient"], options={"gradcam": {"layer": "4"}})
    with pytest.raises(ValueError, match=r"\['vanilla_gradient'\] given more than once"):
        explain(model, x, 0, methods=["vanilla_gradient", "gradient_x_input", "vanilla_gradient"])


def test_constant_score_warns_and_returns_zeros():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.relu(self.conv(torch.zeros_like(x))).mean(dim=(2, 3)))

    names = [n for n in ("vanilla_gradient", "gradient_x_input", "guided_backprop", "integrated_gradients",
                         "smoothgrad") if n in voxplain.available_methods()]
    x = torch.randn(1, 2, 8, 8)
    with pytest.warns(RuntimeWarning, match="does not depend on the input"):
        maps = explain(Constant(), x, 1, methods=names, options=_options(names))
    for name in names:
        assert torch.equal(maps[name], torch.zeros_like(x)), name


# ---------------------------------------------------------------------------
# outputs, defaults, chunking


def test_default_methods_are_the_seven():
    assert set(voxplain.DEFAULT_METHODS) == SEVEN and len(voxplain.DEFAULT_METHODS) == 7
    _registered(*SEVEN)
    options = _options(SEVEN)
    maps = explain(classifier(dims=2), torch.randn(1, 2, 12, 12), options=options)
    assert set(maps) == SEVEN


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_maps_are_cpu_float32_of_the_input_shape(dims):
    names = sorted(CORE & set(voxplain.available_methods()))
    x = torch.randn(2, 2, *([8] * dims))
    maps = explain(classifier(dims=dims), x, None, methods=names, options=_options(names))
    assert list(maps) == names
    for name, m in maps.items():
        channels = 1 if method_class(name).single_channel else 2
        assert m.shape == (2, channels, *x.shape[2:]), name
        assert m.dtype == torch.float32 and m.device.type == "cpu", name
        assert torch.isfinite(m).all(), name


def test_batch_size_one_gives_the_same_maps():
    names = sorted(CORE & set(voxplain.available_methods()))
    x = torch.randn(2, 2, 12, 12)
    model = segnet(dims=2)
    target = SegmentationTarget([1, 2])
    whole = explain(model, x, target, methods=names, options=_options(names), seed=3)
    single = explain(model, x, target, methods=names, options=_options(names), seed=3, batch_size=1)
    budget = explain(model, x, target, methods=names, options=_options(names), seed=3,
                     memory_budget="96KB")  # one row (about 75 KB) per pass
    for name in names:
        scale = whole[name].abs().max().item() + 1e-12
        for other in (single, budget):
            torch.testing.assert_close(other[name], whole[name], rtol=0, atol=1e-5 * scale, msg=name)


def test_explain_detailed_reports_options_scores_and_timings():
    model = classifier(dims=2)
    x = torch.randn(2, 2, 8, 8)
    result = voxplain.explain_detailed(model, x, ClassTarget([0, 1], output="probability"),
                                       methods=["vanilla_gradient", "gradient_x_input"])
    assert set(result.seconds) == {"vanilla_gradient", "gradient_x_input"}
    assert result.options == {"vanilla_gradient": {}, "gradient_x_input": {}}
    assert result.target["classes"] == [0, 1]
    expected = torch.softmax(model.eval()(x), 1)[[0, 1], [0, 1]].detach()
    torch.testing.assert_close(result.scores, expected)
    assert result.output.shape == (2, 3)


def test_gradient_x_input_is_gradient_times_input():
    x = torch.randn(2, 2, 8, 8)
    maps = explain(classifier(dims=2), x, 1, methods=["vanilla_gradient", "gradient_x_input"])
    torch.testing.assert_close(maps["gradient_x_input"], maps["vanilla_gradient"] * x)


def test_method_objects_and_calling_a_method():
    model, x = classifier(dims=2), torch.randn(1, 2, 8, 8)
    method = voxplain.create_method("vanilla_gradient")
    direct = method(model, x, 2)
    via_explain = explain(model, x, 2, methods=[method])["vanilla_gradient"]
    assert torch.equal(direct, via_explain)


# ---------------------------------------------------------------------------
# sharing work between methods


class CountingNet(nn.Module):
    """Counts forward calls, and among them the guided passes that did not serve another purpose."""

    def __init__(self):
        super().__init__()
        self.net = classifier(dims=2)
        self.calls = self.guided = 0

    def forward(self, x):
        self.calls += 1
        if any(h is _guided_forward_hook for h in self.net[2]._forward_hooks.values()):
            self.guided += 1
        return self.net(x)


def test_one_forward_serves_the_target_gradient_methods_and_gradcam():
    _registered("gradcam")
    model = CountingNet()
    explain(model, torch.randn(1, 2, 12, 12), 0, methods=["vanilla_gradient", "gradient_x_input", "gradcam"])
    assert model.calls == 1
    # with several samples, sizing the pass takes a one-row forward of its own (the Grad-CAM
    # layer is chosen from the first forward's trace), and still one pass serves the target
    # and the three methods
    model = CountingNet()
    explain(model, torch.randn(3, 2, 12, 12), 0, methods=["vanilla_gradient", "gradient_x_input", "gradcam"])
    assert model.calls == 2


@pytest.mark.parametrize("name", ["vanilla_gradient", "gradient_x_input", "guided_backprop", "gradcam"])
def test_a_single_pass_method_runs_the_model_once(name):
    # the forward that fixes the target is kept and backpropagated (plain or guided)
    _registered(name)
    model = CountingNet()
    explain(model, torch.randn(1, 2, 12, 12), None, methods=[name])
    assert model.calls == 1


def test_guided_pass_is_shared_by_guided_backprop_and_guided_gradcam():
    _registered("guided_backprop", "guided_gradcam")
    model = CountingNet()
    maps = explain(model, torch.randn(1, 2, 12, 12), 0, methods=["guided_backprop", "guided_gradcam"])
    assert model.calls == 2  # one guided pass for both, one plain pass for the Grad-CAM part
    assert set(maps) == {"guided_backprop", "guided_gradcam"}
    model = CountingNet()
    explain(model, torch.randn(1, 2, 12, 12), 0, methods=["vanilla_gradient", "guided_backprop", "guided_gradcam"])
    assert model.calls == 2 and model.guided == 1


def test_seven_methods_share_passes():
    _registered(*SEVEN)
    options = {"integrated_gradients": {"steps": 4}, "guided_ig": {"steps": 4}, "smoothgrad": {"samples": 2}}
    x = torch.randn(1, 2, 12, 12)
    together = CountingNet()
    explain(together, x, 0, options=options)
    alone = CountingNet()
    for name in voxplain.DEFAULT_METHODS:
        explain(alone, x, 0, methods=[name], options={name: options[name]} if name in options else None)
    assert together.guided == 1  # guided backprop and guided Grad-CAM share one guided pass
    # the target-fixing forwards of the single-pass methods saved (path methods called alone need none
    # once the model has run on the input's shape: the target binds to their first pass), and the shared
    # plain and guided passes
    assert together.calls <= alone.calls - 4


# ---------------------------------------------------------------------------
# display helpers


def test_reduce_channels():
    m = torch.tensor([[[1.0, -2.0]], [[-3.0, 1.0]]]).permute(1, 0, 2)  # (1, 2, 2): channels (1,-2), (-3,1)
    assert voxplain.reduce_channels(m).flatten().tolist() == [4.0, 3.0]
    assert voxplain.reduce_channels(m, "sum").flatten().tolist() == [-2.0, -1.0]
    assert voxplain.reduce_channels(m, "max").flatten().tolist() == [1.0, 1.0]
    assert voxplain.reduce_channels(m, "abs_max").flatten().tolist() == [3.0, 2.0]
    assert voxplain.reduce_channels(torch.zeros(2, 3, 4, 5, 6)).shape == (2, 1, 4, 5, 6)
    with pytest.raises(ValueError, match="how must be one of"):
        voxplain.reduce_channels(m, "mean")
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\)"):
        voxplain.reduce_channels(torch.zeros(4, 5))


def test_percentile_normalise():
    values = torch.arange(101, dtype=torch.float32)  # 99th percentile is exactly 99
    m = torch.stack([values, -2 * values]).reshape(2, 1, 101)
    out = voxplain.percentile_normalise(m)
    torch.testing.assert_close(out[0, 0, :100], values[:100] / 99)
    assert out[0, 0, 100] == 1.0 and out[1].max() == 1.0 and out.min() == 0.0
    torch.testing.assert_close(out[1], out[0])  # magnitudes, scaled per sample
    signed = voxplain.percentile_normalise(m, signed=True)
    torch.testing.assert_close(signed[1, 0, :100], -values[:100] / 99)
    assert signed[1, 0, 100] == -1.0
    half = voxplain.percentile_normalise(values.reshape(1, 1, 101), percentile=50)
    torch.testing.assert_close(half[0, 0, :51], values[:51] / 50)
    assert torch.equal(voxplain.percentile_normalise(torch.zeros(1, 1, 4, 4)), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="percentile"):
        voxplain.percentile_normalise(m, percentile=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        voxplain.percentile_normalise(torch.ones(1, 1, 1))
