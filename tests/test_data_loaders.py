"""NIfTI, BraTS case and image-folder loading: dtypes, orientations, naming schemes, clear errors."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from voxplain.data.brats import find_brats_cases, load_brats_case, read_subjects_table
from voxplain.data.images import find_images, load_image
from voxplain.data.nifti import NiftiMeta, load_nifti, save_nifti_like, write_nifti

SHAPE = (8, 9, 10)
RAS_AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -20], [0, 0, 3.0, -30], [0, 0, 0, 1]])


def _ras_volume(seed=0, channels=None):
    rng = np.random.default_rng(seed)
    shape = SHAPE if channels is None else SHAPE + (channels,)
    return rng.integers(1, 500, shape).astype(np.float64)


def _as_lps(data, affine):
    """The same image stored with the first two voxel axes flipped (LPS), as DICOM-derived files often are."""
    flipped = data[::-1, ::-1]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = SHAPE[0] - 1, SHAPE[1] - 1
    return np.ascontiguousarray(flipped), affine @ flip


def _save(data, affine, path, dtype):
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("dtype", [np.int16, np.float64, np.float32, np.uint8])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("lps", [False, True])
def test_load_nifti_any_dtype_orientation_compression(tmp_path, dtype, suffix, lps):
    ras = _ras_volume() % 200
    data, affine = _as_lps(ras, RAS_AFFINE) if lps else (ras, RAS_AFFINE)
    path = _save(data, affine, tmp_path / f"img{suffix}", dtype)
    loaded, meta = load_nifti(path)
    assert loaded.dtype == np.float32 and loaded.shape == SHAPE
    np.testing.assert_array_equal(loaded, ras.astype(np.float32))
    np.testing.assert_allclose(meta.ras_affine, RAS_AFFINE)
    np.testing.assert_allclose(meta.affine, affine)
    assert meta.axcodes == (("L", "P", "S") if lps else ("R", "A", "S"))
    assert meta.ras_shape == SHAPE and meta.zooms == (2.0, 2.0, 3.0)


def test_scaled_int16_is_read_with_its_slope(tmp_path):
    img = nib.Nifti1Image(np.arange(720, dtype=np.int16).reshape(SHAPE), RAS_AFFINE)
    img.header.set_slope_inter(0.5, 1.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    loaded, _ = load_nifti(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(loaded, np.arange(720).reshape(SHAPE) * 0.5 + 1.0)


@pytest.mark.parametrize("lps", [False, True])
def test_save_nifti_like_writes_back_on_the_source_grid(tmp_path, lps):
    ras = _ras_volume()
    data, affine = _as_lps(ras, RAS_AFFINE) if lps else (ras, RAS_AFFINE)
    src = _save(data, affine, tmp_path / "src.nii.gz", np.int16)
    loaded, meta = load_nifti(src)
    out = save_nifti_like(loaded * 0.5, meta, tmp_path / "map.nii.gz")
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, affine)
    assert written.get_data_dtype() == np.float32
    np.testing.assert_allclose(written.get_fdata(), data * 0.5)  # voxel for voxel over the source scan
    # channels first or last give a 4D file with channels last
    two = np.stack([loaded, -loaded])
    for arr in (two, np.moveaxis(two, 0, -1)):
        written = nib.load(save_nifti_like(arr, meta, tmp_path / "map4.nii"))
        assert written.shape == SHAPE + (2,)
        np.testing.assert_allclose(written.get_fdata()[..., 1], -data)
    with pytest.raises(ValueError, match=r"\(8, 9, 10\)"):
        save_nifti_like(np.zeros((8, 9, 11)), meta, tmp_path / "bad.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()


def test_4d_nifti_is_refused_unless_its_volumes_are_declared_channels(tmp_path):
    vol = _ras_volume(channels=3)
    data, affine = _as_lps(vol, RAS_AFFINE)
    path = _save(data, affine, tmp_path / "v.nii.gz", np.float32)
    with pytest.raises(ValueError, match=r"4th axis .* would be read as input channels.*--channels-from-4d"):
        load_nifti(path)
    loaded, meta = load_nifti(path, channels_from_4d=True)
    assert loaded.shape == (3,) + SHAPE
    np.testing.assert_allclose(loaded, np.moveaxis(vol, -1, 0))


def test_itk_vector_image_is_read_as_channels(tmp_path):
    vol = _ras_volume(channels=2).astype(np.float32)
    img = nib.Nifti1Image(vol[:, :, :, None, :], RAS_AFFINE)  # components on the 5th axis, time axis of 1
    nib.save(img, str(tmp_path / "vec.nii.gz"))
    loaded, _ = load_nifti(tmp_path / "vec.nii.gz")
    assert loaded.shape == (2,) + SHAPE


@pytest.mark.parametrize("qform_code, sform_code", [(2, 2), (1, 0), (0, 2), (4, 4), (0, 0)])
def test_written_maps_keep_the_source_qform_and_sform_codes(tmp_path, qform_code, sform_code):
    img = nib.Nifti1Image(_ras_volume().astype(np.float32), RAS_AFFINE)
    img.set_qform(RAS_AFFINE, code=qform_code)
    img.set_sform(RAS_AFFINE, code=sform_code)
    nib.save(img, str(tmp_path / "src.nii.gz"))
    loaded, meta = load_nifti(tmp_path / "src.nii.gz")
    written = nib.load(save_nifti_like(loaded, meta, tmp_path / "map.nii.gz"))
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (qform_code, sform_code)
    np.testing.assert_allclose(written.affine, nib.load(tmp_path / "src.nii.gz").affine)


def test_write_nifti_is_deterministic_and_meta_from_affine(tmp_path):
    vol = _ras_volume().astype(np.float32)
    a = write_nifti(vol, RAS_AFFINE, tmp_path / "a.nii.gz")
    b = write_nifti(vol, RAS_AFFINE, tmp_path / "b.nii.gz")
    assert a.read_bytes() == b.read_bytes()
    assert gzip.decompress(a.read_bytes())[:4] == (348).to_bytes(4, "little")
    meta = NiftiMeta.from_affine(RAS_AFFINE, SHAPE)
    assert meta.ras_shape == SHAPE
    with pytest.raises(ValueError, match=".nii"):
        write_nifti(vol, RAS_AFFINE, tmp_path / "a.png")


def test_unreadable_nifti_errors_name_the_file(tmp_path):
    good = _save(_ras_volume(), RAS_AFFINE, tmp_path / "good.nii.gz", np.int16)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:400])
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"this is not a nifti file" * 20)
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match=path.name):
            load_nifti(path)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_nifti(tmp_path / "missing.nii.gz")
    nan = _save(np.full(SHAPE, np.nan), RAS_AFFINE, tmp_path / "nan.nii", np.float32)
    with pytest.raises(ValueError, match="NaN"):
        load_nifti(nan)


def _write_case(folder, names, seg_labels=(0, 1, 2, 4), shapes=None, lps=False, sep="_"):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, suffix in enumerate(names):
        shape = (shapes or {}).get(suffix, SHAPE)
        if suffix == "seg":
            data = rng.choice(seg_labels, size=shape).astype(np.float64)
            dtype = np.uint8
        else:
            data = rng.integers(0, 1000, shape).astype(np.float64) + i
            dtype = np.int16 if i % 2 else np.float64
        affine = RAS_AFFINE
        if lps and shape == SHAPE:
            data, affine = _as_lps(data, RAS_AFFINE)
        _save(data, affine, folder / f"{folder.name}{sep}{suffix}.nii.gz", dtype)
    return folder


def test_brats_2021_case(tmp_path):
    folder = _write_case(tmp_path / "BraTS2021_00001", ["t1", "t1ce", "t2", "flair", "seg"], lps=True)
    case = load_brats_case(folder)
    assert case.name == "BraTS2021_00001" and case.modalities == ("t1", "t1ce", "t2", "flair")
    assert case.image.shape == (4,) + SHAPE and case.image.dtype == np.float32
    assert case.seg.dtype == np.int16 and set(np.unique(case.seg)) <= {0, 1, 2, 4}
    assert case.meta.axcodes == ("L", "P", "S")
    t2, _ = load_nifti(folder / "BraTS2021_00001_t2.nii.gz")
    np.testing.assert_array_equal(case.image[2], t2)
    assert find_brats_cases(tmp_path) == [folder]
    assert find_brats_cases(folder) == [folder]


def test_brats_2023_names_and_labels(tmp_path):
    folder = _write_case(tmp_path / "BraTS-GLI-00000-000", ["t1n", "t1c", "t2w", "t2f", "seg"],
                         seg_labels=(0, 1, 2, 3), sep="-")
    case = load_brats_case(folder)
    assert case.files["t1ce"].name == "BraTS-GLI-00000-000-t1c.nii.gz"
    assert case.files["flair"].name == "BraTS-GLI-00000-000-t2f.nii.gz"
    assert set(np.unique(case.seg)) == {0, 1, 2, 4}  # 2023's ET label 3 is renamed 4


def test_brats_case_errors_name_the_file(tmp_path):
    missing = _write_case(tmp_path / "CaseA", ["t1", "t1ce", "flair", "seg"])
    with pytest.raises(FileNotFoundError, match="CaseA.*missing t2"):
        load_brats_case(missing)
    mismatch = _write_case(tmp_path / "CaseB", ["t1", "t1ce", "t2", "flair"], shapes={"t2": (8, 9, 11)})
    with pytest.raises(ValueError, match="CaseB_t2.nii.gz") as err:
        load_brats_case(mismatch)
    assert "mismatch" in str(err.value) and "CaseB_t1.nii.gz" in str(err.value)
    corrupt = _write_case(tmp_path / "CaseC", ["t1", "t1ce", "t2", "flair"])
    (corrupt / "CaseC_flair.nii.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(ValueError, match="CaseC_flair.nii.gz"):
        load_brats_case(corrupt)
    bad_labels = _write_case(tmp_path / "CaseD", ["t1", "t1ce", "t2", "flair", "seg"], seg_labels=(0, 5))
    with pytest.raises(ValueError, match="CaseD_seg.nii.gz"):
        load_brats_case(bad_labels)
    no_seg = _write_case(tmp_path / "CaseE", ["t1", "t1ce", "t2", "flair"])
    assert load_brats_case(no_seg).seg is None
    with pytest.raises(FileNotFoundError, match="seg"):
        load_brats_case(no_seg, require_seg=True)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_brats_case(tmp_path / "nowhere")


def test_subjects_table_from_name_mapping(tmp_path):
    (tmp_path / "name_mapping.csv").write_text("Grade,BraTS_2019_subject_ID,BraTS_2020_subject_ID\n"
                                               "HGG,x,BraTS20_Training_001\nLGG,y,BraTS20_Training_002\n")
    table = read_subjects_table(tmp_path)
    assert table["BraTS20_Training_002"]["grade"] == "LGG"


def _image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "NORMAL").mkdir(parents=True)
    (root / "PNEUMONIA").mkdir()
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    yy, xx = np.mgrid[0:20, 0:30]  # smooth colours survive JPEG compression
    rgb = np.stack([yy * 12, xx * 8, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    Image.fromarray(grey).save(root / "NORMAL" / "a.png")
    Image.fromarray(rgb).save(root / "NORMAL" / "b.jpeg", quality=95)
    Image.fromarray(grey).save(root / "PNEUMONIA" / "c.jpg")
    (root / "PNEUMONIA" / "notes.txt").write_text("not an image")
    return grey, rgb


def test_image_folder_grey_and_rgb(tmp_path):
    grey, rgb = _image_folder(tmp_path)
    items, classes = find_images(tmp_path)
    assert classes == ["NORMAL", "PNEUMONIA"]
    assert [(p.name, c) for p, c in items] == [("a.png", 0), ("b.jpeg", 0), ("c.jpg", 1)]
    a = load_image(tmp_path / "NORMAL" / "a.png")
    assert a.shape == (1, 20, 30) and a.dtype == np.float32
    np.testing.assert_allclose(a[0], grey / 255.0, atol=1e-6)
    b = load_image(tmp_path / "NORMAL" / "b.jpeg")
    assert b.shape == (3, 20, 30) and 0.0 <= b.min() and b.max() <= 1.0
    assert np.abs(b - np.moveaxis(rgb, -1, 0) / 255.0).mean() < 0.02  # JPEG is lossy
    assert load_image(tmp_path / "NORMAL" / "a.png", channels=3, size=16).shape == (3, 16, 16)
    assert load_image(tmp_path / "NORMAL" / "b.jpeg", channels=1, size=(8, 12)).shape == (1, 8, 12)


def test_image_errors_name_the_file(tmp_path):
    _image_folder(tmp_path)
    broken = tmp_path / "NORMAL" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(broken)
    with pytest.raises(ValueError, match="sub-folder per class"):
        find_images(tmp_path / "NORMAL")
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "absent")
