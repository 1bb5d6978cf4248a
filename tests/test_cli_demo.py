"""`voxplain demo --preset tiny`: the whole pipeline on the shipped models, outputs consistent."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from test_report_browser import check_report_in_browser
from voxplain.cli import main
from voxplain.demo import CXAI_METHODS, NEUROXAI_METHODS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--out", str(out), "--preset", "tiny", "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_demo_summary_lists_every_method_that_ran(demo):
    summary = json.loads((demo / "summary.json").read_text())
    studies = {s["name"]: s for s in summary["studies"]}
    grade = studies["Glioma grade (3D classifier)"]
    seg = studies["Sub-region segmentation (3D U-Net)"]
    slices = studies["Tumour vs no tumour (2D slice CNN)"]
    (grade_target,) = grade["settings"]["targets"].values()
    assert list(grade_target["methods"]) == list(NEUROXAI_METHODS)
    assert set(seg["settings"]["targets"]) == {"TC", "WT", "ET"}
    for target in seg["settings"]["targets"].values():
        assert list(target["methods"]) == list(NEUROXAI_METHODS)
        assert all(m["seconds"] >= 0 for m in target["methods"].values())
    (slice_target,) = slices["settings"]["targets"].values()
    assert list(slice_target["methods"]) == list(CXAI_METHODS)
    assert len(seg["settings"]["inspection"]["layers"]) >= 4  # Grad-CAM at every conv layer of the U-Net
    assert "predicted_label" in grade["prediction"] and "voxels_per_channel" in seg["prediction"]
    # regions pooled over the U-Net's prediction, compared with the phantom's ground truth
    assert all(t["pooling"].endswith("predicted voxels") for t in seg["targets"].values())
    assert {r["region"] for r in seg["prediction"]["regions"]} == {"TC", "WT", "ET"}
    assert all("dice" in r for r in seg["prediction"]["regions"])
    assert grade["prediction"]["case_label"] in ("HGG", "LGG") and slices["prediction"]["case_label"] == "tumour"
    prediction = nib.load(demo / seg["prediction_map"])
    assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2, 4}
    for rel in summary["figures"]:
        assert (demo / rel).is_file()
    assert any("inspection" in rel for rel in summary["figures"])


@pytest.mark.slow
def test_demo_nifti_maps_line_up_with_the_input_scan(demo):
    summary = json.loads((demo / "summary.json").read_text())
    (case,) = [d for d in (demo / "input").iterdir() if d.is_dir()]
    scan = nib.load(case / f"{case.name}_flair.nii.gz")
    n_maps = 0
    for study in summary["studies"]:
        for per_method in study["maps"].values():
            for rel in per_method.values():
                img = nib.load(demo / rel)
                np.testing.assert_allclose(img.affine, scan.affine, atol=1e-6)
                assert img.shape[:3] == scan.shape and img.get_data_dtype() == np.float32
                assert img.ndim == 3 or img.shape[3] == 4
                assert np.isfinite(np.asarray(img.dataobj)).all()
                n_maps += 1
    assert n_maps == 4 * len(NEUROXAI_METHODS)  # grade + three regions, every method


@pytest.mark.slow
def test_demo_report_in_headless_chromium(demo):
    seen = check_report_in_browser(demo / "report.html")
    assert seen["studies"] == 3 and seen["volume"]
    assert set(seen["methods"]) == set(NEUROXAI_METHODS)


def test_demo_refuses_a_file_as_output(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main(["demo", "--out", str(target), "--preset", "tiny", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0]
    assert target.read_text() == "keep me"
