"""Real scans and real models through the command line: voxel spacing, any input size, MONAI networks and
bundles, DICOM series, and no silent random weights (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from voxplain.cli import main
from voxplain.models import build_model, save_checkpoint

SHAPE = (31, 35, 26)  # a 1 mm scan stored LPS
LPS_1MM = np.array([[-1.0, 0, 0, 20.0], [0, -1.0, 0, 30.0], [0, 0, 1.0, -10.0], [0, 0, 0, 1]])
MODALITIES = ("t1", "t1ce", "t2", "flair")
HERE = Path(__file__).resolve()


def write_case(root: Path, shape=SHAPE, affine=LPS_1MM, name="CASE_001") -> Path:
    """A BraTS-layout case: int16 modalities with a bright blob (label 2) inside an ellipsoid brain."""
    rng = np.random.default_rng(0)
    folder = root / name
    folder.mkdir(parents=True)
    idx = np.indices(shape)
    centre = [(n - 1) / 2 for n in shape]
    brain = sum((idx[a] - centre[a]) ** 2 / (0.45 * shape[a]) ** 2 for a in range(3)) < 1
    blob = ((idx[0] - shape[0] // 3) ** 2 + (idx[1] - shape[1] // 2) ** 2 + (idx[2] - shape[2] // 2) ** 2) < 16
    for c, m in enumerate(MODALITIES):
        data = (rng.normal(300 + 50 * c, 20, shape) + 400 * blob) * brain
        nib.save(nib.Nifti1Image(data.astype(np.int16), affine), folder / f"{name}_{m}.nii.gz")
    nib.save(nib.Nifti1Image((blob * 2).astype(np.uint8), affine), folder / f"{name}_seg.nii.gz")
    return folder


class VoxelProbe(nn.Module):
    """F = 2 x channel 0 at one voxel of the grid the model sees: dF/dx is a delta there."""

    VOXEL = (3, 5, 4)

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([2.0]))

    def forward(self, x):
        i, j, k = self.VOXEL
        return x[:, 0, i, j, k][:, None] * self.scale


def build_voxel_probe():
    """Factory for 'test_native_scans.py:build_voxel_probe'."""
    return VoxelProbe()


def build_segresnet():
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    return SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 1, 1),
                     blocks_up=(1, 1))


def build_dynunet():
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    return DynUNet(3, 4, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                   filters=[4, 8, 16])


def build_basicunet():
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    return BasicUNet(spatial_dims=3, in_channels=4, out_channels=3, features=(4, 4, 8, 8, 8, 4))


def build_attentionunet():
    from monai.networks.nets import AttentionUnet

    torch.manual_seed(0)
    return AttentionUnet(spatial_dims=3, in_channels=4, out_channels=3, channels=(4, 8, 8), strides=(2, 2))


def build_unetr():
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    return UNETR(in_channels=4, out_channels=3, img_size=(16, 16, 16), feature_size=4, hidden_size=24, mlp_dim=48,
                 num_heads=2)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]


# -- 1. spacing and orientation ------------------------------------------------------------------------------
def test_a_probe_at_3mm_puts_its_map_on_the_1mm_scan_where_the_affines_say(tmp_path, capsys):
    case = write_case(tmp_path / "data")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "explain", "--model", f"{HERE}:build_voxel_probe", "--random-weights", "--spacing", 3,
                        "--input", case, "--task", "classify", "--target", 0, "--methods", "vanilla_gradient",
                        "--out", out, "--quiet")
    assert code == 0, err
    img = nib.load(next((out / "maps").glob("*vanilla_gradient.nii.gz")))
    np.testing.assert_allclose(img.affine, LPS_1MM, atol=1e-6)
    assert img.shape == (*SHAPE, 4)
    data = np.asarray(img.dataobj)[..., 0]  # channel 0 (t1)
    assert np.abs(np.asarray(img.dataobj)[..., 1:]).max() == 0 and data.max() > 0
    # the 3 mm RAS grid keeps the scan's centre: model voxel v sits at centre + 3 (v - (m - 1) / 2) mm in RAS
    centre_world = LPS_1MM[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + LPS_1MM[:3, 3]
    m = np.round(np.array(SHAPE) / 3)
    expected = centre_world + 3.0 * (np.array(VoxelProbe.VOXEL) - (m - 1) / 2)
    idx = np.argwhere(data > 0)
    world = idx @ LPS_1MM[:3, :3].T + LPS_1MM[:3, 3]
    centroid = (world * data[data > 0][:, None]).sum(0) / data.sum()
    np.testing.assert_allclose(centroid, expected, atol=0.5)
    peak = np.unravel_index(np.argmax(data), data.shape)
    assert np.abs(LPS_1MM[:3, :3] @ np.array(peak) + LPS_1MM[:3, 3] - expected).max() <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    notes = summary["studies"][0]["settings"]["preprocessing"]["resampled"]
    assert notes["spacing_mm"] == [3.0, 3.0, 3.0] and notes["from"] == "command line"


def test_a_3mm_checkpoint_sees_the_1mm_scan_at_3mm_and_maps_come_back_on_the_scan(tmp_path, capsys):
    case = write_case(tmp_path / "data")
    torch.manual_seed(0)
    unet = build_model("unet3d", in_channels=4, out_channels=3, channels=[4, 8], num_res_units=0)
    save_checkpoint(unet, {"task": "segment", "region_names": ["TC", "WT", "ET"], "output": "sigmoid regions",
                           "preprocessing": {"resolution_mm": 3.0, "orientation": "RAS"}}, tmp_path / "unet")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "explain", "--model", tmp_path / "unet", "--input", case, "--methods",
                        "vanilla_gradient,gradcam", "--target", "WT", "--out", out, "--quiet")
    assert code == 0, err
    for f in (out / "maps").glob("*.nii.gz"):
        img = nib.load(f)
        assert img.shape[:3] == SHAPE and np.allclose(img.affine, LPS_1MM)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["studies"][0]["settings"]["preprocessing"]["resampled"]["to_shape"] == [10, 12, 9]
    assert summary["settings"]["model_grid"]["from"] == {"spacing": "config.json", "orientation": "config.json"}


def test_ground_truth_goes_to_the_model_grid_as_labels_and_maps_come_back_linear(tmp_path):
    from voxplain.report.inputs import load_cases
    from voxplain.report.preparation import model_grid, prepare_case

    case = load_cases([write_case(tmp_path / "data")])[0]
    seg = case.seg.copy()
    seg[seg > 0] = 4  # labels that linear interpolation would mix with 0
    case.seg = seg
    model = build_model("unet3d", in_channels=4, out_channels=3, channels=[4, 8], num_res_units=0)
    prepared = prepare_case(case, model, grid=model_grid({"spacing": [3, 3, 3], "orientation": "RAS"}))
    assert prepared.x.shape == (1, 4, 10, 12, 9) and prepared.spacing == (3.0, 3.0, 3.0)
    assert set(np.unique(prepared.seg)) == {0, 4}
    back = prepared.labels_to_scan(prepared.seg)
    assert back.shape == case.seg.shape and set(np.unique(back)) == {0, 4}
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[None, :, None, None], (1, 10, 12, 9))
    on_scan = prepared.to_scan(ramp)  # linear: a ramp on the model grid stays a ramp on the scan
    assert on_scan.shape == (1, *case.image.shape[1:]) and len(np.unique(on_scan.round(4))) > 10


# -- 2. any input size ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["build_segresnet", "build_dynunet", "build_basicunet", "build_attentionunet"])
def test_monai_networks_run_on_an_ordinary_scan_size(tmp_path, capsys, factory):
    case = write_case(tmp_path / "data", shape=(21, 19, 17))
    out = tmp_path / "out"
    code, _, err = _run(capsys, "explain", "--model", f"{HERE}:{factory}", "--random-weights", "--input", case,
                        "--task", "segment", "--target", "1", "--methods", "vanilla_gradient", "--out", out, "--quiet")
    assert code == 0, err
    img = nib.load(next((out / "maps").glob("*vanilla_gradient.nii.gz")))
    assert img.shape == (21, 19, 17, 4)
    assert "pad_to_multiple_of" in json.loads((out / "summary.json").read_text())["studies"][0]["settings"][
        "preprocessing"]


def test_pad_multiple_is_forced_from_the_command_line(tmp_path, capsys):
    case = write_case(tmp_path / "data", shape=(21, 19, 17))
    code, _, err = _run(capsys, "explain", "--model", f"{HERE}:build_segresnet", "--random-weights", "--input", case,
                        "--task", "segment", "--methods", "vanilla_gradient", "--pad-multiple", "8",
                        "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    notes = json.loads((tmp_path / "out" / "summary.json").read_text())["studies"][0]["settings"]["preprocessing"]
    assert notes["pad_to_multiple_of"] == [8, 8, 8] and notes["size_rule"].startswith("override")


def test_unetr_needs_its_img_size_as_the_window_and_runs_with_it(tmp_path, capsys):
    case = write_case(tmp_path / "data", shape=(21, 19, 17))
    args = ["explain", "--model", f"{HERE}:build_unetr", "--random-weights", "--input", case, "--task", "segment",
            "--target", "0", "--methods", "vanilla_gradient,gradcam", "--quiet"]
    code, _, err = _run(capsys, *args, "--out", tmp_path / "refused")
    _one_line_error(code, err, "--roi 16,16,16")
    assert not (tmp_path / "refused").exists()
    code, _, err = _run(capsys, *args, "--roi", "16,16,16", "--overlap", "0.25", "--out", tmp_path / "out")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["model_grid"]["sliding_window"]["roi_size"] == [16, 16, 16]
    assert nib.load(next((tmp_path / "out" / "maps").glob("*gradcam.nii.gz"))).shape == (21, 19, 17)


# -- 3. sliding windows through the command line ---------------------------------------------------------------
def test_explain_and_inspect_with_a_sliding_window(tmp_path, capsys):
    case = write_case(tmp_path / "data", shape=(21, 19, 17))
    common = ["--model", f"{HERE}:build_segresnet", "--random-weights", "--input", case, "--task", "segment",
              "--target", "2", "--roi", "16,16,16", "--overlap", "0.5", "--sw-mode", "constant", "--sw-batch-size",
              "2", "--quiet"]
    code, _, err = _run(capsys, "explain", *common, "--methods", "vanilla_gradient,integrated_gradients,gradcam",
                        "--option", "integrated_gradients.steps=2", "--out", tmp_path / "explain")
    assert code == 0, err
    settings = json.loads((tmp_path / "explain" / "summary.json").read_text())["settings"]
    assert settings["model_grid"]["sliding_window"] == {"roi_size": [16, 16, 16], "overlap": 0.5, "mode": "constant",
                                                        "sigma_scale": 0.125, "sw_batch_size": 2,
                                                        "padding_mode": "constant", "cval": 0.0}
    code, _, err = _run(capsys, "inspect", *common, "--out", tmp_path / "inspect")
    assert code == 0, err
    summary = json.loads((tmp_path / "inspect" / "summary.json").read_text())
    assert summary["studies"][0]["settings"]["filters_shown_on"] == "the central window"
    code, _, err = _run(capsys, "explain", *common[:7], "--overlap", "0.5", "--out", tmp_path / "bad", "--quiet")
    _one_line_error(code, err, "--roi")
    code, _, err = _run(capsys, "explain", *common[:7], "--roi", "10,10,10", "--out", tmp_path / "bad", "--quiet")
    _one_line_error(code, err, "window size (10, 10, 10) is not a multiple of (4, 4, 4)")


# -- 6. no silent random weights ------------------------------------------------------------------------------
def test_module_factory_without_weights_is_refused_unless_random_weights_is_asked_for(tmp_path, capsys):
    case = write_case(tmp_path / "data", shape=(21, 19, 17))
    args = ["explain", "--model", f"{HERE}:build_segresnet", "--input", case, "--task", "segment",
            "--methods", "vanilla_gradient", "--quiet"]
    code, _, err = _run(capsys, *args, "--out", tmp_path / "refused")
    _one_line_error(code, err, "random weights", "--weights", "--random-weights")
    assert not (tmp_path / "refused").exists()
    code, _, err = _run(capsys, *args, "--random-weights", "--out", tmp_path / "out")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["random_weights"] is True and "RANDOM WEIGHTS" in summary["alerts"][0]
    page = (tmp_path / "out" / "report.html").read_text()
    header = page[page.index("<header>"):page.index("</header>")]
    assert 'class="alert"' in header and "RANDOM WEIGHTS" in header
    # a trained model's report has no such alert
    torch.save(build_segresnet().state_dict(), tmp_path / "w.pt")
    code, _, err = _run(capsys, *args, "--weights", tmp_path / "w.pt", "--out", tmp_path / "trained")
    assert code == 0, err
    summary = json.loads((tmp_path / "trained" / "summary.json").read_text())
    assert summary["settings"]["random_weights"] is False and "alerts" not in summary
    assert 'class="alert"' not in (tmp_path / "trained" / "report.html").read_text()


# -- 4. MONAI bundles -----------------------------------------------------------------------------------------
def _bundle(root: Path, network: dict, weights: dict, roi=(16, 16, 16), extra_steps=()) -> Path:
    from test_bundle import METADATA, _brats_inference, _make_bundle

    steps = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
             {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
             {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
             {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
             *extra_steps]
    inference = _brats_inference(roi=roi, preprocessing=steps)
    inference["network_def"] = network
    return _make_bundle(root, inference, weights, metadata=METADATA)


def test_a_brats_shaped_bundle_explained_from_the_command_line(tmp_path, capsys):
    from test_bundle import NETWORK, _network

    case = write_case(tmp_path / "data")
    folder = _bundle(tmp_path / "brats_mri_segmentation", NETWORK, _network(seed=1).state_dict())
    out = tmp_path / "out"
    code, _, err = _run(capsys, "explain", "--model", folder, "--input", case, "--target", "Whole tumor",
                        "--methods", "vanilla_gradient,gradcam", "--out", out, "--quiet")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    settings, study = summary["settings"], summary["studies"][0]
    assert settings["random_weights"] is False and settings["bundle"]["classes"][1] == "Whole tumor"
    assert settings["model_grid"]["from"] == {"sliding_window": "bundle inferer", "spacing": "bundle",
                                              "orientation": "bundle", "normalisation": "bundle",
                                              "channel_names": "bundle"}
    notes = study["settings"]["preprocessing"]
    assert notes["channels"]["from_scan"] == ["t1ce", "t1", "t2", "flair"]
    assert notes["resampled"]["spacing_mm"] == [2.0, 2.0, 2.0] and notes["normalise"].startswith("bundle: Normal")
    assert notes["sliding_window"]["roi_size"] == [16, 16, 16]
    assert study["settings"]["targets"]["Whole tumor"]["target"]["classes"] == [1]
    for f in (out / "maps").glob("*.nii.gz"):
        img = nib.load(f)
        assert img.shape[:3] == SHAPE and np.allclose(img.affine, LPS_1MM)


def test_a_bundle_s_channel_order_and_activation_are_followed(tmp_path, capsys):
    """The network reads only its first channel, T1c: the gradient map (written in the scan's order) lives in t1ce."""
    from tiny_models import FirstChannelSeg

    case = write_case(tmp_path / "data")
    folder = _bundle(tmp_path / "probe", {"_target_": "tiny_models.FirstChannelSeg"}, FirstChannelSeg().state_dict())
    out = tmp_path / "out"
    code, _, err = _run(capsys, "explain", "--model", folder, "--input", case, "--target", "Tumor core",
                        "--methods", "vanilla_gradient", "--out", out, "--quiet")
    assert code == 0, err
    data = np.asarray(nib.load(next((out / "maps").glob("*vanilla_gradient.nii.gz"))).dataobj)
    per_channel = np.abs(data).reshape(-1, 4).sum(0)
    assert per_channel[1] > 0 and per_channel[[0, 2, 3]].max() == 0  # t1, t1ce, t2, flair on disk
    target = json.loads((out / "summary.json").read_text())["settings"]["bundle"]
    assert target["output_activation"] == "sigmoid"


def test_a_bundle_step_voxplain_cannot_reproduce_is_refused_by_name(tmp_path, capsys):
    from test_bundle import NETWORK, _network

    case = write_case(tmp_path / "data")
    crop = {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"}
    folder = _bundle(tmp_path / "b", NETWORK, _network(seed=1).state_dict(), extra_steps=[crop])
    code, _, err = _run(capsys, "explain", "--model", folder, "--input", case, "--methods", "vanilla_gradient",
                        "--out", tmp_path / "out", "--quiet")
    _one_line_error(code, err, "CropForeground")
    assert not (tmp_path / "out").exists()


def test_help_says_a_bundle_is_code(capsys):
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "MONAI bundle folder" in text and "A MONAI bundle is code" in text and "like TorchScript" in text


# -- 5. DICOM series ------------------------------------------------------------------------------------------
def test_a_folder_of_dicom_series_is_explained_and_maps_are_nifti_on_its_grid(tmp_path, capsys):
    from test_dicom import _geometry, _volume, _write_series

    affine = _geometry("axial")
    for i, m in enumerate(MODALITIES):
        _write_series(tmp_path / "dicom" / m, _volume(seed=i), affine, description=f"AX {m.upper()}")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "explain", "--model", f"{HERE}:build_voxel_probe", "--random-weights", "--input",
                        tmp_path / "dicom", "--task", "classify", "--target", "0", "--methods", "vanilla_gradient",
                        "--out", out, "--quiet")
    assert code == 0, err
    img = nib.load(next((out / "maps").glob("*vanilla_gradient.nii.gz")))
    np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    assert img.shape == (12, 10, 7, 4)
    data = np.asarray(img.dataobj)
    nz = np.argwhere(data != 0)
    # RAS voxel (3, 5, 4) of the probe, stored on the DICOM grid (columns towards L, rows towards P: both flipped)
    assert nz.tolist() == [[12 - 1 - 3, 10 - 1 - 5, 4, 0]]
    # a modality with two series (e.g. a repeated acquisition) is refused: exit 2, one line, nothing written
    _write_series(tmp_path / "dicom" / "flair2", _volume(seed=9), affine, description="SAG FLAIR")
    code, _, err = _run(capsys, "explain", "--model", f"{HERE}:build_voxel_probe", "--random-weights", "--input",
                        tmp_path / "dicom", "--task", "classify", "--methods", "vanilla_gradient",
                        "--out", tmp_path / "mixed", "--quiet")
    _one_line_error(code, err, "flair: several")
    assert not (tmp_path / "mixed").exists()
