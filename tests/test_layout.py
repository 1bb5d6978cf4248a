"""Memory layout of the engine's passes: channels-last gives the same maps, the model comes back as it came,
and the layout trial keeps the faster layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tiny_models import classifier, segnet
from voxplain import ClassTarget, Engine, SegmentationTarget, explain
from voxplain.engine import ModelState
from voxplain.layout import _UNSET, Layout, model_layout_only
from voxplain.methods import create_methods
from voxplain.run import Run

FAMILY = ["vanilla_gradient", "gradient_x_input", "guided_backprop", "gradcam", "guided_gradcam"]


def _layouts(model: nn.Module) -> list[tuple[int, ...]]:
    return [t.stride() for t in list(model.parameters()) + list(model.buffers())]


def _explain_with(model, x, target, methods, options=None, channels_last=None):
    """``explain`` on an engine with the layout forced (or measured, with None)."""
    objs = create_methods(methods, options)
    with Engine(model, channels_last=channels_last) as engine:
        run = Run(engine, x, target)
        run.share(objs)
        return run.explain(objs).maps, engine


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_gives_the_same_maps(dims):
    model = classifier(dims=dims, seed=3)
    x = torch.randn(2, 2, *([10] * dims))
    methods = FAMILY + ["integrated_gradients", "smoothgrad", "occlusion"]
    options = {"integrated_gradients": {"steps": 6}, "smoothgrad": {"samples": 3}, "occlusion": {"window": 4}}
    before = _layouts(model)
    plain, _ = _explain_with(model, x, ClassTarget([0, 2]), methods, options, channels_last=False)
    last, engine = _explain_with(model, x, ClassTarget([0, 2]), methods, options, channels_last=True)
    assert set(engine.layout.chosen.values()) == {torch.channels_last if dims == 2 else torch.channels_last_3d}
    for name in methods:
        torch.testing.assert_close(last[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
        assert last[name].is_contiguous(), name  # maps come back in the input's (channels-first) layout
    assert _layouts(model) == before


def test_segmentation_net_channels_last():
    net = segnet(dims=3)
    x = torch.randn(1, 2, 8, 8, 8)
    plain, _ = _explain_with(net, x, SegmentationTarget(1), ["vanilla_gradient", "gradcam"], channels_last=False)
    last, _ = _explain_with(net, x, SegmentationTarget(1), ["vanilla_gradient", "gradcam"], channels_last=True)
    for name in plain:
        torch.testing.assert_close(last[name], plain[name], rtol=1e-5, atol=1e-6)


def test_model_state_restores_the_memory_layout_of_every_tensor():
    model = classifier(dims=2)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    # a parameter the user keeps channels-last stays so; the others come back contiguous
    model[4].weight.data = model[4].weight.data.contiguous(memory_format=torch.channels_last)
    before = _layouts(model) + [model[0].weight.grad.stride()]
    values = [t.clone() for t in model.state_dict().values()]
    state = ModelState(model)
    model.to(memory_format=torch.channels_last)
    model[0].weight.grad = model[0].weight.grad.contiguous(memory_format=torch.channels_last)
    assert _layouts(model) != before[:-1]
    state.restore()
    assert _layouts(model) + [model[0].weight.grad.stride()] == before
    for a, b in zip(values, model.state_dict().values()):
        assert torch.equal(a, b)


def test_model_comes_back_as_it_came_after_an_error_in_channels_last():
    model = classifier(dims=2)
    before = _layouts(model)
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with Engine(model, channels_last=True) as engine:
            engine.layout.chosen[((2, 8, 8), True)] = torch.channels_last
            engine.gradients(torch.randn(1, 2, 8, 8), ClassTarget(0).bind(torch.zeros(1, 3)), torch.arange(1))
            assert _layouts(model) != before
            raise RuntimeError("boom")
    assert _layouts(model) == before and list(model.parameters()) == params  # same Parameter objects


def test_the_weights_come_back_in_their_own_storage():
    # laid out channels-last for the passes, then given back as they came: the very tensors, not copies
    model = classifier(dims=2)
    storage = [p.data_ptr() for p in model.parameters()]
    values = [p.detach().clone() for p in model.parameters()]
    maps, engine = _explain_with(model, torch.randn(2, 2, 8, 8), ClassTarget(0), ["vanilla_gradient", "smoothgrad"],
                                 {"smoothgrad": {"samples": 4}}, channels_last=True)
    assert torch.channels_last in engine.layout.chosen.values()
    assert [p.data_ptr() for p in model.parameters()] == storage
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values))


class _Clock:
    """A clock that advances by the given seconds per reading pair (start, end of a probe)."""

    def __init__(self, durations):
        self.durations, self.now, self.reads = list(durations), 0.0, 0

    def __call__(self):
        if self.reads % 2 == 1:
            self.now += self.durations.pop(0)
        self.reads += 1
        return self.now


KEY = ((2, 8, 8), True, False)  # rows of shape (2, 8, 8), forward and backward, several rows a pass


def _probing(layout: Layout):
    """A probe that records the layout each of its passes ran in (what the walk's rows would get)."""
    seen = []

    def probe(rows):
        seen.append(layout._format_for((2, 8, 8), True, rows))
    return probe, seen


def _big(engine):
    engine._row_bytes[(2, 8, 8)] = 1 << 30  # a model large enough to be worth a trial
    return engine


@pytest.mark.parametrize("durations, expected", [
    ([1.0, 1.2, 1.0, 0.5], torch.channels_last),  # channels-last clearly faster after warm-up
    ([1.0, 0.5, 1.0, 0.95], None),  # within the margin: keep the layout the model came in
    ([0.001], None),  # too quick to time: no trial at all
])
def test_the_trial_keeps_the_faster_layout(monkeypatch, durations, expected):
    model = classifier(dims=2)
    with _big(Engine(model)) as engine:
        layout: Layout = engine.layout
        monkeypatch.setattr(layout, "_clock", _Clock(durations + [1.0] * 10))
        probe, probed = _probing(layout)
        with layout.walk(2, (2, 8, 8), True, 16, probe):  # a long walk: measured on its first meeting
            in_walk = [layout._format_for((2, 8, 8), True, rows) for rows in (2, 2, 1)]
        assert layout.chosen[KEY] is expected
        assert in_walk == [expected] * 3  # every pass of the walk, the smaller last one too, in one layout
    if expected is torch.channels_last:  # the probes alternated (four each) before any pass of the walk
        assert probed == [None, torch.channels_last] * 4
    if durations == [0.001]:
        assert probed == [None]


def test_a_short_walk_is_measured_from_its_second_meeting_on(monkeypatch):
    model = classifier(dims=2)
    with _big(Engine(model)) as engine:
        layout = engine.layout
        monkeypatch.setattr(layout, "_clock", _Clock([1.0, 1.2, 1.0, 0.5] + [1.0] * 10))
        probe, probed = _probing(layout)
        with layout.walk(2, (2, 8, 8), True, 3, probe):
            assert layout._format_for((2, 8, 8), True, 2) is None  # the model's own layout, undecided
        assert probed == [] and KEY not in layout.chosen
    with _big(Engine(model)) as again:  # the next call on the same model: the trial is due
        monkeypatch.setattr(again.layout, "_clock", _Clock([1.0, 1.2, 1.0, 0.5] + [1.0] * 10))
        probe, probed = _probing(again.layout)
        with again.layout.walk(2, (2, 8, 8), True, 1, probe):
            pass
        assert len(probed) == 8 and again.layout.chosen[KEY] is torch.channels_last


def test_a_walk_inside_a_walk_over_the_same_rows_keeps_its_layout(monkeypatch):
    with _big(Engine(classifier(dims=2))) as engine:
        layout = engine.layout
        layout.chosen[KEY] = torch.channels_last
        layout.chosen[((2, 8, 8), True, True)] = None  # one-row passes chose otherwise
        probe, _ = _probing(layout)
        with layout.walk(2, (2, 8, 8), True, 4, probe):
            with layout.walk(1, (2, 8, 8), True, 1, probe):  # a pass of the walk, chunked again
                assert layout._format_for((2, 8, 8), True, 1) is torch.channels_last
        assert layout._format_for((2, 8, 8), True, 1) is None


def test_the_choice_is_remembered_for_the_model(monkeypatch):
    # each explain() opens an engine: a later one on the same model must not measure again
    model = classifier(dims=2)
    with _big(Engine(model)) as engine:
        monkeypatch.setattr(engine.layout, "_clock", _Clock([1.0, 1.2, 1.0, 0.5] + [1.0] * 10))
        with engine.layout.walk(2, (2, 8, 8), True, 16, _probing(engine.layout)[0]):
            pass
    with _big(Engine(model)) as again:
        assert again.layout.chosen[KEY] is torch.channels_last
        probe, probed = _probing(again.layout)
        with again.layout.walk(2, (2, 8, 8), True, 16, probe):
            assert again.layout._format_for((2, 8, 8), True, 2) is torch.channels_last
        assert probed == []  # no trial
    with Engine(classifier(dims=2)) as other:  # another model measures for itself
        assert KEY not in other.layout.chosen
    with Engine(model, channels_last=False) as forced:  # a forced layout ignores what was measured
        assert KEY not in forced.layout.chosen


def test_no_trial_on_tiny_models_or_without_convolutions():
    with Engine(classifier(dims=2)) as engine:
        engine._row_bytes[(2, 8, 8)] = 1024  # a tiny model: never probed, however often met
        probe, probed = _probing(engine.layout)
        for _ in range(3):
            with engine.layout.walk(2, (2, 8, 8), True, 16, probe):
                pass
        assert probed == [] and KEY not in engine.layout.chosen
        assert engine.layout.candidate((2, 8)) is None  # 1D rows: no channels-last format
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    with Engine(mlp) as engine:
        assert engine.layout.candidate((2, 8, 8)) is None  # no 2D convolution to gain from it


def test_a_probe_the_model_refuses_decides_nothing(monkeypatch):
    with _big(Engine(classifier(dims=2))) as engine:
        def refuse(rows):
            raise RuntimeError("not on these rows")
        with engine.layout.walk(2, (2, 8, 8), True, 16, refuse):
            assert engine.layout._format_for((2, 8, 8), True, 2) is None
        assert engine.layout.chosen[KEY] is None and engine.layout._forced is _UNSET  # the probe's format ends


def test_tiny_models_are_never_timed():
    # tests and tiny models stay deterministic: their passes are far below the trial's minimum
    model = classifier(dims=2)
    x = torch.randn(1, 2, 12, 12)
    a = explain(model, x, 0, ["integrated_gradients"], {"integrated_gradients": {"steps": 64}})
    b = explain(model, x, 0, ["integrated_gradients"], {"integrated_gradients": {"steps": 64}})
    assert torch.equal(a["integrated_gradients"], b["integrated_gradients"])


def test_blur_ig_runs_in_the_model_layout_even_when_channels_last_is_forced():
    # its gradients at heavily blurred points are ill-conditioned: oneDNN's channels-last kernels moved
    # a 2D CNN's map far from its float64 value, so Blur IG keeps the model's own layout
    model = classifier(dims=2, seed=3)
    x = torch.randn(2, 2, 12, 12)
    options = {"blur_ig": {"steps": 8}}
    plain, _ = _explain_with(model, x, ClassTarget([0, 2]), ["blur_ig"], options, channels_last=False)
    forced, engine = _explain_with(model, x, ClassTarget([0, 2]), ["blur_ig"], options, channels_last=True)
    assert torch.equal(forced["blur_ig"], plain["blur_ig"])
    assert not engine.layout._pinned  # the pin ends with the method
    assert _layouts(model) == _layouts(classifier(dims=2, seed=3))


def test_model_layout_only_turns_the_trials_off():
    # the evaluation commands run inside it: their metrics must not depend on a timing
    with model_layout_only():
        with _big(Engine(classifier(dims=2))) as engine:
            probe, probed = _probing(engine.layout)
            for _ in range(2):
                with engine.layout.walk(2, (2, 8, 8), True, 16, probe):
                    assert engine.layout._format_for((2, 8, 8), True, 2) is None
            assert probed == [] and engine.layout.chosen[KEY] is None
    with Engine(classifier(dims=2)) as engine:
        assert engine.layout.channels_last is None  # measured again outside it
