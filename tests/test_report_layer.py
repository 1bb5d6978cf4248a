"""The report layer on synthetic arrays: display scaling, embedding, NIfTI maps, summaries, figures."""

from __future__ import annotations

import base64
import json
import re
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch

from voxplain.data.nifti import load_nifti
from voxplain.report import Study, prediction_summary, render_html, save_map_nifti, write_report
from voxplain.report.volumes import display_image, display_map, downsample


def test_display_map_reduces_channels_and_scales_to_the_99th_percentile():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(3, 10, 12, 8)).astype(np.float32)
    shown, vmax = display_map(m)
    reduced = np.abs(m).sum(0)
    expected_top = np.quantile(reduced.astype(np.float64), 0.99)
    assert vmax == pytest.approx(expected_top, rel=1e-5)
    np.testing.assert_allclose(shown, np.clip(reduced / expected_top, 0, 1), rtol=1e-5, atol=1e-6)
    zeros, top = display_map(np.zeros((1, 4, 4)))
    assert not zeros.any() and top == 0


def test_display_image_keeps_background_black():
    img = np.zeros((6, 6), np.float32)
    img[2:4, 2:4] = [[-1.0, 0.5], [1.0, 2.0]]
    out = display_image(img)
    assert out[0, 0] == 0 and out.max() == 1 and out.min() == 0


def test_downsample_block_means_under_the_voxel_budget():
    v = np.arange(4 * 6 * 2, dtype=np.float32).reshape(4, 6, 2)
    small, factor = downsample(v, max_voxels=12)
    assert factor == 2 and small.shape == (2, 3, 1)
    assert small[0, 0, 0] == pytest.approx(v[:2, :2, :2].mean())
    same, one = downsample(v, max_voxels=1000)
    assert one == 1 and same is v


def test_study_checks_shapes():
    with pytest.raises(ValueError, match="spatial shape"):
        Study("s", np.zeros((2, 4, 4, 4)), ["a", "b"], {"t": {"m": np.zeros((2, 4, 4, 5))}})
    with pytest.raises(ValueError, match="channel name"):
        Study("s", np.zeros((2, 4, 4, 4)), ["a"], {})


def _payload(page: str) -> dict:
    raw = re.search(r'<script type="application/json" id="voxplain-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(raw)


def _unpack(b64: str, shape) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(b64)), np.uint8).reshape(shape)


def test_html_embeds_quantised_maps_and_nothing_external():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 8, 10, 6)).astype(np.float32)
    m = rng.normal(size=(2, 8, 10, 6)).astype(np.float32)
    study = Study("vol", image, ["t1", "flair"], {"WT": {"vanilla_gradient": m}}, prediction={"label": "x</script>"})
    page = render_html([study], settings={"seed": 3})
    assert "http://" not in page and "https://" not in page and "<link" not in page
    data = _payload(page)
    (s,) = data["studies"]
    assert s["dims"] == [8, 10, 6] and s["channels"] == ["t1", "flair"]
    got = _unpack(s["overlays"]["WT"]["vanilla_gradient"]["data"], s["dims"])
    expected = np.clip(np.rint(display_map(m)[0] * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert s["prediction"]["label"] == "x</script>"  # escaped in the page, intact in the data
    assert len(data["lut"]) == 256 * 3


def test_html_downsamples_large_volumes():
    big = np.random.default_rng(2).random((1, 40, 40, 40)).astype(np.float32)
    page = render_html([Study("big", big, ["c"], {"t": {"m": big}})], max_voxels=20**3)
    (s,) = _payload(page)["studies"]
    assert s["dims"] == [20, 20, 20] and s["downsampled"] == 2 and s["spacing"] == [2.0, 2.0, 2.0]


def test_nifti_map_round_trips_through_a_lps_source(tmp_path):
    affine = np.array([[-2.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])
    src = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 4), np.int16), affine), src)
    _, meta = load_nifti(src)
    m = np.zeros((2, 5, 6, 4), np.float32)  # RAS order
    m[1, 0, 1, 2] = 7.5
    save_map_nifti(m, meta, tmp_path / "map.nii.gz")
    img = nib.load(tmp_path / "map.nii.gz")
    np.testing.assert_allclose(img.affine, affine)
    assert img.shape == (5, 6, 4, 2)
    stored = np.asarray(img.dataobj)
    assert np.argwhere(stored).tolist() == [[4, 4, 2, 1]]  # L/P axes flipped back
    back, _ = load_nifti(tmp_path / "map.nii.gz", channels_from_4d=True)  # one volume per modality
    np.testing.assert_array_equal(back, m)


def test_prediction_summary_classification_and_regions():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    p = prediction_summary(logits, 0, ["a", "b", "c"])
    assert p["predicted_label"] == "b" and p["probabilities"]["b"] == pytest.approx(0.8438, abs=1e-4)
    seg = torch.full((1, 2, 3, 3), -5.0)
    seg[0, 1, 0, :2] = 5.0
    r = prediction_summary(seg, 0, ["TC", "WT"], independent=True)
    assert r["voxels_per_channel"] == {"TC": 0, "WT": 2}


def test_write_report_files(tmp_path):
    rng = np.random.default_rng(3)
    vol = Study("v", rng.random((1, 6, 7, 5)), ["t1"], {"t": {"a": rng.random((1, 6, 7, 5)),
                                                                "b": rng.random((1, 6, 7, 5))}},
                layers={"conv1": rng.random((1, 6, 7, 5)), "conv2": rng.random((1, 6, 7, 5))})
    img = Study("i", rng.random((3, 9, 8)), ["r", "g", "b"], {"t": {"a": rng.random((3, 9, 8))}})
    summary = write_report(tmp_path / "r", [vol, img], settings={"seed": 0})
    assert (tmp_path / "r" / "report.html").is_file()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["figures"] == summary["figures"]
    assert len(summary["figures"]) == 3 and all((tmp_path / "r" / f).is_file() for f in summary["figures"])
    with pytest.raises(ValueError, match="unique"):
        write_report(tmp_path / "r2", [vol, vol])
