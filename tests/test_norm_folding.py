"""Batch norms folded into the convolution before them (voxplain.norm_folding): which pairs fold, that
the folded passes compute the model's function, and that nothing that watches a pair sees a folded one."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tiny_models import _randomise_bn, classifier, segnet

from voxplain import ClassTarget, Engine, SegmentationTarget, explain
from voxplain.norm_folding import foldable_pairs


def _gradient(model, x, target, fold: bool, **kwargs):
    """dF/dx (or, with ``layers``, the whole Gradients) from an engine folding inside fold_norms, or not."""
    with Engine(model, fold_batchnorm=fold) as engine:
        bound = target.bind(engine.forward(x))
        with engine.fold_norms():
            grads = engine.gradients(x, bound, torch.arange(x.shape[0]), **kwargs)
    return grads if kwargs else grads.inputs


def _assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert float((a - b).abs().max()) <= rel * float(b.abs().max()), float((a - b).abs().max() / b.abs().max())


class _NotASequential(nn.Module):
    """conv then BN in a forward of its own: where the conv's output goes is not fixed by structure."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


class _SlicesItsSequential(nn.Module):
    """Runs a slice of its Sequential that ends at the conv, and uses the conv's own output."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        raw = self.seq[:1](x)
        return (self.seq(x) + raw).mean((2, 3))


class _Shift(nn.Module):
    def forward(self, x):
        return x + 1


def _monai_unet():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=2, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1,
               norm="batch")
    return _randomise_bn(net, 0).train()


def test_pairs_are_found_in_sequential_blocks_and_monai_blocks():
    assert len(foldable_pairs(classifier(dims=2))) == 2
    assert len(foldable_pairs(segnet(dims=3))) == 3
    # MONAI's Convolution(conv, ADN(norm, dropout, act)): the norm is the first module of the next child,
    # also for the transposed convolution of the up path
    pairs = foldable_pairs(_monai_unet())
    assert len(pairs) == 3 and isinstance(pairs[-1].conv, nn.ConvTranspose3d)


@pytest.mark.parametrize("model", [
    _NotASequential(),
    nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(4)),  # channels differ
    nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False)),  # batch statistics
    nn.Sequential(nn.Conv2d(2, 3, 3), _Shift(), nn.BatchNorm2d(3)),  # something in between
], ids=["own-forward", "channels", "no-running-stats", "in-between"])
def test_pairs_whose_conv_output_may_go_elsewhere_are_not_folded(model):
    assert foldable_pairs(model) == []


def test_a_module_used_in_two_places_is_not_folded():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(nn.Sequential(conv, nn.BatchNorm2d(3)), nn.Sequential(conv, nn.ReLU()))
    assert foldable_pairs(model) == []


@pytest.mark.parametrize("name", ["classifier2d", "classifier3d", "segnet", "monai-unet", "sliced"])
def test_folded_gradients_are_the_models(name):
    torch.manual_seed(1)
    if name == "classifier2d":
        model, x, target = classifier(dims=2), torch.randn(3, 2, 16, 16), ClassTarget(1)
    elif name == "classifier3d":
        model, x, target = classifier(dims=3), torch.randn(2, 2, 8, 8, 8), ClassTarget(2)
    elif name == "segnet":
        model, x, target = segnet(dims=3), torch.randn(2, 2, 8, 8, 8), SegmentationTarget(1)
    elif name == "monai-unet":
        model, x, target = _monai_unet(), torch.randn(2, 2, 16, 16, 16), SegmentationTarget(1)
    else:
        model, x, target = _randomise_bn(_SlicesItsSequential(), 0), torch.randn(2, 2, 8, 8), ClassTarget(0)
    folded, plain = _gradient(model, x, target, True), _gradient(model, x, target, False)
    _assert_close(folded, plain)
    model.eval()
    leaf = x.clone().requires_grad_(True)
    out = model(leaf)
    bound = target.bind(out.detach())
    reference, = torch.autograd.grad(bound.score(out, torch.arange(x.shape[0])).sum(), leaf)
    _assert_close(folded, reference)


def _norm_calls(work) -> int:
    """How many times nn.BatchNorm2d runs its own forward during ``work()``."""
    calls = []
    original = nn.BatchNorm2d.forward

    def counting(self, x):
        calls.append(self)
        return original(self, x)

    nn.BatchNorm2d.forward = counting
    try:
        work()
    finally:
        nn.BatchNorm2d.forward = original
    return len(calls)


def _sized(model, x):
    """``model`` after an engine sized its rows of ``x``'s shape (a pass that hooks every module, so
    nothing folds in it; later engines on the model use its estimate)."""
    with Engine(model) as engine:
        engine.rows_per_pass(tuple(x.shape[1:]))
    return model


def _forward(model, x, fold: bool = True, exact: bool = False, inside: bool = True) -> None:
    with Engine(model, fold_batchnorm=fold) as engine:
        with engine.fold_norms() if inside else contextlib.nullcontext():
            with engine.exact_model() if exact else contextlib.nullcontext():
                engine.forward(x)


def test_folding_runs_fewer_batch_norms_and_leaves_the_model_as_it_came():
    x = torch.randn(2, 2, 16, 16)
    model = _sized(classifier(dims=2), x)
    assert _norm_calls(lambda: _forward(model, x)) == 0
    assert _norm_calls(lambda: _forward(model, x, fold=False)) == 2
    assert _norm_calls(lambda: _forward(model, x, inside=False)) == 2  # only inside fold_norms()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert model.training


def test_a_failing_pass_leaves_no_folding_behind():
    folded_when_it_failed = []

    class Fails(nn.Module):
        def forward(self, x):
            folded_when_it_failed.append("forward" in model.__dict__)  # the Sequential runs folded
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), Fails())
    with pytest.raises(Exception, match="boom"):
        with Engine(model, batch_size=1, fold_batchnorm=True) as engine, engine.fold_norms():
            engine.forward(torch.randn(1, 2, 8, 8))
    assert folded_when_it_failed == [True]
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_hooked_modules_see_what_the_model_computes():
    model = classifier(dims=2).eval()
    conv, bn = model[0], model[1]
    x = torch.randn(2, 2, 16, 16)
    expected_conv = conv(x)
    expected_bn = bn(expected_conv)
    seen = {}
    handles = [conv.register_forward_hook(lambda m, i, o: seen.__setitem__("conv", o.detach())),
               bn.register_forward_pre_hook(lambda m, i: seen.__setitem__("bn_in", i[0].detach()))]
    try:
        with Engine(model, batch_size=2, fold_batchnorm=True) as engine, engine.fold_norms():
            calls = _norm_calls(lambda: engine.forward(x))
    finally:
        for h in handles:
            h.remove()
    assert calls == 1  # the hooked pair ran as it is; the other folded
    torch.testing.assert_close(seen["conv"], expected_conv)
    torch.testing.assert_close(seen["bn_in"], expected_conv)
    assert not torch.allclose(expected_bn, expected_conv)


def test_a_captured_conv_layer_is_read_unfolded():
    model = classifier(dims=2)
    conv = model[4]  # the second convolution, followed by its batch norm
    x = torch.randn(2, 2, 16, 16)
    folded = _gradient(model, x, ClassTarget(1), True, layers=[conv])
    plain = _gradient(model, x, ClassTarget(1), False, layers=[conv])
    torch.testing.assert_close(folded.activations[0], model.eval()[:5](x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(folded.layer_gradients[0], plain.layer_gradients[0], rtol=0, atol=0)
    _assert_close(folded.inputs, plain.inputs)


def test_explain_folds_derived_rows_only_and_only_when_asked():
    """Opted in, path points fold; the shared passes at the input run the model as it is (a map does
    not depend on which other methods share them). By default nothing folds."""
    x = torch.randn(1, 2, 16, 16)
    model = _sized(classifier(dims=2), x)
    ig = {"methods": ["integrated_gradients"], "options": {"integrated_gradients": {"steps": 8}}}
    fold = {"fold_batchnorm": True}
    assert _norm_calls(lambda: explain(model, x, ClassTarget(1), methods=["vanilla_gradient"], **fold)) == 2
    assert _norm_calls(lambda: explain(model, x, ClassTarget(1), **ig, **fold)) == 0  # every pass at a path point
    assert _norm_calls(lambda: explain(model, x, ClassTarget(1), **ig)) > 0
    folded = explain(model, x, ClassTarget(1), **ig, **fold)["integrated_gradients"]
    _assert_close(folded, explain(model, x, ClassTarget(1), **ig)["integrated_gradients"])


def test_folded_weights_follow_changes_to_the_norm():
    model = classifier(dims=2)
    x = torch.randn(1, 2, 16, 16)
    before = _gradient(model, x, ClassTarget(0), True)
    with torch.no_grad():
        model[1].running_var.mul_(4.0)  # in place, between two engines on the same model
    after = _gradient(model, x, ClassTarget(0), True)
    _assert_close(after, _gradient(model, x, ClassTarget(0), False))
    assert not torch.allclose(before, after)


def test_exact_model_and_global_hooks_fold_nothing():
    x = torch.randn(1, 2, 16, 16)
    model = _sized(classifier(dims=2), x)
    assert _norm_calls(lambda: _forward(model, x, exact=True)) == 2
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: seen.append(module) if isinstance(module, nn.BatchNorm2d) else None)
    try:
        _forward(model, x)
    finally:
        handle.remove()
    assert len(seen) == 2  # the global hook saw both norms run


def test_folding_in_channels_last():
    torch.manual_seed(2)
    model, x = classifier(dims=3), torch.randn(2, 2, 8, 8, 8)
    with Engine(model, channels_last=True, fold_batchnorm=True) as engine:
        bound = ClassTarget(1).bind(engine.forward(x))
        with engine.fold_norms():
            folded = engine.gradients(x, bound, torch.arange(2)).inputs
        plain = engine.gradients(x, bound, torch.arange(2)).inputs
    assert folded.stride() == x.stride()  # maps come back in the input's layout
    _assert_close(folded, plain)


def test_folded_weights_are_made_once_per_layout_across_engines(monkeypatch):
    import voxplain.norm_folding as norm_folding

    made = []
    fold = norm_folding._fold
    monkeypatch.setattr(norm_folding, "_fold", lambda conv, norm: made.append(conv) or fold(conv, norm))
    model, x = classifier(dims=2), torch.randn(2, 2, 16, 16)
    for channels_last in (False, True, False, True):  # each engine lays the weights out anew
        with Engine(model, channels_last=channels_last, fold_batchnorm=True) as engine:
            bound = ClassTarget(0).bind(engine.forward(x))
            with engine.fold_norms():
                engine.gradients(x, bound, torch.arange(2))
    assert len(made) == 4  # two pairs, in two layouts
