"""DICOM series input: synthetic series written with pydicom, compared with NIfTI written by nibabel."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from voxplain.data.dicom import (find_dicom_series, is_dicom_folder, load_dicom_modalities, load_dicom_series,
                                 modality_from_description)
from voxplain.data.nifti import load_nifti, save_nifti_like, write_nifti

SLOPE, INTERCEPT = 0.5, -100.0
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _geometry(kind: str):
    """A RAS affine of a (column, row, slice) grid as a scanner would store it."""
    a = np.eye(4)
    if kind == "axial":  # rows towards patient left, columns posterior, slices superior: LPS storage
        a[:3, :3] = np.diag([-0.9, -1.1, 2.5])
        a[:3, 3] = (60.5, 40.25, -30.0)
    elif kind == "axial-reversed":  # slices stored from top to bottom
        a[:3, :3] = np.diag([-0.9, -1.1, -2.5])
        a[:3, 3] = (60.5, 40.25, 30.0)
    elif kind == "sagittal":  # rows posterior, columns inferior, slices towards the patient's right
        a[:3, :3] = [[0, 0, -3.0], [-0.8, 0, 0], [0, -1.2, 0]]
        a[:3, 3] = (20.0, 50.0, 70.0)
    return a


def _write_series(folder, volume, affine, description="AX T1", uid=None, reverse_files=False, skip=(),
                  orientation_override=None, prefix="IM"):
    """Write ``volume`` (columns, rows, slices) of integers as one DICOM file per slice, geometry from ``affine``."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    lps = RAS_TO_LPS @ affine
    col_spacing, row_spacing = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row_dir, col_dir = lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing
    n = volume.shape[2]
    order = range(n - 1, -1, -1) if reverse_files else range(n)
    for file_index, k in enumerate(order):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = "MR", uid, description
        ds.InstanceNumber = file_index + 1  # says nothing about position when files are reversed
        ds.ImagePositionPatient = [round(float(v), 4) for v in lps[:3, 3] + k * lps[:3, 2]]
        iop = np.concatenate([row_dir, col_dir]) if orientation_override is None or k != 1 else orientation_override
        ds.ImageOrientationPatient = [round(float(v), 6) for v in iop]
        ds.PixelSpacing = [round(float(row_spacing), 4), round(float(col_spacing), 4)]
        ds.SliceThickness = round(float(np.linalg.norm(lps[:3, 2])), 4)
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).astype("<i2").tobytes()  # (rows, columns)
        ds.save_as(folder / f"{prefix}{file_index:04d}.dcm", enforce_file_format=True)
    return uid


def _volume(shape=(12, 10, 7), seed=0):
    return np.random.default_rng(seed).integers(-200, 1200, size=shape).astype(np.int16)


@pytest.mark.parametrize("kind", ["axial", "axial-reversed", "sagittal"])
@pytest.mark.parametrize("reverse_files", [False, True])
def test_a_dicom_series_reads_like_the_same_volume_written_as_nifti(tmp_path, kind, reverse_files):
    raw, affine = _volume(), _geometry(kind)
    real = raw.astype(np.float32) * SLOPE + INTERCEPT
    _write_series(tmp_path / "dicom", raw, affine, reverse_files=reverse_files)
    write_nifti(real, affine, tmp_path / "ref.nii.gz")
    ref, ref_meta = load_nifti(tmp_path / "ref.nii.gz")
    data, meta = load_dicom_series(tmp_path / "dicom")
    assert data.dtype == np.float32
    assert data.shape == ref.shape
    np.testing.assert_allclose(meta.ras_affine, ref_meta.ras_affine, atol=1e-4)
    np.testing.assert_array_equal(data, ref)
    # the stored slice axis follows the slice normal whatever order the scanner stored them in
    normal_axis = np.cross(*(RAS_TO_LPS @ affine)[:3, :2].T)
    assert np.dot((RAS_TO_LPS @ meta.affine)[:3, 2], normal_axis) > 0
    # a world point maps to the same value: voxel (3, 4, 5) of the scanner's volume, found through our affine
    world = affine @ [3, 4, 5, 1]
    ijk = np.round(np.linalg.inv(meta.ras_affine) @ world).astype(int)[:3]
    assert data[tuple(ijk)] == real[3, 4, 5]


