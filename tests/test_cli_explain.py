"""`voxplain explain` / `inspect` end to end on small files written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from voxplain.cli import main
from voxplain.data.nifti import load_nifti
from voxplain.models import build_model, save_checkpoint

SHAPE = (20, 24, 16)  # stored (LPS) voxel grid
LPS_AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 40.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1]])
MODALITIES = ("t1", "t1ce", "t2", "flair")


def write_case(root: Path, name: str = "CASE_001", affine=LPS_AFFINE, seed: int = 0) -> Path:
    """A BraTS-layout folder: int16 modalities in LPS orientation with a bright blob, and a seg."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    idx = np.indices(SHAPE)
    brain = ((idx[0] - 10) ** 2 / 81 + (idx[1] - 12) ** 2 / 100 + (idx[2] - 8) ** 2 / 49) < 1
    blob = ((idx[0] - 6) ** 2 + (idx[1] - 15) ** 2 + (idx[2] - 9) ** 2) < 9
    for c, m in enumerate(MODALITIES):
        data = (rng.normal(300 + 50 * c, 20, SHAPE) + 400 * blob) * brain
        nib.save(nib.Nifti1Image(data.astype(np.int16), affine), folder / f"{name}_{m}.nii.gz")
    seg = (blob * 2).astype(np.uint8)
    nib.save(nib.Nifti1Image(seg, affine), folder / f"{name}_seg.nii.gz")
    return folder


class Probe(torch.nn.Module):
    """Two logits read from one voxel of channel 0 (RAS index): its gradient is non-zero only there."""

    VOXEL = (3, 5, 11)

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def forward(self, x):
        i, j, k = self.VOXEL
        return x[:, 0, i, j, k][:, None] * self.scale


def build_probe():
    """Factory used as 'test_cli_explain.py:build_probe'."""
    return Probe()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny untrained zoo checkpoints: a 3D classifier, a 3D U-Net and a 2D CNN."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    grade = build_model("classifier3d", in_channels=4, num_classes=3, blocks=2, base_width=4)
    save_checkpoint(grade, {"task": "classify", "class_names": ["a", "b", "c"]}, root / "grade")
    unet = build_model("unet3d", in_channels=4, out_channels=3, channels=[4, 8], num_res_units=0)
    save_checkpoint(unet, {"task": "segment", "region_names": ["TC", "WT", "ET"], "output": "sigmoid regions"},
                    root / "unet")
    cnn = build_model("cnn2d", in_channels=1, num_classes=2, blocks=3, base_width=4)
    save_checkpoint(cnn, {"task": "classify", "class_names": ["no tumour", "tumour"], "input_size": [32, 32]},
                    root / "cnn")
    return root


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_probe_map_lines_up_with_an_lps_int16_scan(tmp_path, capsys):
    case = write_case(tmp_path / "data")
    out = tmp_path / "out"
    probe = f"{Path(__file__).resolve()}:build_probe"
    code, _, err = _run(capsys, "explain", "--model", probe, "--random-weights", "--input", str(case), "--task",
                        "classify", "--target", "0", "--methods", "vanilla_gradient", "--out", str(out), "--quiet")
    assert code == 0, err
    img = nib.load(out / "maps" / "a_vanilla_gradient.nii.gz" if False else
                   next((out / "maps").glob("*vanilla_gradient.nii.gz")))
    source = nib.load(case / "CASE_001_t1.nii.gz")
    np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
    assert img.shape == (*SHAPE, 4) and img.get_data_dtype() == np.float32
    data = np.asarray(img.dataobj)
    nz = np.argwhere(data != 0)
    assert len(nz) == 1 and nz[0][3] == 0  # one voxel of channel 0 (t1)
    # the stored voxel is the probe's RAS voxel, flipped on the L and P axes
    i, j, k = Probe.VOXEL
    assert tuple(nz[0][:3]) == (SHAPE[0] - 1 - i, SHAPE[1] - 1 - j, k)
    # and the same world point as that voxel of the source scan
    ras_data, meta = load_nifti(next((out / "maps").glob("*vanilla_gradient.nii.gz")), channels_from_4d=True)
    assert ras_data.shape == (4, *SHAPE) and np.argwhere(ras_data[0] != 0).tolist() == [[i, j, k]]


