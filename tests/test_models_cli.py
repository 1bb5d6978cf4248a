"""`voxplain train` end to end on a tiny phantom cohort and a tiny image folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from voxplain.cli import main
from voxplain.cli.train import PRESETS
from voxplain.models import load_model, read_checkpoint_config


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from voxplain.data.phantom import generate_cohort

    root = tmp_path_factory.mktemp("cohort") / "phantom"
    generate_cohort(root, subjects=4, seed=0, resolution=3, grades="HGG:0.5,LGG:0.5")
    return root


def _check_outputs(out, task, input_size):
    assert sorted(p.name for p in out.iterdir()) == [".voxplain-output.json", "config.json", "history.json",
                                                     "learning_curve.png", "model.pt"]
    # the marker lists every file, the learning curve written after the checkpoint too
    assert sorted(json.loads((out / ".voxplain-output.json").read_text())["files"]) == [
        "config.json", "history.json", "learning_curve.png", "model.pt"]
    cfg = read_checkpoint_config(out)
    assert cfg["task"] == task and cfg["input_size"] == list(input_size)
    history = json.loads((out / "history.json").read_text())
    assert len(history) == cfg["training"]["epochs"] and history[0]["epoch"] == 1
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    model = load_model(out)
    x = torch.randn(1, len(cfg["channel_names"]), *input_size)
    with torch.no_grad():
        return cfg, history, model(x)


@pytest.mark.slow
def test_train_segment_cli(cohort, tmp_path):
    out = tmp_path / "unet"
    rc = main(["train", "--task", "segment", "--data", str(cohort), "--out", str(out), "--epochs", "1",
               "--batch-size", "2", "--size", "24", "--val-fraction", "0.25", "--patch", "16", "--flip", "--quiet"])
    assert rc == 0
    cfg, history, y = _check_outputs(out, "segment", (24, 24, 24))
    assert cfg["model"] == "unet3d_interp" and cfg["region_names"] == ["TC", "WT", "ET"]
    assert cfg["channel_names"] == ["t1", "t1ce", "t2", "flair"] and cfg["data"]["kind"] == "cohort-regions"
    assert cfg["data"]["train"] == {"path": str(cohort), "samples": 3, "generator": "voxplain.data.phantom",
                                    "subjects": 4, "seed": 0, "resolution": 3, "grades": {"HGG": 0.5, "LGG": 0.5},
                                    "healthy_fraction": 0.0}
    assert cfg["data"]["val"] == {"from": "train", "fraction": 0.25, "samples": 1} and "test" not in cfg["data"]
    assert {"val_dice_TC", "val_dice_WT", "val_dice_ET"} <= set(history[0])
    assert cfg["preprocessing"]["training_patches"] == {"size": [16, 16, 16], "per_case": 2, "left_right_flips": True,
                                                        "shift_voxels": 0, "intensity_jitter": 0.0}
    prep = cfg["preprocessing"]
    assert prep["spacing_mm"] == [3.0, 3.0, 3.0] and prep["orientation"] == "RAS" and prep["crop_or_pad"] == [24] * 3
    assert prep["normalise"] == "zscore per modality over brain voxels"
    assert y.shape == (1, 3, 24, 24, 24)


@pytest.mark.slow
def test_train_grade_cli_is_deterministic(cohort, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(["train", "--data", str(cohort), "--out", str(out), "--model", "classifier3d", "--blocks", "2",
                     "--epochs", "1", "--batch-size", "2", "--size", "16", "--val-fraction", "0.5",
                     "--quiet"]) == 0
    cfg, history, y = _check_outputs(outs[0], "classify", (16, 16, 16))
    assert cfg["class_names"] == ["LGG", "HGG"] and y.shape == (1, 2)
    assert {"train_accuracy", "val_accuracy"} <= set(history[0])
    a, b = (torch.load(o / "model.pt", weights_only=True) for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_train_with_validation_and_test_cohorts(cohort, tmp_path):
    from voxplain.data.phantom import generate_cohort

    held_out = tmp_path / "held_out"
    generate_cohort(held_out, subjects=3, seed=7, resolution=3, grades="HGG:0.5,LGG:0.5")
    out = tmp_path / "grade"
    assert main(["train", "--data", str(cohort), "--val-data", str(held_out), "--test-data", str(held_out),
                 "--out", str(out), "--model", "resnet3d", "--epochs", "2", "--batch-size", "2", "--size", "16",
                 "--flip", "--shift", "1", "--intensity", "0.1", "--lr-schedule", "cosine", "--threads", "1",
                 "--quiet"]) == 0
    cfg, history, y = _check_outputs(out, "classify", (16, 16, 16))
    assert cfg["model"] == "resnet3d" and y.shape == (1, 2)
    assert cfg["data"]["train"]["samples"] == 4 and cfg["data"]["val"]["samples"] == 3
    assert cfg["data"]["val"]["seed"] == 7 and cfg["data"]["test"]["path"] == str(held_out)
    test = cfg["test_metrics"]
    assert test["n"] == 3 and sum(map(sum, test["confusion"])) == 3 and 0 <= test["accuracy"] <= 1
    training = cfg["training"]
    assert training["threads"] == 1 and training["lr_schedule"] == "cosine" and training["cpu_seconds"] > 0
    assert set(training["load_average"]) == {"start", "end"} and history[1]["lr"] < history[0]["lr"]
    # a held-out folder of another kind is refused with what differs
    assert main(["train", "--data", str(cohort), "--val-data", str(held_out), "--test-data", str(tmp_path),
                 "--out", str(tmp_path / "x"), "--epochs", "1", "--size", "16", "--quiet"]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_train_slices_cli(cohort, tmp_path):
    out = tmp_path / "slices"
    assert main(["train", "--data", str(cohort), "--slices", "--out", str(out), "--blocks", "3", "--epochs", "1",
                 "--batch-size", "16", "--size", "16", "--quiet"]) == 0
    cfg, _, y = _check_outputs(out, "classify", (16, 16))
    assert cfg["model"] == "cnn2d" and cfg["class_names"] == ["no tumour", "tumour"] and y.shape == (1, 2)
    assert cfg["model_config"]["blocks"] == 3


def test_train_image_folder_cli(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, cls in enumerate(["normal", "pneumonia"]):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = (rng.random((20, 20)) * 100 + 120 * label).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "cnn"
    assert main(["train", "--data", str(tmp_path / "imgs"), "--out", str(out), "--blocks", "5", "--size", "16",
                 "--epochs", "2", "--batch-size", "4", "--val-fraction", "0.25", "--quiet"]) == 0
    cfg, _, y = _check_outputs(out, "classify", (16, 16))
    assert cfg["class_names"] == ["normal", "pneumonia"] and cfg["channel_names"] == ["grey"]
    assert cfg["data"]["kind"] == "image-folder" and cfg["data"]["train"]["samples"] == 6 and y.shape == (1, 2)


def test_train_cli_user_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope is not a folder" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "empty"), "--task", "segment", "--out", str(tmp_path / "o")]) == 2
    assert "segmentation needs a BraTS / phantom cohort" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "empty"), "--task", "segment", "--model", "cnn2d",
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not fit task 'segment'" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "empty"), "--val-fraction", "1.5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_presets_are_complete_and_overridable():
    from voxplain.cli import build_parser
    from voxplain.cli.train import _settings

    for name, preset in PRESETS.items():
        assert {"task", "model", "epochs", "batch_size", "lr", "seed"} <= set(preset), name
    args = build_parser().parse_args(["train", "--preset", "demo-slices", "--data", "d", "--out", "o",
                                      "--epochs", "3"])
    settings = _settings(args)
    assert settings["slices"] and settings["model"] == "cnn2d" and settings["model_config"] == {"blocks": 5}
    assert settings["epochs"] == 3 and settings["lr"] == PRESETS["demo-slices"]["lr"]
