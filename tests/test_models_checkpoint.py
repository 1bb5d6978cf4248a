"""Checkpoints and safe model loading: our folders, module:factory + weights, TorchScript, pickles."""

from __future__ import annotations

import json

import pytest
import torch

from voxplain.models import build_model, load_model, read_checkpoint_config, save_checkpoint
from voxplain.models.checkpoint import UnsafeModelFileError

from tiny_models import classifier


def _perturb_bn(model):
    # non-trivial running statistics so a round trip that lost buffers would show
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("name,config,shape", [
    ("cnn2d", {"blocks": 5, "image_size": 32}, (2, 1, 32, 32)),
    ("classifier3d", {"blocks": 3}, (2, 4, 12, 12, 12)),
    ("unet3d", {"channels": (4, 8, 16)}, (1, 4, 12, 12, 12)),
])
def test_checkpoint_round_trip_identical_outputs(tmp_path, name, config, shape):
    torch.manual_seed(0)
    model = _perturb_bn(build_model(name, **config)).eval()
    meta = {"task": "classify", "class_names": ["LGG", "HGG"], "channel_names": ["t1", "t1ce", "t2", "flair"],
            "input_size": list(shape[2:]), "preprocessing": {"normalise": "zscore_nonzero"}}
    history = [{"epoch": 1, "train_loss": 0.5}]
    out = save_checkpoint(model, meta, tmp_path / "ckpt", history=history)
    assert sorted(p.name for p in out.iterdir()) == [".voxplain-output.json", "config.json", "history.json",
                                                     "model.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    cfg = read_checkpoint_config(out)
    assert cfg["model"] == name and cfg["class_names"] == ["LGG", "HGG"] and cfg["input_size"] == list(shape[2:])
    assert json.loads((out / "history.json").read_text()) == history
    x = torch.randn(shape)
    for spec in (out, out / "config.json", str(out)):
        loaded = load_model(spec)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(model(x), loaded(x))


def test_save_checkpoint_needs_model_name(tmp_path):
    with pytest.raises(ValueError, match="zoo model name"):
        save_checkpoint(classifier(), {}, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_module_factory_with_weights_only(tmp_path):
    model = classifier(dims=2, seed=1).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    # the same weights wrapped in a training checkpoint dict with a DataParallel prefix
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "w2.pth")
    x = torch.randn(2, 2, 8, 8)
    for weights in ("w.pt", "w2.pth"):
        loaded = load_model("tiny_models:classifier", weights=tmp_path / weights)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
    # a model defined in a Python file
    (tmp_path / "my_net.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))\n")
    with pytest.raises(ValueError, match="random weights.*--weights.*--random-weights"):
        load_model(f"{tmp_path / 'my_net.py'}:make")
    net = load_model(f"{tmp_path / 'my_net.py'}:make", random_weights=True)
    torch.save(net.state_dict(), tmp_path / "lin.pt")
    assert torch.equal(load_model(f"{tmp_path / 'my_net.py'}:make", weights=tmp_path / "lin.pt")[1].weight,
                       net[1].weight)


def test_module_factory_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:make")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_model("tiny_models:nope")
    with pytest.raises(FileNotFoundError, match="weights file .*missing.pt not found"):
        load_model("tiny_models:classifier", weights=tmp_path / "missing.pt")
    torch.save(classifier(dims=3).state_dict(), tmp_path / "w3.pt")
    with pytest.raises(ValueError, match="w3.pt: weights do not fit the model"):
        load_model("tiny_models:classifier", weights=tmp_path / "w3.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="bad.pt: not a readable PyTorch weights file"):
        load_model("tiny_models:classifier", weights=tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="'nothing_here' not found"):
        load_model("nothing_here")


def test_torchscript_loading(tmp_path):
    model = classifier(dims=3, seed=2).eval()
    x = torch.randn(2, 2, 6, 6, 6)
    torch.jit.save(torch.jit.trace(model, x), tmp_path / "scripted.pt")
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted2.ts")
    for name in ("scripted.pt", "scripted2.ts"):
        loaded = load_model(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))


def test_pickled_module_refused_without_flag(tmp_path):
    model = classifier(dims=2, seed=4).eval()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UnsafeModelFileError, match="arbitrary code.*allow_unsafe_pickle=True"):
        load_model(tmp_path / "whole.pt")
    loaded = load_model(tmp_path / "whole.pt", allow_unsafe_pickle=True)
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_state_dict_file_alone_asks_for_architecture(tmp_path):
    torch.save(classifier().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="holds only weights.*module:factory"):
        load_model(tmp_path / "weights.pt")


def test_corrupt_checkpoint_files_are_named(tmp_path):
    out = save_checkpoint(build_model("cnn2d"), {"task": "classify"}, tmp_path / "ckpt")
    (out / "model.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"model\.pt: not a readable PyTorch weights file"):
        load_model(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_model(out)
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json: no config\.json here"):
        load_model(out)
