"""Preprocessing (z-score, crop/pad, regions), cohort/slice/image Datasets and the seeded split."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from voxplain.data.datasets import (BratsCohortDataset, ImageFolderDataset, SliceDataset, split_indices,
                                    train_val_split)
from voxplain.data.nifti import write_nifti
from voxplain.data.preprocess import (REGIONS, crop_box, crop_or_pad, default_crop_size, foreground_centre,
                                      labels_to_regions, zscore_nonzero)
from voxplain.targets import BratsRegionTarget

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def test_zscore_over_nonzero_voxels():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 10, 10, 10), np.float32)
    image[0, 2:8, 2:8, 2:8] = rng.normal(300, 40, (6, 6, 6))
    image[1, 3:9, 3:9, 3:9] = 7.0  # constant modality
    out = zscore_nonzero(image)
    inside = image[0] != 0
    assert out[0][inside].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[0][inside].std() == pytest.approx(1.0, abs=1e-4)
    assert (out[0][~inside] == 0).all() and (out[1] == 0).all()
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="mask shape"):
        zscore_nonzero(image, mask=np.ones((3, 3, 3), bool))


def test_default_crop_sizes():
    assert default_crop_size(1) == (192, 224, 160)
    assert default_crop_size(2) == (96, 112, 80)
    assert default_crop_size(3) == (64, 80, 64)
    for r in (2, 3):
        assert all(n % 16 == 0 for n in default_crop_size(r))
    with pytest.raises(ValueError):
        default_crop_size(0)


def test_crop_or_pad_and_restore():
    a = np.arange(1, 1 + 2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7)
    out, box = crop_or_pad(a, (4, 8, 7), return_box=True)
    assert out.shape == (2, 4, 8, 7) and box.start == (1, -1, 0)
    np.testing.assert_array_equal(out[:, :, 1:7], a[:, 1:5])
    assert (out[:, :, 0] == 0).all() and (out[:, :, 7] == 0).all()
    back = box.restore(out)
    np.testing.assert_array_equal(back[:, 1:], a[:, 1:])
    assert (back[:, 0] == 0).all()
    # torch tensors work the same way
    t = crop_or_pad(torch.from_numpy(a), (4, 8, 7))
    np.testing.assert_array_equal(t.numpy(), out)
    # the foreground centre keeps an off-centre object whole
    b = np.zeros((20, 20, 20), np.float32)
    b[1:7, 2:8, 12:18] = 1
    assert foreground_centre(b) == (3.5, 4.5, 14.5)
    cropped = crop_or_pad(b, (8, 8, 8), centre="foreground")
    assert cropped.sum() == b.sum()
    assert crop_box((10,), (4,), centre=(0.0,)).start == (-1,)
    assert crop_box((10,), (5,), centre=(0.0,)).start == (-2,)


def test_labels_to_regions_matches_target_convention():
    seg = np.array([0, 1, 2, 4])
    regions = labels_to_regions(seg)
    assert REGIONS == ("TC", "WT", "ET") == BratsRegionTarget("ET").channels
    np.testing.assert_array_equal(regions, [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(labels_to_regions(seg, ("ET", "TC", "WT"))[0], [0, 0, 0, 1])
    with pytest.raises(ValueError, match="region"):
        labels_to_regions(seg, ("XX",))


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """Five tiny cases (16 x 18 x 14, 2 mm): ball brains, tumours in four of them."""
    root = tmp_path_factory.mktemp("small")
    grades = ["HGG", "LGG", "HGG", "LGG", "none"]
    rng = np.random.default_rng(0)
    grid = np.indices((16, 18, 14))
    brain = ((grid - np.array([7.5, 8.5, 6.5])[:, None, None, None]) ** 2 / np.array([49, 64, 36])[:, None, None, None]
             ).sum(0) <= 1
    rows = []
    for i, grade in enumerate(grades):
        name = f"C{i}"
        (root / name).mkdir()
        seg = np.zeros(brain.shape, np.uint8)
        if grade != "none":
            c = np.array([6 + i % 3, 8, 4 + i])
            d2 = ((grid - c[:, None, None, None]) ** 2).sum(0)
            seg[(d2 <= 9) & brain] = 2
            seg[d2 <= 3] = 4 if grade == "HGG" else 1
        for m in ("t1", "t1ce", "t2", "flair"):
            img = np.where(brain, rng.normal(500, 50, brain.shape) + 200 * (seg > 0), 0)
            write_nifti(img, AFFINE, root / name / f"{name}_{m}.nii.gz", dtype=np.int16)
        write_nifti(seg, AFFINE, root / name / f"{name}_seg.nii.gz", dtype=np.uint8)
        rows.append({"name": name, "grade": grade})
    with open(root / "subjects.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "grade"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_cohort_dataset_tasks(small_cohort):
    grade = BratsCohortDataset(small_cohort, task="grade", size=(16, 16, 16))
    assert len(grade) == 4 and grade.labels == [1, 0, 1, 0] and grade.class_names == ["LGG", "HGG"]
    x, y = grade[0]
    assert x.shape == (4, 16, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64 and int(y) == 1
    tumour = BratsCohortDataset(small_cohort, task="tumour", size=(16, 16, 16), cache=False)
    assert tumour.labels == [1, 1, 1, 1, 0]
    seg = BratsCohortDataset(small_cohort, task="segment", size=(16, 18, 14))
    x, y = seg[1]
    assert y.shape == (3, 16, 18, 14) and y.dtype == torch.float32 and seg.region_names == list(REGIONS)
    case = seg.case(1)
    np.testing.assert_array_equal(y.numpy(), labels_to_regions(case.seg))  # full grid kept: nothing cut
    assert y[REGIONS.index("ET")].sum() == 0  # LGG
    # a map on the cropped grid goes back onto the case's grid
    restored = seg.crop_box(1).restore(x.numpy())
    assert restored.shape == (4, 16, 18, 14)
    with pytest.raises(ValueError, match="task"):
        BratsCohortDataset(small_cohort, task="survival")
    with pytest.raises(IndexError):
        grade[10]


def test_cohort_dataset_default_size_from_voxel_size(small_cohort):
    ds = BratsCohortDataset(small_cohort, task="grade")
    assert ds[0][0].shape == (4,) + default_crop_size(2)


def test_slice_dataset_labels_from_mask(small_cohort):
    ds = SliceDataset(small_cohort, size=(16, 16), min_tumour_mm2=12.0)
    assert len(ds) == len(ds.labels) == len(ds.groups) and set(ds.labels) == {0, 1}
    for i in range(len(ds)):
        case, s = ds.items[i]
        seg = ds._case(case).seg
        tumour_pixels = int((seg[:, :, s] > 0).sum())
        assert ds.labels[i] == int(tumour_pixels > 0)
        assert tumour_pixels == 0 or tumour_pixels * 4.0 >= 12.0
    x, y = ds[0]
    assert x.shape == (4, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 4 not in {g for g, label in zip(ds.groups, ds.labels) if label == 1}  # the healthy case


def test_split_is_seeded_grouped_and_stratified(small_cohort):
    ds = SliceDataset(small_cohort, size=(16, 16))
    train, val = train_val_split(ds, val_fraction=0.4, seed=1)
    assert sorted(train.indices + val.indices) == list(range(len(ds)))
    assert not {ds.groups[i] for i in train.indices} & {ds.groups[i] for i in val.indices}
    again, _ = train_val_split(ds, val_fraction=0.4, seed=1)
    assert again.indices == train.indices
    labels = [0] * 50 + [1] * 50
    tr, va = split_indices(100, 0.2, seed=0, labels=labels)
    assert len(va) == 20 and sum(labels[i] for i in va) == 10
    assert split_indices(100, 0.2, seed=3, labels=labels) != (tr, va)
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, 1.0)


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    for cls, value in (("no", 30), ("yes", 220)):
        (tmp_path / cls).mkdir()
        for k in range(3):
            Image.fromarray(np.full((12, 10), value + k, np.uint8)).save(tmp_path / cls / f"{k}.png")
    ds = ImageFolderDataset(tmp_path, size=8, channels=3)
    assert len(ds) == 6 and ds.classes == ["no", "yes"] and ds.labels == [0, 0, 0, 1, 1, 1]
    x, y = ds[4]
    assert x.shape == (3, 8, 8) and int(y) == 1 and float(x.mean()) == pytest.approx(221 / 255, abs=1e-3)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(tmp_path, channels=2)
