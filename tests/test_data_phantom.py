"""The synthetic BraTS-like cohort: labels, anatomy, contrasts, reproducibility, layout."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from voxplain.data.phantom import (MODALITIES, SUBJECT_COLUMNS, generate_cohort, generate_subject, parse_grades,
                                   parse_shortcut)
from voxplain.data.template import load_template


@pytest.fixture(scope="module")
def template():
    return load_template(3)


@pytest.fixture(scope="module")
def subjects(template):
    """One subject per grade, in memory, at 3 mm."""
    return {g: generate_subject(f"S_{g}", g, shortcut=(g == "HGG"), seed=[7, i], template=template)
            for i, g in enumerate(("HGG", "LGG", "none"))}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort") / "c"
    rows = generate_cohort(out, subjects=3, seed=3, resolution=3, grades=0.5, healthy_fraction=0.34,
                           shortcut="1:0")
    return out, rows


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_template_matches_nilearn_grid(template):
    # the grid of nilearn.datasets.load_mni152_template(resolution=3) (checked once by hand;
    # resampling it here would take seconds): origin of the 1 mm template, spacing 3 mm
    from voxplain.data.template import _FILES, _nilearn_file

    one_mm = nib.load(_nilearn_file(_FILES["t1"])).affine
    expected = one_mm.copy()
    expected[:3, :3] *= 3
    np.testing.assert_allclose(template.affine, expected)
    np.testing.assert_allclose(template.affine[:3, 3], [-98.0, -134.0, -72.0])
    assert template.shape == (67, 79, 64)
    assert np.all(template.gm + template.wm + template.csf <= 1.0 + 1e-5)
    assert not (template.csf[~template.mask]).any()
    assert 0.4 < template.gm[template.mask].mean() < 0.6  # about half the brain is grey matter


def test_labels_only_brats_values(subjects):
    assert set(np.unique(subjects["HGG"].seg)) == {0, 1, 2, 4}
    assert set(np.unique(subjects["LGG"].seg)) <= {0, 1, 2}
    assert {1, 2} <= set(np.unique(subjects["LGG"].seg))
    assert set(np.unique(subjects["none"].seg)) == {0}


def test_tumour_inside_brain(subjects):
    for g in ("HGG", "LGG"):
        s = subjects[g]
        tumour = s.seg > 0
        assert tumour.sum() > 20
        assert s.tissues["brain"][tumour].all()
        assert (s.image[:, tumour] > 0).all()  # skull-stripped: brain voxels are non-zero
        assert (s.image[:, ~s.tissues["brain"]] == 0).all()
        # mostly white matter around the centre, never inside the ventricles
        assert s.tissues["csf"][tumour].mean() < 0.5


def test_enhancing_tumour_absent_in_low_grade(subjects, cohort):
    assert not (subjects["LGG"].seg == 4).any()
    _, rows = cohort
    for row in rows:
        if row["grade"] == "LGG":
            assert row["et_voxels"] == 0 and row["tc_voxels"] > 0
        if row["grade"] == "HGG":
            assert row["et_voxels"] > 0


def _median(image, sel):
    return float(np.median(image[sel]))


def test_tissue_contrast_order(subjects):
    for s in subjects.values():
        t = s.tissues
        pure = {k: (t[k] > 0.9) & (s.seg == 0) & ~t["vessels"] & ~t["marker"] for k in ("csf", "gm", "wm")}
        med = {m: {k: _median(s.image[c], sel) for k, sel in pure.items()} for c, m in enumerate(MODALITIES)}
        assert med["t1"]["wm"] > med["t1"]["gm"] > med["t1"]["csf"], med["t1"]
        assert med["t1ce"]["wm"] > med["t1ce"]["gm"] > med["t1ce"]["csf"], med["t1ce"]
        assert med["t2"]["csf"] > med["t2"]["gm"] > med["t2"]["wm"], med["t2"]
        assert med["flair"]["gm"] > med["flair"]["wm"] > med["flair"]["csf"], med["flair"]


def test_tumour_contrasts(subjects):
    for g in ("HGG", "LGG"):
        s = subjects[g]
        wm = (s.tissues["wm"] > 0.9) & (s.seg == 0)
        oedema = s.seg == 2
        for m in ("t2", "flair"):
            c = MODALITIES.index(m)
            assert _median(s.image[c], oedema) > _median(s.image[c], wm), (g, m)
    hgg = subjects["HGG"]
    c = MODALITIES.index("t1ce")
    wm = (hgg.tissues["wm"] > 0.9) & (hgg.seg == 0)
    assert _median(hgg.image[c], hgg.seg == 4) > 1.2 * _median(hgg.image[c], wm)
    # enhancement is a t1ce effect: on native t1 the rim is darker than white matter
    assert _median(hgg.image[0], hgg.seg == 4) < _median(hgg.image[0], wm)


def test_shortcut_marker_recorded(subjects, cohort):
    assert subjects["HGG"].tissues["marker"].any() and subjects["HGG"].info["shortcut"] == 1
    assert not subjects["LGG"].tissues["marker"].any() and subjects["LGG"].info["shortcut"] == 0
    _, rows = cohort
    assert all(r["shortcut"] == int(r["grade"] == "HGG") for r in rows)


def test_cohort_layout_table_and_affine(cohort, template):
    out, rows = cohort
    assert [r["grade"] for r in rows].count("none") == 1
    assert sorted(r["grade"] for r in rows if r["grade"] != "none") == ["HGG", "LGG"]
    with open(out / "subjects.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == SUBJECT_COLUMNS
    assert [r["name"] for r in table] == [r["name"] for r in rows]
    settings = json.loads((out / "cohort.json").read_text())
    assert settings["seed"] == 3 and settings["resolution"] == 3
    for row in table:
        name = row["name"]
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == sorted(f"{name}_{m}.nii.gz" for m in (*MODALITIES, "seg"))
        seg_img = nib.load(out / name / f"{name}_seg.nii.gz")
        np.testing.assert_allclose(seg_img.affine, template.affine)
        seg = np.asarray(seg_img.dataobj)
        assert int(row["wt_voxels"]) == int((seg > 0).sum())
        assert int(row["et_voxels"]) == int((seg == 4).sum())
        assert int(row["tc_voxels"]) == int(np.isin(seg, (1, 4)).sum())
        assert float(row["wt_ml"]) == pytest.approx(int(row["wt_voxels"]) * 27 / 1000, abs=1e-3)
        if row["grade"] != "none":
            centre = np.argwhere(seg > 0).mean(axis=0)
            got = [float(row[f"centroid_{a}"]) for a in "ijk"]
            np.testing.assert_allclose(got, centre, atol=0.01)
            mm = template.affine @ np.append(centre, 1.0)
            np.testing.assert_allclose([float(row[f"centroid_{a}_mm"]) for a in "xyz"], mm[:3], atol=0.01)
        t1 = nib.load(out / name / f"{name}_t1.nii.gz")
        assert t1.get_data_dtype() == np.int16
        np.testing.assert_allclose(t1.affine, template.affine)


def test_same_seed_same_bytes(tmp_path, cohort):
    out, _ = cohort
    again = tmp_path / "again"
    generate_cohort(again, subjects=3, seed=3, resolution=3, grades=0.5, healthy_fraction=0.34, shortcut="1:0",
                    workers=1)  # the fixture used 2 threads: the bytes must not depend on it
    assert _digest(out) == _digest(again)

def test_other_seed_other_subject(template, subjects):
    other = generate_subject("S_HGG", "HGG", shortcut=True, seed=[8, 0], template=template)
    assert not np.array_equal(other.seg, subjects["HGG"].seg)
    assert not np.array_equal(other.image, subjects["HGG"].image)


def test_failed_generation_leaves_no_folder(tmp_path, monkeypatch):
    import voxplain.data.phantom as phantom

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(phantom, "_write_table", boom)
    with pytest.raises(RuntimeError):
        generate_cohort(tmp_path / "c", subjects=1, seed=0, resolution=3)
    assert list(tmp_path.iterdir()) == []


def test_option_parsing():
    assert parse_grades(0.7) == {"HGG": 0.7, "LGG": pytest.approx(0.3)}
    assert parse_grades("HGG:1,LGG:3") == {"HGG": 0.25, "LGG": 0.75}
    assert parse_grades("0.5") == {"HGG": 0.5, "LGG": 0.5}
    assert parse_shortcut(None) == (0.0, 0.0)
    assert parse_shortcut("0.9:0.1") == (0.9, 0.1)
    assert parse_shortcut(0.8) == (0.8, 0.0)
    for bad in ("GBM:1", "x", 1.5, "HGG:-1,LGG:1"):
        with pytest.raises(ValueError, match="grades"):
            parse_grades(bad)
    for bad in ("2", "a:b", "0.1:0.2:0.3"):
        with pytest.raises(ValueError, match="shortcut"):
            parse_shortcut(bad)
    with pytest.raises(ValueError, match="resolution"):
        load_template(4)
    with pytest.raises(ValueError, match="subjects"):
        generate_cohort("/nonexistent/never", subjects=0)


def test_grade_counts_follow_the_mix():
    from voxplain.data.phantom import _assign

    mix = parse_grades(0.5)
    big = _assign(60, mix, 0.0, np.random.default_rng(0))
    assert big.count("HGG") == big.count("LGG") == 30
    mixed = _assign(10, mix, 0.2, np.random.default_rng(0))
    assert mixed.count("none") == 2 and mixed.count("HGG") == 4
    # a one-subject cohort is high grade for some seeds and low grade for others
    singles = [_assign(1, mix, 0.0, np.random.default_rng([s, 0]))[0] for s in range(20)]
    assert 5 <= singles.count("HGG") <= 15