def test_maps_are_written_as_nifti_on_the_dicom_grid(tmp_path):
    raw, affine = _volume(), _geometry("axial")
    _write_series(tmp_path / "dicom", raw, affine)
    data, meta = load_dicom_series(tmp_path / "dicom")
    save_nifti_like(data * 2, meta, tmp_path / "map.nii.gz")
    written, written_meta = load_nifti(tmp_path / "map.nii.gz")
    np.testing.assert_allclose(written_meta.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(written, data * 2)
    assert meta.path == tmp_path / "dicom"


def test_several_modalities_in_subfolders_named_after_them(tmp_path):
    affine = _geometry("axial")
    volumes = {m: _volume(seed=i) for i, m in enumerate(("flair", "t2", "t1ce", "t1"))}
    for m, v in volumes.items():
        _write_series(tmp_path / m, v, affine, description="series 1")  # a description that names nothing
    data, meta, names = load_dicom_modalities(tmp_path)
    assert names == ("t1", "t1ce", "t2", "flair") and data.shape == (4, 12, 10, 7)
    assert meta.axcodes == ("L", "P", "S")
    for c, m in enumerate(names):
        ref = volumes[m].astype(np.float32) * SLOPE + INTERCEPT
        np.testing.assert_array_equal(data[c], ref[::-1, ::-1])  # stored LPS -> RAS order


def test_mixed_series_in_one_folder_are_grouped_by_uid_and_named_by_description(tmp_path):
    affine = _geometry("axial")
    descriptions = {"t1": "AX T1 SE", "t1ce": "AX T1 POST GAD", "t2": "T2_TSE_tra", "flair": "Sag FLAIR fs"}
    volumes = {}
    for i, (m, d) in enumerate(descriptions.items()):
        volumes[m] = _volume(seed=10 + i)
        _write_series(tmp_path / "mixed", volumes[m], affine, description=d, prefix=f"S{i}_")
    assert len(find_dicom_series(tmp_path / "mixed")) == 4
    data, _, names = load_dicom_modalities(tmp_path / "mixed", modalities=("flair", "t1ce"))
    assert names == ("flair", "t1ce")
    for c, m in enumerate(names):
        np.testing.assert_array_equal(data[c], (volumes[m].astype(np.float32) * SLOPE + INTERCEPT)[::-1, ::-1])
    with pytest.raises(ValueError, match="expected one DICOM series .* found 4"):
        load_dicom_series(tmp_path / "mixed")


def test_broken_series_are_refused_with_a_clear_error(tmp_path):
    raw, affine = _volume(), _geometry("axial")
    _write_series(tmp_path / "gap", raw, affine, skip=(3,))
    with pytest.raises(ValueError, match="missing slice"):
        load_dicom_series(tmp_path / "gap")
    _write_series(tmp_path / "tilted", raw, affine, orientation_override=[0, 1, 0, 1, 0, 0])
    with pytest.raises(ValueError, match="different orientations"):
        load_dicom_series(tmp_path / "tilted")
    uid = _write_series(tmp_path / "twice", raw, affine)
    _write_series(tmp_path / "twice" / "echo2", raw, affine, uid=uid)
    with pytest.raises(ValueError, match="two images at one position"):
        load_dicom_series(tmp_path / "twice")
    _write_series(tmp_path / "two_grids" / "t1", raw, affine, description="3D")
    _write_series(tmp_path / "two_grids" / "t2", raw, _geometry("sagittal"), description="3D")
    with pytest.raises(ValueError, match="not on one grid"):
        load_dicom_modalities(tmp_path / "two_grids", modalities=("t1", "t2"))
    with pytest.raises(ValueError, match=r"t1ce: none found; flair: none found.*sub-folders"):
        load_dicom_modalities(tmp_path / "two_grids")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not DICOM")
    assert not is_dicom_folder(tmp_path / "notes") and is_dicom_folder(tmp_path / "gap")
    with pytest.raises(ValueError, match="no DICOM images"):
        load_dicom_series(tmp_path / "notes")
    with pytest.raises(FileNotFoundError):
        load_dicom_series(tmp_path / "nowhere")


@pytest.mark.parametrize("text, modality", [
    ("AX T1 POST GAD", "t1ce"), ("T1_MPRAGE_post", "t1ce"), ("t1ce", "t1ce"), ("T1+C", "t1ce"),
    ("T1W_SE", "t1"), ("sag mprage", "t1"), ("t1n", "t1"), ("T2_TSE_tra", "t2"), ("t2w", "t2"),
    ("Sag FLAIR fs", "flair"), ("T2 FLAIR", "flair"), ("t2f", "flair"), ("DWI b1000", None), ("", None),
    ("T1/T2 map", None),
])
def test_modality_names_from_series_descriptions(text, modality):
    assert modality_from_description(text) == modality