def test_explain_classifier_writes_consistent_report(tmp_path, capsys, checkpoints):
    case = write_case(tmp_path / "data")
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "explain", "--model", str(checkpoints / "grade"), "--input", str(case),
                             "--methods", "vanilla_gradient,integrated_gradients,gradcam",
                             "--option", "integrated_gradients.steps=3", "--target", "1", "--out", str(out),
                             "--quiet")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    study = summary["studies"][0]
    assert set(study["maps"]["b"]) == {"vanilla_gradient", "integrated_gradients", "gradcam"}
    methods = study["settings"]["targets"]["b"]["methods"]
    assert methods["integrated_gradients"]["options"]["steps"] == 3 and methods["gradcam"]["seconds"] >= 0
    source = nib.load(case / "CASE_001_flair.nii.gz")
    for rel in study["maps"]["b"].values():
        img = nib.load(out / rel)
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
        assert img.shape[:3] == SHAPE
    assert (out / "report.html").is_file() and (out / study["figures"][0]).is_file()
    assert not list(tmp_path.glob(".out*"))  # no temporary folder left beside it


def test_fold_batchnorm_is_opt_in_and_recorded(tmp_path, capsys, checkpoints):
    case = write_case(tmp_path / "data")
    maps, settings = {}, {}
    for flag in ((), ("--fold-batchnorm",)):
        out = tmp_path / f"out{len(flag)}"
        code, _, err = _run(capsys, "explain", "--model", str(checkpoints / "grade"), "--input", str(case),
                            "--methods", "integrated_gradients", "--option", "integrated_gradients.steps=4",
                            "--target", "1", "--out", str(out), "--quiet", *flag)
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        settings[bool(flag)] = summary["settings"]["fold_batchnorm"]
        maps[bool(flag)] = nib.load(out / summary["studies"][0]["maps"]["b"]["integrated_gradients"]).get_fdata()
    assert settings == {False: False, True: True}
    # the folded convolutions round differently: the same map up to float32 rounding, not to the bit
    assert not np.array_equal(maps[True], maps[False])
    np.testing.assert_allclose(maps[True], maps[False], rtol=0, atol=1e-4 * np.abs(maps[False]).max())


def test_explain_segmentation_all_regions(tmp_path, capsys, checkpoints):
    case = write_case(tmp_path / "data")
    out = tmp_path / "seg"
    code, _, err = _run(capsys, "explain", "--model", str(checkpoints / "unet"), "--input", str(case),
                        "--methods", "vanilla_gradient,gradcam", "--out", str(out), "--quiet")
    assert code == 0, err
    study = json.loads((out / "summary.json").read_text())["studies"][0]
    assert set(study["maps"]) == {"TC", "WT", "ET"}
    img = nib.load(out / study["maps"]["WT"]["gradcam"])
    assert img.shape == SHAPE  # single-channel map: 3D


def test_explain_folder_of_cases_and_png(tmp_path, capsys, checkpoints):
    from PIL import Image

    data = tmp_path / "data"
    write_case(data, "CASE_001")
    write_case(data, "CASE_002", seed=1)
    code, _, err = _run(capsys, "explain", "--model", str(checkpoints / "grade"), "--input", str(data),
                        "--methods", "vanilla_gradient,gradcam", "--out", str(tmp_path / "many"), "--quiet")
    assert code == 0, err
    index = (tmp_path / "many" / "index.html").read_text()
    assert "case_001/report.html" in index and (tmp_path / "many" / "case_002" / "summary.json").is_file()
    assert "comparison_cases.png" in index and (tmp_path / "many" / "comparison_cases.png").is_file()

    png = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((40, 36)) * 255).astype(np.uint8)).save(png)
    code, _, err = _run(capsys, "explain", "--model", str(checkpoints / "cnn"), "--input", str(png),
                        "--methods", "vanilla_gradient,gradcam", "--out", str(tmp_path / "png"), "--quiet")
    assert code == 0, err
    summary = json.loads((tmp_path / "png" / "summary.json").read_text())
    assert summary["studies"][0]["prediction"]["predicted_label"] in ("no tumour", "tumour")


