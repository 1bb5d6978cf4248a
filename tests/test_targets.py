"""Targets: which scalar score of a model output is explained."""

from __future__ import annotations

import pytest
import torch

from voxplain import BratsRegionTarget, ClassTarget, SegmentationTarget
from voxplain.targets import as_target


def _rows(b: int) -> torch.Tensor:
    return torch.arange(b)


# ---------------------------------------------------------------------------
# ClassTarget


def test_class_logit_and_probability():
    out = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    bound = ClassTarget(1).bind(out)
    assert torch.equal(bound.classes, torch.tensor([1, 1]))
    assert torch.allclose(bound.score(out, _rows(2)), torch.tensor([2.0, -1.0]))
    prob = ClassTarget(1, output="probability").bind(out).score(out, _rows(2))
    assert torch.allclose(prob, torch.softmax(out, 1)[:, 1])
    sig = ClassTarget(1, output="probability", activation="sigmoid").bind(out).score(out, _rows(2))
    assert torch.allclose(sig, torch.sigmoid(out[:, 1]))


def test_class_single_logit_probability_is_sigmoid():
    out = torch.tensor([[0.3], [-2.0]])
    bound = ClassTarget(None, output="probability").bind(out)
    assert bound.classes.tolist() == [0, 0]
    assert torch.allclose(bound.score(out, _rows(2)), torch.sigmoid(out[:, 0]))


def test_class_per_sample_indices_and_derived_rows():
    out = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    bound = ClassTarget([2, 0]).bind(out)
    assert bound.classes.tolist() == [2, 0]
    # rows derived from samples 1, 0, 1 score the class of their own sample
    rows = torch.tensor([[9.0, 8.0, 7.0], [6.0, 5.0, 4.0], [3.0, 2.0, 1.0]])
    assert bound.score(rows, torch.tensor([1, 0, 1])).tolist() == [9.0, 4.0, 3.0]
    assert ClassTarget(torch.tensor([1, 2])).bind(out).classes.tolist() == [1, 2]


def test_class_predicted_when_none():
    out = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    assert ClassTarget().bind(out).classes.tolist() == [1, 2]


def test_class_index_out_of_range_names_the_range():
    out = torch.zeros(2, 3)
    with pytest.raises(IndexError, match=r"0\.\.2"):
        ClassTarget(3).bind(out)
    with pytest.raises(IndexError, match="out of range"):
        ClassTarget(-1).bind(out)


def test_class_bad_index_count_and_type():
    out = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="expected 1 or 2"):
        ClassTarget([0, 1, 2]).bind(out)
    with pytest.raises(TypeError, match="int"):
        ClassTarget(1.5).bind(out)


def test_class_wrong_output_rank():
    with pytest.raises(ValueError, match=r"\(B, K\).*SegmentationTarget"):
        ClassTarget(0).bind(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="output must be one of"):
        ClassTarget(0, output="softmax")


# ---------------------------------------------------------------------------
# SegmentationTarget


def _seg_output() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 4, 5, 6)


def test_segmentation_global_mean():
    out = _seg_output()
    bound = SegmentationTarget(1).bind(out)
    assert torch.allclose(bound.score(out, _rows(2)), out[:, 1].flatten(1).mean(1))
    bound = SegmentationTarget([0, 2]).bind(out)
    expected = torch.stack([out[0, 0].mean(), out[1, 2].mean()])
    assert torch.allclose(bound.score(out, _rows(2)), expected)


def test_segmentation_predicted_region():
    out = _seg_output()
    bound = SegmentationTarget(2, region="predicted").bind(out)
    mask = out.argmax(1) == 2
    expected = torch.stack([out[i, 2][mask[i]].mean() for i in range(2)])
    assert torch.allclose(bound.score(out, _rows(2)), expected)
    # the region is fixed at binding: a later output is pooled over the same voxels
    other = torch.randn_like(out)
    expected = torch.stack([other[i, 2][mask[i]].mean() for i in range(2)])
    assert torch.allclose(bound.score(other, _rows(2)), expected)


@pytest.mark.parametrize("shape", ["spatial", "batch", "batch_channel"])
def test_segmentation_user_mask_shapes(shape):
    out = _seg_output()
    mask = torch.zeros(4, 5, 6, dtype=torch.bool)
    mask[1:3, 2:4, 0:5] = True
    given = {"spatial": mask, "batch": mask.expand(2, 4, 5, 6).float(),
             "batch_channel": mask[None, None].expand(2, 1, 4, 5, 6).int()}[shape]
    bound = SegmentationTarget(0, region=given).bind(out)
    expected = torch.stack([out[i, 0][mask].mean() for i in range(2)])
    assert torch.allclose(bound.score(out, _rows(2)), expected)


def test_segmentation_mask_of_wrong_shape():
    with pytest.raises(ValueError, match=r"spatial shape \(4, 5, 6\)"):
        SegmentationTarget(0, region=torch.ones(4, 5)).bind(_seg_output())


def test_segmentation_empty_region():
    out = _seg_output()
    with pytest.raises(ValueError, match="empty"):
        SegmentationTarget(0, region=torch.zeros(4, 5, 6)).bind(out)
    out[:, 1] = -100.0  # class 1 is never predicted
    with pytest.raises(ValueError, match=r"empty for sample\(s\) \[0, 1\]"):
        SegmentationTarget(1, region="predicted").bind(out)
    with pytest.raises(ValueError, match="region must be"):
        SegmentationTarget(1, region="tumour").bind(out)


