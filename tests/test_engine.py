"""The engine: model preparation and restoration, chunking, memory budgets, gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from tiny_models import classifier, segnet
from voxplain import ClassTarget, Engine, SegmentationTarget
from voxplain.engine import parse_memory
from voxplain.hooks import GuidedReLU


def _bound(engine: Engine, x: torch.Tensor, target=None):
    target = target or ClassTarget(None)
    return target.bind(engine.forward(x)), torch.arange(x.shape[0])


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


# ---------------------------------------------------------------------------
# preparation and restoration


def test_engine_prepares_and_restores_the_model():
    model = classifier(dims=2)  # in training mode
    model[1].eval()  # a mixed mode that must survive
    model[0].bias.requires_grad_(False)  # a frozen parameter
    training = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with Engine(model) as engine:
        assert not any(m.training for m in model.modules())
        assert not any(p.requires_grad for p in model.parameters())
        with engine:  # re-entering is harmless and restores only at the outer exit
            pass
        assert not model.training
    assert [m.training for m in model.modules()] == training
    assert [p.requires_grad for p in model.parameters()] == flags


def test_engine_restores_when_the_block_raises():
    model = classifier(dims=1)
    with pytest.raises(RuntimeError, match="boom"):
        with Engine(model) as engine:
            x = torch.randn(1, 2, 8)
            bound, rows = _bound(engine, x)
            with engine._hooks([model[0]], guided=True):
                assert not _no_hooks(model)
                raise RuntimeError("boom")
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert _no_hooks(model)


def test_engine_must_be_entered():
    engine = Engine(classifier(dims=1))
    with pytest.raises(RuntimeError, match="with engine"):
        engine.forward(torch.randn(1, 2, 8))


def test_engine_argument_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        Engine(lambda x: x)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            Engine(classifier(dims=1), batch_size=bad)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            Engine(classifier(dims=1), device="cuda")


def test_engine_keeps_the_model_on_its_device():
    model = classifier(dims=1)
    with Engine(model, device="cpu") as engine:
        assert engine.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())


# ---------------------------------------------------------------------------
# memory budget and chunking


def test_parse_memory():
    assert parse_memory("2GB") == 2 * 1024**3
    assert parse_memory("512MB") == 512 * 1024**2
    assert parse_memory(" 1.5 gib ") == int(1.5 * 1024**3)
    assert parse_memory("4096") == 4096
    assert parse_memory(1e6) == 1_000_000
    for bad in ("two GB", "2XB", "", "GB", "-1GB", "0MB", "2 G B"):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_memory(bad)
    for bad in ([2], None, True):
        with pytest.raises(TypeError, match="memory_budget"):
            parse_memory(bad)
    with pytest.raises(ValueError, match="memory_budget"):
        Engine(classifier(dims=1), memory_budget="lots")


def test_rows_per_pass_scales_with_the_budget():
    model = classifier(dims=3)
    row = (2, 16, 16, 16)
    with Engine(model, memory_budget="512MB") as small, Engine(model, memory_budget="2GB") as large:
        r_small, r_large = small.rows_per_pass(row), large.rows_per_pass(row)
        assert r_small >= 1
        assert abs(r_large - 4 * r_small) <= 4
        # a forward-only pass keeps no activations for backward: more rows fit
        assert small.rows_per_pass(row, backward=False) > r_small
        # a larger row takes proportionally fewer rows per pass
        assert small.rows_per_pass((2, 32, 32, 32)) < r_small
    with Engine(model, memory_budget=1) as tiny:  # below one row's need: refused, with the need
        with pytest.raises(ValueError, match=r"one input row of shape \(2, 16, 16, 16\) needs about"):
            tiny.rows_per_pass(row)
    with Engine(model, batch_size=3, memory_budget=1) as fixed:
        assert fixed.rows_per_pass(row) == 3
        assert [(s.start, s.stop) for s in fixed.chunks(7, row)] == [(0, 3), (3, 6), (6, 7)]
        # passes are balanced: 50 rows at most 35 per pass go as 25 + 25, not 35 + 15
    with Engine(model, batch_size=4) as fixed:
        assert [(s.start, s.stop) for s in fixed.chunks(7, row)] == [(0, 4), (4, 7)]
    with Engine(model, batch_size=35) as fixed:
        assert [s.stop - s.start for s in fixed.chunks(50, row)] == [25, 25]
        assert [s.stop - s.start for s in fixed.chunks(1, row)] == [1]


def test_chunked_gradients_equal_unchunked():
    model = segnet(dims=2)
    torch.manual_seed(0)
    x = torch.randn(5, 2, 12, 12)
    target = SegmentationTarget(1, region=torch.rand(12, 12) > 0.5)
    results = []
    for batch_size in (None, 1, 2):
        with Engine(model, batch_size=batch_size) as engine:
            bound = target.bind(engine.forward(x[:1]))
            rows = torch.zeros(5, dtype=torch.long)  # every row derives from sample 0
            layer = model.dec[0]
            results.append(engine.gradients(x, bound, rows, layers=[layer]))
    ref = results[0]
    for other in results[1:]:
        torch.testing.assert_close(other.scores, ref.scores, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(other.inputs, ref.inputs, rtol=1e-5, atol=1e-7)
        # conv kernels may sum in another order for another batch size: float32 rounding (~1e-7)
        torch.testing.assert_close(other.activations[0], ref.activations[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.layer_gradients[0], ref.layer_gradients[0], rtol=1e-5, atol=1e-8)
    assert ref.inputs.shape == x.shape and ref.scores.shape == (5,)


def test_the_one_row_tail_of_a_walk_runs_as_two_rows():
    # PyTorch runs other kernels on one row: a walk of two-row passes keeps them for its last row too
    model = segnet(dims=2)
    torch.manual_seed(0)
    x = torch.randn(3, 2, 12, 12)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        with Engine(model, batch_size=2) as engine:
            bound = SegmentationTarget(1).bind(engine.forward(x[:1]))
            seen.clear()
            walk = engine.gradients(x, bound, torch.zeros(3, dtype=torch.long), layers=[model.dec[0]])
            assert seen == [2, 2]
            pair = engine.gradients(x[2:].repeat(2, 1, 1, 1), bound, torch.zeros(2, dtype=torch.long),
                                    layers=[model.dec[0]])
        with Engine(model, batch_size=1) as engine:  # a walk of one-row passes stays one row a pass
            seen.clear()
            engine.gradients(x, bound, torch.zeros(3, dtype=torch.long))
            assert seen == [1, 1, 1]
    finally:
        handle.remove()
    assert walk.inputs.shape == x.shape and walk.scores.shape == (3,)
    assert walk.activations[0].shape[0] == 3 and walk.layer_gradients[0].shape[0] == 3
    assert torch.equal(walk.inputs[2], pair.inputs[0]) and torch.equal(walk.scores[2], pair.scores[0])
    assert torch.equal(walk.layer_gradients[0][2], pair.layer_gradients[0][0])


def test_forward_and_scores_are_chunked_consistently():
    model = classifier(dims=2)
    x = torch.randn(4, 2, 10, 10)
    with Engine(model, batch_size=1) as engine:
        out = engine.forward(x)
        bound = ClassTarget(2).bind(out)
        assert torch.allclose(engine.scores(x, bound, torch.arange(4)), out[:, 2], atol=1e-6)


# ---------------------------------------------------------------------------
# gradients


def test_gradients_match_autograd():
    model = classifier(dims=2)
    x = torch.randn(2, 2, 10, 10)
    with Engine(model) as engine:
        bound, rows = _bound(engine, x, ClassTarget([0, 2]))
        got = engine.gradients(x, bound, rows)
    ref_model = classifier(dims=2).eval()
    xr = x.clone().requires_grad_(True)
    out = ref_model(xr)
    out[:, 0][0].backward(retain_graph=True)
    out[:, 2][1].backward()
    torch.testing.assert_close(got.inputs, xr.grad)
    torch.testing.assert_close(got.scores, torch.stack([out[0, 0], out[1, 2]]).detach())


def test_guided_gradients_with_inplace_relu_match_non_inplace():
    x = torch.randn(2, 2, 10, 10)
    maps = []
    for inplace in (False, True):
        model = classifier(dims=2, inplace=inplace)
        with Engine(model) as engine:
            bound, rows = _bound(engine, x, ClassTarget(1))
            g = engine.gradients(x, bound, rows, layers=[model[4]], guided=True)
            maps.append((g.inputs, g.activations[0], g.layer_gradients[0]))
        assert _no_hooks(model)
    for a, b in zip(*maps):
        torch.testing.assert_close(a, b)
    assert maps[0][0].abs().sum() > 0


def test_guided_rule_on_a_single_relu():
    # y = sum(w * relu(x)): guided gradient is w where x > 0 and w > 0, else 0
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()
            self.w = nn.Parameter(torch.tensor([[[1.0, -1.0, 2.0, -2.0]]]))

        def forward(self, x):
            return (self.w * self.relu(x)).sum(dim=(1, 2))[:, None]

    x = torch.tensor([[[1.0, 1.0, -1.0, -1.0]]])
    with Engine(Net()) as engine:
        bound, rows = _bound(engine, x, ClassTarget(0))
        plain = engine.gradients(x, bound, rows).inputs
        guided = engine.gradients(x, bound, rows, guided=True).inputs
    assert plain.flatten().tolist() == [1.0, -1.0, 0.0, 0.0]
    assert guided.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


def test_layer_gradients_without_input_gradient():
    model = classifier(dims=1)
    x = torch.randn(2, 2, 8)
    with Engine(model) as engine:
        bound, rows = _bound(engine, x)
        g = engine.gradients(x, bound, rows, layers=[model[4]], input_gradient=False)
    assert g.inputs is None
    assert g.activations[0].shape == g.layer_gradients[0].shape == (2, 6, 4)


def test_layer_capture_errors():
    model = classifier(dims=1)
    x = torch.randn(1, 2, 8)
    unused = nn.Conv1d(2, 2, 1)
    with Engine(model) as engine:
        bound, rows = _bound(engine, x)
        with pytest.raises(RuntimeError, match="did not run"):
            engine.gradients(x, bound, rows, layers=[unused])
    assert _no_hooks(model)


def test_constant_score_warns_and_gives_zeros():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)

        def forward(self, x):
            return self.conv(torch.zeros_like(x)).mean(dim=(2, 3))

    x = torch.randn(1, 2, 8, 8)
    with Engine(Constant()) as engine:
        bound, rows = _bound(engine, x, ClassTarget(0))
        with pytest.warns(RuntimeWarning, match="does not depend on the input"):
            g = engine.gradients(x, bound, rows)
    assert torch.equal(g.inputs, torch.zeros_like(x))

    class Detached(nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], 2)

    with Engine(Detached()) as engine:
        bound, rows = _bound(engine, x, ClassTarget(1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g = engine.gradients(x, bound, rows)
    assert any(issubclass(w.category, RuntimeWarning) for w in caught)
    assert torch.equal(g.inputs, torch.zeros_like(x))


def test_trace_lists_modules_in_execution_order():
    model = segnet(dims=2)
    with Engine(model) as engine:
        layers = engine.trace(torch.randn(1, 2, 8, 8))
    names = [info.name for info in layers]
    assert names.index("enc") < names.index("down") < names.index("up") < names.index("dec") < names.index("head")
    head = layers[names.index("head")]
    assert head.module is model.head and head.output_shape == (1, 3, 8, 8)
    assert _no_hooks(model)


def test_monai_basic_unet_with_inplace_activations():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    model = BasicUNet(spatial_dims=3, in_channels=2, out_channels=3, features=(4, 4, 4, 4, 4, 4), norm="batch")
    x = torch.randn(1, 2, 16, 16, 16)
    with Engine(model) as engine:
        assert engine.has_guided_activations()
        bound, rows = _bound(engine, x, SegmentationTarget(1))
        plain = engine.gradients(x, bound, rows)
        guided = engine.gradients(x, bound, rows, guided=True)
    assert _no_hooks(model) and model.training
    assert torch.isfinite(plain.inputs).all() and plain.inputs.abs().sum() > 0
    assert not torch.equal(plain.inputs, guided.inputs)


def test_guided_relu_finds_activations_by_type():
    model = classifier(dims=2)
    assert len(GuidedReLU(model).modules) == 2


# ---------------------------------------------------------------------------
# the recorded pass: record() keeps a forward with its graph, backward_recorded() uses it once


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_kept_pass_gives_the_same_gradients_as_a_fresh_pass(guided, inplace):
    model = classifier(dims=2, inplace=inplace)
    x = torch.randn(1, 2, 10, 10)
    layers = [model[0], model[4], model[6]]  # conv feeding an in-place ReLU, conv, last ReLU
    with Engine(model) as engine:
        bound = ClassTarget(2).bind(engine.forward(x))
        fresh = engine.gradients(x, bound, torch.arange(1), layers=layers, guided=guided)
    with Engine(model) as engine:
        recorded = engine.record(x)
        out = recorded.output.detach()
        assert _no_hooks(model)
        assert [i.name for i in recorded.trace] == [str(i) for i in range(10)]
        kept = engine.backward_recorded(recorded, ClassTarget(2).bind(out), torch.arange(1), layers=layers,
                                        guided=guided)
    torch.testing.assert_close(kept.scores, fresh.scores, rtol=0, atol=0)
    torch.testing.assert_close(kept.inputs, fresh.inputs, rtol=0, atol=0)
    for a, b in zip(kept.activations + kept.layer_gradients, fresh.activations + fresh.layer_gradients):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert _no_hooks(model)


def test_recorded_pass_refuses_a_layer_output_changed_in_place():
    model = classifier(dims=2, inplace=True)
    x = torch.randn(1, 2, 10, 10)
    with Engine(model) as engine:
        recorded = engine.record(x)
        bound = ClassTarget(2).bind(recorded.output.detach())
        # BatchNorm's output is rewritten by the in-place ReLU after it: it cannot be captured after the fact
        assert recorded.activation(model[1]) is None and recorded.activation(model[2]) is not None
        assert engine.backward_recorded(recorded, bound, torch.arange(1), layers=[model[1]]) is None
        kept = engine.backward_recorded(recorded, bound, torch.arange(1), layers=[model[2]])
        fresh = engine.gradients(x, bound, torch.arange(1), layers=[model[2]])
    torch.testing.assert_close(kept.layer_gradients[0], fresh.layer_gradients[0], rtol=0, atol=0)


def test_kept_pass_serves_the_size_estimate():
    model = segnet(dims=3)
    x = torch.randn(1, 2, 8, 8, 8)
    with Engine(model) as a:
        expected = a.rows_per_pass(x.shape[1:])
    with Engine(model) as b:
        b.record(x)
        assert tuple(x.shape[1:]) in b._row_bytes
        assert b.rows_per_pass(x.shape[1:]) == expected


class _TwoBranches(nn.Module):
    """Two parallel convolutions on the input, summed, then a head: layers on parallel branches."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.left = nn.Conv2d(3, 4, 3, padding=1)
        self.right = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.merge = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        s = self.stem(x)
        h = self.act(self.left(s) + self.right(s))
        return self.head(self.merge(h).mean(dim=(2, 3)))