def test_inspect_unet(tmp_path, capsys, checkpoints):
    case = write_case(tmp_path / "data")
    out = tmp_path / "inspect"
    code, _, err = _run(capsys, "inspect", "--model", str(checkpoints / "unet"), "--input", str(case),
                        "--target", "WT", "--out", str(out), "--quiet")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    layers = summary["studies"][0]["settings"]["layers"]
    assert len(layers) >= 3
    assert any("inspection" in f for f in summary["figures"]) and any("filters" in f for f in summary["figures"])


@pytest.mark.parametrize("case_args, expected", [
    (["--input", "MISSING"], "not found"),
    (["--methods", "no_such_method"], "unknown method"),
    (["--target", "7"], "out of range"),
])
def test_bad_input_exits_non_zero_with_one_line_and_no_output(tmp_path, capsys, checkpoints, case_args, expected):
    case = write_case(tmp_path / "data")
    out = tmp_path / "out"
    args = {"--model": str(checkpoints / "grade"), "--input": str(case), "--methods": "vanilla_gradient",
            "--out": str(out)}
    for k, v in zip(case_args[::2], case_args[1::2]):
        args[k] = str(tmp_path / v) if v == "MISSING" else v
    code, _, err = _run(capsys, "explain", *[x for kv in args.items() for x in kv], "--quiet")
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_model_rejecting_the_channels(tmp_path, capsys):
    case = write_case(tmp_path / "data")
    torch.manual_seed(0)
    two = build_model("classifier3d", in_channels=2, num_classes=2, blocks=2, base_width=4)
    save_checkpoint(two, {"task": "classify"}, tmp_path / "two")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "explain", "--model", str(tmp_path / "two"), "--input", str(case),
                        "--methods", "vanilla_gradient", "--out", str(out), "--quiet")
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "channel" in lines[0], err
    assert not out.exists()


def test_help_shows_examples(capsys):
    for command in ("explain", "inspect", "demo"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert "examples:" in capsys.readouterr().out


def test_an_unrelated_folder_is_never_replaced_but_an_old_report_is(tmp_path, capsys, checkpoints):
    case = write_case(tmp_path / "data")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    args = ["explain", "--model", str(checkpoints / "grade"), "--input", str(case), "--methods", "vanilla_gradient",
            "--quiet", "--out"]
    code, _, err = _run(capsys, *args, str(mine))
    assert code == 2 and "not a voxplain output" in err
    assert (mine / "thesis.tex").read_text() == "precious"
    out = tmp_path / "report"
    assert _run(capsys, *args, str(out))[0] == 0
    assert _run(capsys, *args, str(out))[0] == 0  # a new run replaces its own earlier output
    (out / "notes.txt").write_text("added by the user")
    code, _, err = _run(capsys, *args, str(out))  # ... but not once the user added a file to it
    assert code == 2 and "notes.txt" in err
    assert (out / "notes.txt").read_text() == "added by the user" and (out / "summary.json").is_file()


def _without_et(checkpoints: Path, out: Path) -> Path:
    """The tiny U-Net with its ET channel's bias pushed far down: it predicts no ET voxel."""
    from voxplain.models.checkpoint import load_checkpoint

    model, config = load_checkpoint(checkpoints / "unet")
    head = [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))
            and m.out_channels == 3][-1]
    with torch.no_grad():
        head.bias[2] = -1e4
    save_checkpoint(model, {k: config[k] for k in ("task", "region_names", "output", "model", "model_config")}, out)
    return out