def test_segmentation_probability_softmax_and_sigmoid():
    out = _seg_output()
    soft = SegmentationTarget(1, output="probability").bind(out).score(out, _rows(2))
    assert torch.allclose(soft, torch.softmax(out, 1)[:, 1].flatten(1).mean(1))
    sig = SegmentationTarget(1, output="probability", activation="sigmoid").bind(out).score(out, _rows(2))
    assert torch.allclose(sig, torch.sigmoid(out[:, 1]).flatten(1).mean(1))
    # sigmoid channels: the predicted region is where the logit is positive
    bound = SegmentationTarget(1, region="predicted", activation="sigmoid").bind(out)
    pos = out[:, 1] > 0
    expected = torch.stack([out[i, 1][pos[i]].mean() for i in range(2)])
    assert torch.allclose(bound.score(out, _rows(2)), expected)


def test_segmentation_errors():
    with pytest.raises(ValueError, match=r"\(B, K, \*spatial\).*ClassTarget"):
        SegmentationTarget(0).bind(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="needs a class index"):
        SegmentationTarget(None)
    with pytest.raises(IndexError, match=r"0\.\.2"):
        SegmentationTarget(5).bind(_seg_output())


def test_segmentation_1d_output():
    out = torch.randn(1, 2, 7)
    assert torch.allclose(SegmentationTarget(1).bind(out).score(out, _rows(1)), out[:, 1].mean(1))


# ---------------------------------------------------------------------------
# BratsRegionTarget


def test_brats_regions_monai_order():
    out = _seg_output()  # channels TC, WT, ET
    for name, ch in (("TC", 0), ("WT", 1), ("ET", 2)):
        bound = BratsRegionTarget(name).bind(out)
        assert torch.allclose(bound.score(out, _rows(2)), out[:, ch].flatten(1).mean(1))
    prob = BratsRegionTarget("et", output="probability").bind(out).score(out, _rows(2))
    assert torch.allclose(prob, torch.sigmoid(out[:, 2]).flatten(1).mean(1))


def test_brats_regions_custom_order_and_predicted():
    out = _seg_output()
    bound = BratsRegionTarget("TC", channels=("ET", "TC", "WT"), region="predicted").bind(out)
    pos = out[:, 1] > 0
    expected = torch.stack([out[i, 1][pos[i]].mean() for i in range(2)])
    assert torch.allclose(bound.score(out, _rows(2)), expected)
    with pytest.raises(ValueError, match="ET, TC and WT once"):
        BratsRegionTarget("TC", channels=("ET", "TC", "TC"))


def test_brats_labels_union_of_softmax():
    torch.manual_seed(1)
    out = torch.randn(2, 4, 4, 5, 6)  # labels 0, 1, 2, 4
    p = torch.softmax(out, 1)
    for name, members in (("ET", [3]), ("TC", [1, 3]), ("WT", [1, 2, 3])):
        bound = BratsRegionTarget(name, layout="labels").bind(out)
        expected = p[:, members].sum(1).flatten(1).mean(1)
        assert torch.allclose(bound.score(out, _rows(2)), expected, atol=1e-6)
    # predicted WT region: voxels whose argmax label is 1, 2 or 4
    bound = BratsRegionTarget("WT", layout="labels", region="predicted").bind(out)
    region = out.argmax(1) > 0
    wt = p[:, 1:].sum(1)
    expected = torch.stack([wt[i][region[i]].mean() for i in range(2)])
    assert torch.allclose(bound.score(out, _rows(2)), expected, atol=1e-6)


def test_brats_labels_custom_channels_and_errors():
    out = torch.randn(1, 3, 4, 4, 4)
    bound = BratsRegionTarget("TC", layout="labels", channels=(0, 4, 1)).bind(out)
    expected = torch.softmax(out, 1)[:, [1, 2]].sum(1).flatten(1).mean(1)
    assert torch.allclose(bound.score(out, _rows(1)), expected, atol=1e-6)
    with pytest.raises(ValueError, match="lack label"):
        BratsRegionTarget("WT", layout="labels", channels=(0, 1, 4))
    with pytest.raises(ValueError, match="output='probability'"):
        BratsRegionTarget("WT", layout="labels", output="logit")


def test_brats_shape_mismatch_and_bad_names():
    with pytest.raises(ValueError, match=r"\(B, 3, \*spatial\).*got \(1, 4, 4, 4, 4\)"):
        BratsRegionTarget("ET").bind(torch.zeros(1, 4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 4, \*spatial\)"):
        BratsRegionTarget("ET", layout="labels").bind(torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="must be one of"):
        BratsRegionTarget("NCR")
    with pytest.raises(ValueError, match="layout"):
        BratsRegionTarget("ET", layout="channels")


# ---------------------------------------------------------------------------
# as_target


def test_as_target():
    t = ClassTarget(2)
    assert as_target(t) is t
    assert isinstance(as_target(1), ClassTarget) and as_target(1).index == 1
    assert isinstance(as_target(None), ClassTarget) and as_target(None).index is None
    assert as_target([0, 1]).index == [0, 1]
    assert isinstance(as_target(torch.tensor([1, 0])), ClassTarget)
    wt = as_target("wt")
    assert isinstance(wt, BratsRegionTarget) and wt.name == "WT"
    for bad in (1.5, True, "tumour", {"index": 1}):
        with pytest.raises(TypeError, match="target must be"):
            as_target(bad)
