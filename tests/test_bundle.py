"""MONAI bundle folders made in the test (nothing downloaded), shaped like MONAI's brats_mri_segmentation."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.networks.nets import SegResNet

from voxplain.models.bundle import is_bundle_folder, load_bundle
from voxplain.sliding_window import SlidingWindow

NETWORK = {"_target_": "SegResNet", "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 8,
           "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2}

METADATA = {
    "version": "0.3.0", "task": "Multimodal Brain Tumor segmentation",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 4, "spatial_shape": ["8*n", "8*n", "8*n"],
                             "is_patch_data": True,
                             "channel_def": {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"}}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                             "channel_def": {"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}}},
    },
}


def _brats_inference(roi=(240, 240, 160), extra_inferer=None, preprocessing=None):
    """The structure of brats_mri_segmentation's configs/inference.json (with a tiny network)."""
    inferer = {"_target_": "SlidingWindowInferer", "roi_size": list(roi), "sw_batch_size": 1, "overlap": 0.5}
    inferer.update(extra_inferer or {})
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "dataset_dir": "/workspace/data/medical/brats2018challenge",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": NETWORK,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing or [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
        ]},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
        ]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}}],
    }


def _network(seed=0, **overrides):
    torch.manual_seed(seed)
    config = {k: v for k, v in NETWORK.items() if k != "_target_"}
    config.update(overrides)
    return SegResNet(spatial_dims=3, **config).eval()


def _make_bundle(root, inference, weights, metadata=METADATA, config_name="inference.json"):
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    text = json.dumps(inference, indent=2) if config_name.endswith(".json") else yaml.safe_dump(inference)
    (root / "configs" / config_name).write_text(text)
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    torch.save(weights, root / "models" / "model.pt")
    return root


def test_a_brats_shaped_bundle_loads_offline_with_its_settings(tmp_path):
    reference = _network(seed=1)
    folder = _make_bundle(tmp_path / "brats_mri_segmentation", _brats_inference(), reference.state_dict())
    assert is_bundle_folder(folder) and not is_bundle_folder(tmp_path)
    bundle = load_bundle(folder)
    assert isinstance(bundle.network, SegResNet) and not bundle.network.training
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(bundle.network(x), reference(x), rtol=0, atol=0)
    assert bundle.channel_names == ("T1c", "T1", "T2", "FLAIR")
    assert bundle.class_names == ("Tumor core", "Whole tumor", "Enhancing tumor")
    assert bundle.output_activation == "sigmoid"
    assert bundle.version == "0.3.0" and bundle.task == "Multimodal Brain Tumor segmentation"
    # MONAI's SlidingWindowInferer defaults fill what the config leaves out (mode, sigma_scale, padding)
    assert bundle.sliding_window == {"roi_size": (240, 240, 160), "overlap": 0.5, "mode": "constant",
                                     "sigma_scale": 0.125, "sw_batch_size": 1, "padding_mode": "constant",
                                     "cval": 0.0}
    assert [s.name for s in bundle.preprocessing] == ["LoadImage", "NormalizeIntensity"]
    assert bundle.normalisation.args == {"keys": "image", "nonzero": True, "channel_wise": True}
    assert bundle.orientation is None and bundle.spacing is None
    assert bundle.pad_multiple == 8 and bundle.unsupported_steps == ()


def test_a_yaml_bundle_with_spacing_orientation_and_a_step_voxplain_cannot_reproduce(tmp_path):
    reference = _network(seed=2)
    preprocessing = [
        {"_target_": "LoadImaged", "keys": ["image"]},
        {"_target_": "EnsureChannelFirstd", "keys": ["image"]},
        {"_target_": "Orientationd", "keys": ["image"], "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": ["image"], "pixdim": "$[1.0, 1.0, 2.0]", "mode": ["bilinear"]},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "monai.transforms.CropForegroundd", "keys": "image", "source_key": "image"},
        {"_target_": "DivisiblePadd", "keys": "image", "k": 16, "_disabled_": True},
    ]
    inference = _brats_inference(roi=(16, 16, 16), extra_inferer={"mode": "gaussian", "sw_batch_size": 2},
                                 preprocessing=preprocessing)
    folder = _make_bundle(tmp_path / "b", inference, {"model": reference.state_dict(), "epoch": torch.tensor(3)},
                          metadata={"name": "tiny"}, config_name="inference.yaml")
    bundle = load_bundle(folder)
    assert bundle.name == "tiny" and bundle.channel_names is None and bundle.pad_multiple is None
    assert bundle.orientation == "RAS" and bundle.spacing == (1.0, 1.0, 2.0) and bundle.spacing_mode == "bilinear"
    assert bundle.normalisation.name == "ScaleIntensityRange" and bundle.normalisation.args["a_max"] == 164
    assert bundle.unsupported_steps == ("CropForeground",)
    # the description's sliding window applies the network exactly as the bundle's own inferer does
    sw = bundle.sliding_window_inferer()
    assert isinstance(sw, SlidingWindow) and sw.mode == "gaussian" and sw.sw_batch_size == 2
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.yaml"))
    monai_inferer = parser.get_parsed_content("inferer")
    x = torch.randn(1, 4, 24, 20, 16)
    with torch.no_grad():
        torch.testing.assert_close(sw.forward(bundle.network, x), monai_inferer(x, reference), rtol=1e-6, atol=1e-6)


def test_bad_bundles_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundle folder not found"):
        load_bundle(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="configs/inference.json"):
        load_bundle(tmp_path / "empty")
    folder = _make_bundle(tmp_path / "small", _brats_inference(), _network(init_filters=16).state_dict())
    with pytest.raises(ValueError, match="do not fit the bundle's network"):
        load_bundle(folder)
    (folder / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="models/model.pt"):
        load_bundle(folder)
    torch.save(_network(), folder / "models" / "model.pt")  # a pickled module: code, refused
    with pytest.raises(ValueError, match="weights_only=True"):
        load_bundle(folder)
    broken = _brats_inference()
    broken["network_def"] = {**NETWORK, "no_such_option": 1}
    folder = _make_bundle(tmp_path / "broken", broken, _network().state_dict())
    with pytest.raises(ValueError, match="cannot build 'network_def'"):
        load_bundle(folder)