def test_segmentation_defaults_to_the_predicted_region_and_writes_the_prediction(tmp_path, capsys, checkpoints):
    case = write_case(tmp_path / "data")
    out = tmp_path / "seg"
    code, _, err = _run(capsys, "explain", "--model", str(checkpoints / "unet"), "--input", str(case),
                        "--target", "WT", "--methods", "vanilla_gradient", "--out", str(out), "--quiet")
    assert code == 0, err
    study = json.loads((out / "summary.json").read_text())["studies"][0]
    pooling = study["targets"]["WT"]["pooling"]
    assert pooling.startswith("WT logit, mean over ") and pooling.endswith(" predicted voxels")
    assert study["settings"]["region"] == "predicted" and study["settings"]["targets"]["WT"]["region"] == "predicted"
    # the prediction beside the ground truth (the case has a seg): per region voxels, volumes and Dice
    regions = {r["region"]: r for r in study["prediction"]["regions"]}
    assert set(regions) == {"TC", "WT", "ET"} and regions["WT"]["truth_voxels"] == int((nib.load(
        case / "CASE_001_seg.nii.gz").get_fdata() > 0).sum()) and "dice" in regions["WT"]
    # the predicted label map, on the scan's grid, with BraTS labels
    pred = nib.load(out / study["prediction_map"])
    source = nib.load(case / "CASE_001_t1.nii.gz")
    assert pred.shape == SHAPE and np.allclose(pred.affine, source.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
    page = (out / "report.html").read_text()
    assert "mean over" in page and "ground-truth voxels" in page


def test_region_all_and_label(tmp_path, capsys, checkpoints):
    case = write_case(tmp_path / "data")
    pooled = {}
    for region in ("all", "label"):
        out = tmp_path / region
        code, _, err = _run(capsys, "explain", "--model", str(checkpoints / "unet"), "--input", str(case),
                            "--target", "WT", "--methods", "vanilla_gradient", "--region", region, "--out", str(out),
                            "--quiet")
        assert code == 0, err
        pooled[region] = json.loads((out / "summary.json").read_text())["studies"][0]["targets"]["WT"]["pooling"]
    assert pooled["all"].startswith("WT logit, mean over all ")
    seg = nib.load(case / "CASE_001_seg.nii.gz").get_fdata()
    assert pooled["label"] == f"WT logit, mean over {int((seg > 0).sum())} ground-truth voxels"
    (case / "CASE_001_seg.nii.gz").unlink()
    out = tmp_path / "nolabel"
    code, _, err = _run(capsys, "explain", "--model", str(checkpoints / "unet"), "--input", str(case),
                        "--target", "WT", "--methods", "vanilla_gradient", "--region", "label", "--out", str(out),
                        "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "ground-truth segmentation" in err
    assert not out.exists()


def test_a_region_the_model_does_not_predict_is_skipped_and_reported(tmp_path, capsys, checkpoints):
    case = write_case(tmp_path / "data")
    model = _without_et(checkpoints, tmp_path / "no_et")
    out = tmp_path / "seg"
    code, _, err = _run(capsys, "explain", "--model", str(model), "--input", str(case),
                        "--methods", "vanilla_gradient,gradcam", "--out", str(out), "--quiet")
    assert code == 0, err
    study = json.loads((out / "summary.json").read_text())["studies"][0]
    assert study["skipped_targets"] == {"ET": "model predicts no ET voxels"}
    assert "ET" not in study["maps"] and not list((out / "maps").glob("ET_*"))
    assert "no ET predicted, ground truth has" not in " ".join(study["prediction"].get("disagreements", []))  # no ET
    assert "model predicts no ET voxels" in (out / "report.html").read_text()


def test_a_4d_nifti_is_refused_unless_its_volumes_are_channels(tmp_path, capsys, checkpoints):
    data = np.random.default_rng(0).normal(size=(*SHAPE, 4)).astype(np.float32)
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(data, LPS_AFFINE), path)
    args = ["explain", "--model", str(checkpoints / "grade"), "--input", str(path), "--methods", "vanilla_gradient",
            "--quiet", "--out"]
    code, _, err = _run(capsys, *args, str(tmp_path / "refused"))
    assert code == 2 and "would be read as input channels" in err and "--channels-from-4d" in err
    code, _, err = _run(capsys, *args, str(tmp_path / "ok"), "--channels-from-4d")
    assert code == 0, err


def test_inspect_labels_layers_by_their_place_in_the_network(tmp_path, capsys, checkpoints):
    case = write_case(tmp_path / "data")
    out = tmp_path / "inspect"
    code, _, err = _run(capsys, "inspect", "--model", str(checkpoints / "unet"), "--input", str(case),
                        "--target", "WT", "--out", str(out), "--quiet")
    assert code == 0, err
    study = json.loads((out / "summary.json").read_text())["studies"][0]
    labels = [layer["label"] for layer in study["settings"]["layers"]]
    # a two-level U-Net: down conv, bottom conv, up conv to the output
    assert labels[0].startswith("enc") and any(lab.startswith("bottleneck") for lab in labels)
    assert labels[-1] == "head"
    assert all("module" in layer and "output_shape" in layer for layer in study["settings"]["layers"])
    assert study["settings"]["pooling"].startswith("WT logit, mean over")
