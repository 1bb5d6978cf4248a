"""Resampling to a model's spacing and orientation, and maps back onto the source grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nibabel import orientations as ornt_mod

from voxplain.data.nifti import load_nifti, save_nifti_like, write_nifti
from voxplain.data.resample import grid_from_config, resample_to_spacing


def _world(affine, shape):
    """World coordinates (3, *shape) of every voxel centre."""
    idx = np.indices(shape, dtype=float)
    return np.einsum("ij,j...->i...", affine[:3, :3], idx) + affine[:3, 3].reshape(3, 1, 1, 1)


def _ras_affine(zooms=(1.0, 1.0, 1.0), origin=(-20.0, -25.0, -15.0)):
    a = np.diag(list(zooms) + [1.0])
    a[:3, 3] = origin
    return a


def _stored_as(array, affine, codes):
    """The same image stored in another voxel order (axis codes ``codes``): array and affine."""
    transform = ornt_mod.ornt_transform(ornt_mod.io_orientation(affine), ornt_mod.axcodes2ornt(codes))
    return ornt_mod.apply_orientation(array, transform), affine @ ornt_mod.inv_ornt_aff(transform, array.shape)


def _ramp(world):
    """A function linear in world coordinates: linear interpolation must reproduce it exactly."""
    return (0.5 * world[0] - 0.25 * world[1] + 0.75 * world[2] + 3.0).astype(np.float32)


def _interior(shape, margin):
    return tuple(slice(margin, n - margin) for n in shape)


def test_matching_spacing_and_orientation_is_the_identity():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 20, 22, 18)).astype(np.float32)
    affine = _ras_affine((2.0, 2.0, 2.0))
    out, out_affine, mapping = resample_to_spacing(image, affine, spacing=2.0, orientation="RAS")
    assert np.array_equal(out, image) and out.dtype == np.float32
    assert np.allclose(out_affine, affine) and mapping.is_identity
    assert np.array_equal(mapping.to_source(out), image)
    assert np.array_equal(mapping.to_source(torch.from_numpy(out[0]), kind="label"), image[0])


def test_a_linear_field_lands_where_the_affines_say_after_resampling_and_back():
    shape, affine = (30, 34, 26), _ras_affine((1.0, 1.0, 1.0))
    image = _ramp(_world(affine, shape))
    out, out_affine, mapping = resample_to_spacing(image, affine, spacing=(3.0, 2.0, 2.5))
    assert out.shape == (10, 17, 10)
    assert np.allclose(np.sqrt((out_affine[:3, :3] ** 2).sum(0)), (3.0, 2.0, 2.5))
    # the new grid's centre is the old grid's centre
    centre = lambda a, s: a[:3, :3] @ ((np.array(s) - 1) / 2) + a[:3, 3]  # noqa: E731
    assert np.allclose(centre(out_affine, out.shape), centre(affine, shape))
    expected = _ramp(_world(out_affine, out.shape))
    inner = _interior(out.shape, 1)
    np.testing.assert_allclose(out[inner], expected[inner], rtol=0, atol=1e-4)
    back = mapping.to_source(out)
    inner = _interior(shape, 3)
    np.testing.assert_allclose(back[inner], image[inner], rtol=0, atol=1e-4)


def test_a_bright_voxel_keeps_its_world_position_through_a_round_trip():
    shape, affine = (12, 14, 10), _ras_affine((2.0, 2.0, 2.0), origin=(3.0, -7.0, 11.0))
    image = np.zeros(shape, np.float32)
    image[5, 8, 4] = 1.0
    point = affine[:3, :3] @ [5, 8, 4] + affine[:3, 3]
    out, out_affine, mapping = resample_to_spacing(image, affine, spacing=1.0)
    assert out.shape == (24, 28, 20)
    w = _world(out_affine, out.shape)
    centre_of_mass = (w * out).reshape(3, -1).sum(1) / out.sum()
    np.testing.assert_allclose(centre_of_mass, point, atol=1e-6)
    back = mapping.to_source(out)
    assert np.unravel_index(back.argmax(), shape) == (5, 8, 4)
    assert back.shape == shape


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("S", "R", "A"), ("P", "I", "L")])
def test_any_stored_orientation_gives_the_same_ras_result_and_maps_back_in_its_own_order(codes):
    shape, affine = (16, 18, 14), _ras_affine((1.0, 1.5, 2.0))
    rng = np.random.default_rng(1)
    ras = rng.random(shape).astype(np.float32)
    stored, stored_affine = _stored_as(ras, affine, codes)
    assert tuple(ornt_mod.aff2axcodes(stored_affine)) == codes
    ref, ref_affine, ref_mapping = resample_to_spacing(ras, affine, spacing=2.0)
    out, out_affine, mapping = resample_to_spacing(stored, stored_affine, spacing=2.0)
    assert np.allclose(out_affine, ref_affine)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    back = mapping.to_source(out)
    assert back.shape == stored.shape
    expected, _ = _stored_as(ref_mapping.to_source(ref), affine, codes)
    np.testing.assert_allclose(back, expected, rtol=0, atol=1e-6)
    # only reorienting (no spacing): exact, no interpolation at all
    only, only_affine, only_mapping = resample_to_spacing(stored, stored_affine, spacing=None)
    assert np.array_equal(only, ras) and np.allclose(only_affine, affine)
    assert np.array_equal(only_mapping.to_source(only), stored)


def test_anisotropic_1x1x5_mm_to_isotropic():
    shape, affine = (20, 22, 8), _ras_affine((1.0, 1.0, 5.0))
    image = _ramp(_world(affine, shape))
    out, out_affine, mapping = resample_to_spacing(image[None], affine, spacing=1.0)
    assert out.shape == (1, 20, 22, 40)
    assert np.allclose(np.sqrt((out_affine[:3, :3] ** 2).sum(0)), 1.0)
    # x and y untouched (same columns); z voxels 5 times thinner, centred on the same point
    assert np.allclose(out_affine[:, :2], affine[:, :2])
    assert np.allclose(out_affine[:3, 2], affine[:3, 2] / 5)
    assert np.allclose(out_affine[2, 3], affine[2, 3] - 2.0)  # first slice 2 mm below the first source slice
    expected = _ramp(_world(out_affine, out.shape[1:]))
    zin = slice(3, 37)  # within the source slices' centres
    np.testing.assert_allclose(out[0, :, :, zin], expected[:, :, zin], rtol=0, atol=1e-4)
    back = mapping.to_source(out)
    np.testing.assert_allclose(back[0], image, rtol=0, atol=1e-4)


def test_label_maps_take_the_nearest_voxel():
    shape, affine = (18, 18, 18), _ras_affine((1.0, 1.0, 1.0))
    labels = np.zeros(shape, np.int16)
    labels[4:12, 5:13, 6:14] = 2
    labels[7:9, 8:10, 9:11] = 4
    out, out_affine, mapping = resample_to_spacing(labels, affine, spacing=1.5, kind="label")
    assert out.dtype == np.int16 and set(np.unique(out)) <= {0, 2, 4}
    back = mapping.to_source(out, kind="label")
    assert back.dtype == np.int16 and set(np.unique(back)) == {0, 2, 4}
    # each source voxel takes the label of the target voxel nearest to it in the world
    src_world = _world(affine, shape).reshape(3, -1)
    j = np.linalg.inv(out_affine[:3, :3]) @ (src_world - out_affine[:3, 3:4])
    j = np.clip(np.floor(j + 0.5).astype(int), 0, np.array(out.shape)[:, None] - 1)
    assert np.array_equal(back.reshape(-1), out[j[0], j[1], j[2]])
    # maps on the source grid go onto the target grid the same way the image did
    assert np.array_equal(mapping.to_target(labels, kind="label"), out)


def test_oblique_scans_keep_their_directions():
    theta = np.deg2rad(10)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.0, 1.0, 2.0])
    affine[:3, 3] = (-10, 5, 0)
    shape = (20, 20, 10)
    image = _ramp(_world(affine, shape))
    out, out_affine, _ = resample_to_spacing(image, affine, spacing=2.0)
    assert np.allclose(out_affine[:3, :3], rot * 2.0)
    expected = _ramp(_world(out_affine, out.shape))
    np.testing.assert_allclose(out[1:-1, 1:-1], expected[1:-1, 1:-1], rtol=0, atol=1e-4)


def test_maps_written_back_overlay_the_source_nifti(tmp_path):
    """The intended use: load (any orientation), resample to the model, compute, map back, save on the source."""
    shape, affine = (16, 20, 12), _ras_affine((1.0, 1.0, 3.0))
    lps, lps_affine = _stored_as(_ramp(_world(affine, shape)), affine, ("L", "P", "S"))
    write_nifti(lps, lps_affine, tmp_path / "scan.nii.gz")
    data, meta = load_nifti(tmp_path / "scan.nii.gz")
    model_grid, model_affine, mapping = resample_to_spacing(data, meta.ras_affine, spacing=2.0)
    saliency = _ramp(_world(model_affine, model_grid.shape))  # a "map" that is the same linear field
    save_nifti_like(mapping.to_source(saliency), meta, tmp_path / "map.nii.gz")
    written, written_meta = load_nifti(tmp_path / "map.nii.gz")
    assert np.allclose(written_meta.affine, lps_affine)
    inner = (slice(2, -2), slice(2, -2), slice(1, -1))
    np.testing.assert_allclose(written[inner], data[inner], rtol=0, atol=1e-3)


def test_grid_from_config_and_bad_input():
    from importlib.resources import files

    config = json.loads((files("voxplain") / "assets/models/demo-unet/config.json").read_text())
    assert grid_from_config(config) == ((3.0, 3.0, 3.0), "RAS")
    assert grid_from_config({"spacing": [1, 1, 5], "orientation": "LPS"}) == ((1.0, 1.0, 5.0), "LPS")
    assert grid_from_config({}) == (None, None)
    with pytest.raises(ValueError, match="spacing must be a positive"):
        resample_to_spacing(np.zeros((4, 4, 4)), np.eye(4), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="orientation"):
        resample_to_spacing(np.zeros((4, 4, 4)), np.eye(4), orientation="RAX")
    with pytest.raises(ValueError, match="invertible 4x4"):
        resample_to_spacing(np.zeros((4, 4, 4)), np.zeros((4, 4)))
    _, _, mapping = resample_to_spacing(np.zeros((4, 4, 4)), np.eye(4), spacing=2.0)
    with pytest.raises(ValueError, match=r"resampled grid, spatial shape \(2, 2, 2\)"):
        mapping.to_source(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="kind must be"):
        mapping.to_source(np.zeros((2, 2, 2)), kind="cubic")
