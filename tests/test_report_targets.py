"""What a report explains and says: region targets, label maps, map notes, layer labels, honest figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from voxplain.report import Study, write_report
from voxplain.report.figures import GridRow, comparison_grid, inspection_grid, region_slice
from voxplain.report.layer_labels import short_layer_labels
from voxplain.report.notes import map_notes, map_state
from voxplain.report.prediction import add_case_label, prediction_line, prediction_table
from voxplain.report.regions import channel_label_values, compare_segmentation, predicted_label_map
from voxplain.report.study import TargetInfo
from voxplain.report.target_choice import choose_targets, parse_targets
from voxplain.targets import EmptyRegionError, SegmentationTarget

REGIONS = {"region_names": ["TC", "WT", "ET"], "output": "sigmoid regions"}


def _region_output(shape=(6, 7, 5), et: bool = True) -> torch.Tensor:
    """(1, 3, *shape) logits: WT a box, TC inside it, ET inside TC (or nowhere)."""
    out = torch.full((1, 3, *shape), -4.0)
    out[0, 1, 1:5, 1:6, 1:4] = 3.0  # WT
    out[0, 0, 2:4, 2:5, 1:3] = 2.0  # TC
    if et:
        out[0, 2, 2:3, 3:4, 1:2] = 1.0  # ET
    return out


def _seg(shape=(6, 7, 5)) -> np.ndarray:
    seg = np.zeros(shape, np.int16)
    seg[1:5, 1:6, 1:4] = 2
    seg[2:4, 2:5, 1:3] = 1
    seg[3, 3, 2] = 4
    return seg


def test_default_region_is_the_predicted_voxels_and_pools_over_them():
    out = _region_output()
    choices = choose_targets("segment", None, out, REGIONS)
    wt = next(c for c in choices if c.label == "WT")
    assert wt.region == "predicted" and wt.voxels == 4 * 5 * 3
    assert wt.pooling == "WT logit, mean over 60 predicted voxels"
    bound = wt.target.bind(out)
    assert torch.equal(bound.mask[0], out[0, 1] > 0)
    # the score is the channel's mean over the predicted voxels, not the whole volume
    assert float(bound.score(out, torch.tensor([0]))) == pytest.approx(3.0)


def test_region_all_is_neuroxai_global_pooling():
    out = _region_output()
    (wt,) = choose_targets("segment", "WT", out, REGIONS, region="all")
    assert wt.mask is None and "all 210 voxels" in wt.pooling
    assert float(wt.target.bind(out).score(out, torch.tensor([0]))) == pytest.approx(float(out[0, 1].mean()))


def test_region_label_uses_the_brats_labels_of_the_region():
    out, seg = _region_output(), _seg()
    by_label = {c.label: c for c in choose_targets("segment", "all", out, REGIONS, region="label", seg=seg)}
    np.testing.assert_array_equal(by_label["WT"].mask, seg > 0)
    np.testing.assert_array_equal(by_label["TC"].mask, np.isin(seg, (1, 4)))
    np.testing.assert_array_equal(by_label["ET"].mask, seg == 4)
    assert "ground-truth voxels" in by_label["ET"].pooling
    with pytest.raises(ValueError, match="ground-truth segmentation.*CASE_9 has none"):
        choose_targets("segment", "WT", out, REGIONS, region="label", case_name="CASE_9")
    with pytest.raises(ValueError, match="--region must be one of"):
        choose_targets("segment", "WT", out, REGIONS, region="tumour")


def test_empty_predicted_region_is_skipped_with_the_reason():
    out = _region_output(et=False)
    choices = choose_targets("segment", "all", out, REGIONS)
    et = next(c for c in choices if c.label == "ET")
    assert et.target is None and et.skipped == "model predicts no ET voxels"
    assert [label for label, _ in parse_targets("segment", "all", out, REGIONS)] == ["TC", "WT"]
    # the API keeps raising, with an error type callers can catch
    with pytest.raises(EmptyRegionError):
        SegmentationTarget(2, region="predicted", activation="sigmoid").bind(out)


def test_softmax_label_model_channels_stand_for_brats_labels():
    assert channel_label_values({}, 4) == [(0,), (1,), (2,), (4,)]
    assert channel_label_values({"label_values": [0, 3, 7]}, 3) == [(0,), (3,), (7,)]
    assert channel_label_values({"output": "sigmoid"}, 1) == [(1, 2, 3, 4)]  # one foreground channel: any tumour
    assert channel_label_values({"output": "sigmoid"}, 2, ["a", "b"]) == [(1,), (2,)]
    out = torch.zeros(1, 4, 3, 3, 3)
    out[0, 3, 0] = 5.0  # label 4 on x = 0
    out[0, 2, 1] = 5.0  # label 2 on x = 1
    out[0, 0, 2] = 5.0  # background on x = 2
    labels = predicted_label_map(out[0], {"output": "softmax labels"})
    assert labels.dtype == np.int16
    assert set(labels[0].ravel()) == {4} and set(labels[1].ravel()) == {2} and set(labels[2].ravel()) == {0}
    seg = labels.copy()
    (c4,) = [c for c in choose_targets("segment", "3", out, {}, region="label", seg=seg)]
    np.testing.assert_array_equal(c4.mask, seg == 4)


def test_region_channels_combine_into_brats_labels():
    out = _region_output()
    labels = predicted_label_map(out[0], REGIONS, REGIONS["region_names"])
    np.testing.assert_array_equal(labels > 0, (out[0, 1] > 0).numpy())
    assert labels[2, 3, 1] == 4 and labels[3, 2, 2] == 1 and labels[1, 1, 1] == 2
    assert set(np.unique(labels)) == {0, 1, 2, 4}


def test_compare_segmentation_reports_dice_and_disagreements():
    pred = {"WT": np.ones((2, 2, 2), bool), "ET": np.zeros((2, 2, 2), bool)}
    truth = {"WT": np.ones((2, 2, 2), bool), "ET": np.eye(2, dtype=bool)[:, :, None].repeat(2, 2)}
    rows, notes = compare_segmentation(pred, truth, voxel_ml=0.027)
    assert rows[0]["dice"] == 1.0 and rows[0]["predicted_ml"] == pytest.approx(0.216)
    assert rows[1]["dice"] == 0.0 and notes == ["no ET predicted, ground truth has 4 ET voxels"]


def test_classifier_case_label_and_disagreement():
    p = add_case_label({"predicted_class": 0, "predicted_label": "LGG", "probabilities": {"LGG": 0.51, "HGG": 0.49},
                        "logits": [0.1, 0.05]}, "HGG")
    assert p["disagreements"] == ["model predicts LGG; case label HGG"] and not p["agrees_with_case_label"]
    table = prediction_table(p)
    assert table["columns"][:2] == ["class", "probability"] and table["disagree"]
    assert table["rows"][0][-1] == "predicted" and table["rows"][1][-1] == "case label"
    assert prediction_line(p) == "LGG (p 0.51); case label HGG"


def test_map_state_and_notes_give_reasons():
    zeros = np.zeros((1, 4, 4))
    assert map_state(zeros) == "all zero" and map_state(np.full((1, 4, 4), 2.0)) == "constant (2)"
    assert map_state(np.arange(16.0).reshape(1, 4, 4)) is None
    info = TargetInfo("ET logit, mean over 3 predicted voxels", warnings={"guided_backprop": ["GELU left unguided"]},
                      completeness={"integrated_gradients": {"error": 0.2, "attribution_sum": 1.2,
                                                             "score_difference": 1.0}})
    study = Study("s", np.ones((1, 4, 4)), ["grey"], {"ET": {"guided_backprop": zeros, "gradcam": np.ones((1, 4, 4)),
                                                             "guided_gradcam": zeros,
                                                             "integrated_gradients": np.eye(4)[None]}},
                  targets={"ET": info})
    assert map_notes(study, "ET", "guided_backprop")[0].startswith("map is all zero: the guided backward")
    assert map_notes(study, "ET", "guided_backprop")[1] == "GELU left unguided"
    assert "guided backprop factor is zero" in map_notes(study, "ET", "guided_gradcam")[0]
    assert map_notes(study, "ET", "integrated_gradients")[0].startswith("completeness error 20.0% (> 5%)")
    assert map_notes(study, "ET", "gradcam") == ["map is constant (1)"]
    # the method's own completeness warning (with its likely cause) is not repeated by the generic note
    info.warnings["integrated_gradients"] = ["integrated_gradients: completeness error 20.0% > 5% ...; likely cause: x"]
    assert map_notes(study, "ET", "integrated_gradients") == info.warnings["integrated_gradients"]


def test_short_layer_labels_follow_the_u_shape():
    shapes = [("a", (4, 16, 16)), ("b", (4, 16, 16)), ("c", (8, 8, 8)), ("d", (16, 4, 4)), ("e", (16, 4, 4)),
              ("f", (8, 8, 8)), ("g", (4, 16, 16)), ("h", (2, 16, 16))]
    labels = short_layer_labels(shapes, output_shape=(2, 16, 16))
    assert list(labels.values()) == ["enc 1.1", "enc 1.2", "enc 2", "bottleneck.1", "bottleneck.2", "dec 2",
                                     "dec 1", "head"]
    # MONAI's UNet: the last down block and the (wider) bottom block share the smallest size
    monai = short_layer_labels([("a", (4, 8, 8)), ("b", (8, 4, 4)), ("c", (16, 4, 4)), ("d", (4, 8, 8)),
                                ("e", (2, 16, 16))], output_shape=(2, 16, 16))
    assert list(monai.values()) == ["enc 2", "enc 3", "bottleneck", "dec 2", "head"]
    classifier = short_layer_labels([("a", (4, 16, 16)), ("b", (8, 8, 8)), ("c", (8, 8, 8))])
    assert list(classifier.values()) == ["stage 1", "stage 2.1", "stage 2.2"]


def test_slice_follows_ground_truth_then_prediction_then_attribution():
    truth = np.zeros((4, 4, 6), bool)
    truth[:, :, 1] = True
    pred = np.zeros((4, 4, 6), bool)
    pred[:, :, 4] = True
    attribution = np.zeros((4, 4, 6))
    attribution[..., 5] = 1
    assert region_slice(truth, pred, attribution) == (1, "ground truth")
    assert region_slice(None, pred, attribution) == (4, "prediction")
    assert region_slice(np.zeros_like(truth), None, attribution) == (5, "attribution")


def _volume_study(zero_method: bool = True) -> Study:
    rng = np.random.default_rng(0)
    shape = (12, 14, 10)
    truth = np.zeros(shape, bool)
    truth[2:6, 3:8, 6:9] = True
    image = rng.normal(size=(2, *shape)).astype(np.float32) + 2 * truth
    maps = {"vanilla_gradient": rng.normal(size=(2, *shape)) * truth, "gradcam": truth[None] * 1.0}
    if zero_method:
        maps["guided_backprop"] = np.zeros((2, *shape))
    info = TargetInfo("WT logit, mean over 60 predicted voxels", predicted=truth, truth=truth)
    return Study("vol", image, ["t1", "flair"], {"WT": maps}, targets={"WT": info},
                 skipped={"ET": "model predicts no ET voxels"}, predicted_labels=truth.astype(np.int16) * 2)


def test_figures_mark_empty_maps_and_skipped_targets(tmp_path, monkeypatch):
    import matplotlib.axes
    import matplotlib.figure

    texts: list[str] = []
    for cls in (matplotlib.axes.Axes, matplotlib.figure.Figure):  # texts in panels and in the footer
        def spy(self, x, y, s, *args, _original=cls.text, **kwargs):
            texts.append(str(s))
            return _original(self, x, y, s, *args, **kwargs)

        monkeypatch.setattr(cls, "text", spy)
    study = _volume_study()
    rows = [GridRow("WT", study.image, study.channels, study.maps["WT"], truth=study.targets["WT"].truth,
                    notes={m: map_notes(study, "WT", m) for m in study.maps["WT"]})]
    comparison_grid(tmp_path / "c.png", rows, notes=["ET not explained: model predicts no ET voxels"])
    assert any("map is all zero" in t for t in texts)  # the empty panel says so, it is not drawn black
    assert "ET not explained: model predicts no ET voxels" in texts  # the footer names the skipped target
    assert (tmp_path / "c.png").is_file()
    texts.clear()
    inspection_grid(tmp_path / "i.png", study.image, {"enc 1": np.zeros((1, 12, 14, 10)),
                                                      "dec 1": study.maps["WT"]["gradcam"]},
                    labels={"enc 1": "enc 1 · 12×14×10"}, truth=study.targets["WT"].truth)
    assert any(t.startswith("CAM all zero") for t in texts)


def test_summary_lists_pooling_skipped_targets_flags_and_prediction_map(tmp_path):
    from voxplain.data.nifti import NiftiMeta
    from voxplain.report.writer import ScanSpace

    study = _volume_study()
    meta = NiftiMeta.from_affine(np.diag([2.0, 2.0, 2.0, 1.0]), study.image.shape[1:])
    summary = write_report(tmp_path, [study], scans={"vol": ScanSpace(meta)})
    entry = summary["studies"][0]
    assert entry["targets"]["WT"]["pooling"] == "WT logit, mean over 60 predicted voxels"
    assert entry["skipped_targets"] == {"ET": "model predicts no ET voxels"}
    flags = entry["targets"]["WT"]["maps"]
    assert flags["guided_backprop"]["state"] == "all zero" and flags["vanilla_gradient"]["state"] == "ok"
    assert flags["guided_backprop"]["notes"][0].startswith("map is all zero")
    assert json.loads((tmp_path / "summary.json").read_text())["studies"][0]["prediction_map"] == "prediction.nii.gz"
    import nibabel as nib

    written = nib.load(tmp_path / "prediction.nii.gz")
    assert written.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(written.dataobj), study.predicted_labels)


def test_method_extras_become_warnings_and_completeness_checks():
    """The interface of method extras: ``extras[method]["warnings"]`` and ``["completeness"]`` per sample."""
    from types import SimpleNamespace

    from voxplain.report.case_study import target_info
    from voxplain.report.target_choice import TargetChoice

    explanation = SimpleNamespace(
        maps={"integrated_gradients": None, "guided_backprop": None, "gradcam": None},
        extras={"integrated_gradients": {"completeness": {"error": [0.31], "attribution_sum": [3.9e5],
                                                          "score_difference": [0.011]},
                                         "warnings": ["InstanceNorm layers: the gradient at the baseline explodes"]},
                "guided_backprop": {"warnings": ["GELU left unguided"]},
                "xrai": {"ranks": "not a warning"}})
    info = target_info(TargetChoice("WT", None, "WT logit, mean over 5 predicted voxels"), explanation)
    assert info.completeness == {"integrated_gradients": {"error": 0.31, "attribution_sum": 3.9e5,
                                                          "score_difference": 0.011}}
    assert info.warnings == {"integrated_gradients": ["InstanceNorm layers: the gradient at the baseline explodes"],
                             "guided_backprop": ["GELU left unguided"]}
    # an explanation from before methods reported extras: nothing to add, nothing breaks
    assert target_info(TargetChoice("WT", None, ""), SimpleNamespace(maps={"gradcam": None}, extras={})).warnings == {}
