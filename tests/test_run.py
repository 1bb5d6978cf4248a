"""The run layer: one setup for every entry point, and one owner of the passes methods share."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from torch import nn

import voxplain
from tiny_models import classifier, segnet
from voxplain import ClassTarget, SegmentationTarget, explain, explain_detailed, gradcam_per_layer
from voxplain.run import open_run

FAMILY = ["vanilla_gradient", "gradient_x_input", "guided_backprop", "gradcam", "guided_gradcam"]


@contextlib.contextmanager
def counting_forwards(model: nn.Module):
    """Count the model's forward passes (a hook on the model itself fires once per pass)."""
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        yield calls
    finally:
        handle.remove()


def _forwards(model, x, target, methods, **kw) -> int:
    with counting_forwards(model) as calls:
        explain(model, x, target, methods=methods, **kw)
    return len(calls)


@pytest.mark.parametrize("methods, passes", [
    (["vanilla_gradient"], 1),  # the first forward binds the target and serves the gradient
    (["gradcam"], 1),  # ... or the backward that stops at the CAM layer
    (["vanilla_gradient", "gradient_x_input", "gradcam"], 1),  # one forward/backward for all three
    (["gradcam", "gradient_x_input", "vanilla_gradient"], 1),  # in any order
    (["guided_backprop", "guided_gradcam"], 2),  # one guided pass for both, and Grad-CAM's
    (["guided_gradcam", "guided_backprop"], 2),
    (FAMILY, 2),  # one plain pass, one guided pass
    (FAMILY[::-1], 2),
])
def test_passes_are_shared(methods, passes):
    model, x = classifier(dims=2), torch.randn(1, 2, 12, 12)
    assert _forwards(model, x, 0, methods) == passes


def test_passes_are_shared_on_a_batch_and_a_segmentation_net():
    net, x = segnet(dims=3), torch.randn(2, 2, 8, 8, 8)
    assert _forwards(net, x, SegmentationTarget(1), FAMILY, batch_size=2) == 2
    assert _forwards(net, x, SegmentationTarget(1), ["vanilla_gradient", "gradcam"], batch_size=2) == 1


def test_gradcam_per_layer_is_one_pass():
    model, x = classifier(dims=2), torch.randn(1, 2, 12, 12)
    with counting_forwards(model) as calls:
        cams = gradcam_per_layer(model, x, 1)
    assert len(calls) == 1 and len(cams) == 2


def test_method_order_does_not_change_results():
    model, x = classifier(dims=2, seed=3), torch.randn(2, 2, 12, 12)
    methods = FAMILY + ["integrated_gradients", "smoothgrad", "guided_ig"]
    options = {"integrated_gradients": {"steps": 5}, "smoothgrad": {"samples": 3}, "guided_ig": {"steps": 4}}
    reference = explain(model, x, [0, 2], methods=methods, options=options)
    for order in (methods[::-1], methods[3:] + methods[:3], ["smoothgrad", "gradcam", "integrated_gradients"]):
        maps = explain(model, x, [0, 2], methods=order, options={k: v for k, v in options.items() if k in order})
        for name, m in maps.items():
            torch.testing.assert_close(m, reference[name], rtol=0, atol=0, msg=name)


def test_alone_equals_together():
    model, x = classifier(dims=3, seed=4), torch.randn(1, 2, 8, 8, 8)
    together = explain(model, x, 1, methods=FAMILY)
    for name in FAMILY:
        torch.testing.assert_close(voxplain.create_method(name)(model, x, 1), together[name], rtol=0, atol=0)


def test_first_pass_is_dropped_by_any_other_pass():
    model, x = classifier(dims=1), torch.randn(1, 2, 8)
    with open_run(model, x, 0) as run:
        assert run._input.first is not None
        run.scores(x.clone(), torch.arange(1))
        assert run._input.first is None  # a pass at other rows frees the kept graph
    with open_run(model, x, 0) as run:
        run.gradients(x.clone(), torch.arange(1))
        assert run._input.first is None
    with open_run(model, x, 0) as run:
        run.input_gradients()
        assert run._input.first is None  # used once
    with open_run(model, x, 0) as run:
        kept = run._input
    assert kept.first is None  # closing the run drops it too


def test_retargeted_run_shares_the_first_pass_and_the_trace():
    net, x = segnet(dims=2), torch.randn(1, 2, 8, 8)
    with counting_forwards(net) as calls, open_run(net, x, SegmentationTarget(0)) as run:
        other = run.retarget(SegmentationTarget(2))
        a = other.input_gradients()
        b = run.input_gradients()  # the first pass went to `other`: a fresh pass
        assert run.trace() is other.trace()
    assert len(calls) == 2
    torch.testing.assert_close(a, explain(net, x, SegmentationTarget(2), ["vanilla_gradient"])["vanilla_gradient"],
                               rtol=0, atol=0)
    assert not torch.equal(a, b)


def test_target_chosen_from_the_output():
    model, x = classifier(dims=2), torch.randn(1, 2, 8, 8)
    seen = []

    def least_likely(output):
        seen.append(output.shape)
        return ClassTarget(int(output[0].argmin()))

    with open_run(model, x, least_likely) as run:
        assert seen == [(1, 3)] and int(run.target.classes[0]) == int(run.output[0].argmin())


def test_every_method_has_an_extras_dict():
    model, x = classifier(dims=2), torch.randn(1, 2, 8, 8)
    names = ["vanilla_gradient", "gradcam", "integrated_gradients", "occlusion"]
    out = explain_detailed(model, x, 0, names, {"integrated_gradients": {"steps": 8}, "occlusion": {"window": 4}})
    assert set(out.extras) == set(names) and all(isinstance(v, dict) for v in out.extras.values())
    assert out.extras["vanilla_gradient"] == {}


def test_attribute_must_return_an_attribution():
    class Bare(voxplain.Method):
        name = "bare"

        def attribute(self, run):
            return run.x

    with pytest.raises(TypeError, match="must return an Attribution"):
        Bare()(classifier(dims=1), torch.randn(1, 2, 8), 0)


def test_row_chunks_cover_sample_major_rows():
    model, x = classifier(dims=1), torch.randn(3, 2, 8)
    with open_run(model, x, 0, batch_size=4) as run:
        chunks = list(run.row_chunks(5))
        assert [len(c) for c in chunks] == [4, 4, 4, 3]  # 15 rows in equal pieces
        rows = list(itertools.chain.from_iterable(zip(c.sample.tolist(), c.step.tolist()) for c in chunks))
        assert rows == [(i, j) for i in range(3) for j in range(5)]
        assert chunks[1].runs == [(0, 4, 5), (1, 0, 3)]
        total = torch.zeros(3, 1)
        for c in chunks:
            c.add_per_sample(total, torch.ones(len(c), 1), weights=torch.arange(5.0))
        assert total.flatten().tolist() == [10.0, 10.0, 10.0]