@pytest.mark.parametrize("names", [["left"], ["merge"], ["left", "right"], ["right", "merge"],
                                   ["stem", "left", "merge"], ["act"]])
def test_layer_only_passes_start_the_graph_at_the_layers_with_the_same_gradients(names):
    # Without dF/dx the graph starts at the captured layers (nothing before them is recorded);
    # layers on parallel branches each start their own; the gradients are those of the full graph.
    torch.manual_seed(0)
    model = _TwoBranches()
    layers = [getattr(model, n) for n in names]
    x = torch.randn(2, 2, 6, 6)
    with Engine(model) as engine:
        bound, rows = _bound(engine, x, ClassTarget(1))
        full = engine.gradients(x, bound, rows, layers=layers, input_gradient=True)
        only = engine.gradients(x, bound, rows, layers=layers, input_gradient=False)
        recorded = engine.record(x[:1], trace=False, layers=layers, guided=False, input_gradient=False)
        assert engine.backward_recorded(recorded, bound, rows[:1], layers=layers, input_gradient=True) is None
        recorded = engine.record(x[:1], trace=False, layers=layers, guided=False, input_gradient=False)
        kept = engine.backward_recorded(recorded, bound, rows[:1], layers=layers, input_gradient=False)
    assert only.inputs is None
    torch.testing.assert_close(only.scores, full.scores, rtol=0, atol=0)
    for a, b in zip(only.activations + only.layer_gradients, full.activations + full.layer_gradients):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert kept is not None
    for a, b in zip(kept.activations + kept.layer_gradients, full.activations + full.layer_gradients):
        torch.testing.assert_close(a, b[:1], rtol=1e-5, atol=1e-6)  # one row vs two: summation order
    assert _no_hooks(model)
