"""TorchScript models: hook-free methods work and agree with the eager model; hook methods fail clearly."""

from __future__ import annotations

import pytest
import torch

from tiny_models import classifier
from voxplain import explain
from voxplain.cli import main

HOOK_FREE = ["vanilla_gradient", "gradient_x_input", "integrated_gradients", "smoothgrad", "occlusion"]
OPTIONS = {"integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 3}, "occlusion": {"window": 4}}


def _pair():
    eager = classifier(dims=2, seed=3).eval()
    return eager, torch.jit.script(eager)


def test_hook_free_methods_match_the_eager_model():
    eager, scripted = _pair()
    x = torch.randn(2, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    ours = explain(scripted, x, 1, methods=HOOK_FREE, options=OPTIONS)
    ref = explain(eager, x, 1, methods=HOOK_FREE, options=OPTIONS)
    for name in HOOK_FREE:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["gradcam", "guided_backprop", "guided_gradcam"])
def test_hook_methods_say_why_they_cannot_run(method):
    _, scripted = _pair()
    with pytest.raises(ValueError, match="TorchScript"):
        explain(scripted, torch.randn(1, 2, 12, 12), 0, methods=[method])
    assert all(not m._forward_hooks for m in scripted.modules())


def test_cli_explains_a_torchscript_file(tmp_path, capsys):
    from PIL import Image
    import numpy as np

    eager = classifier(dims=2, in_channels=1, classes=2, seed=1).eval()
    path = tmp_path / "slice_cnn.ts"
    torch.jit.script(eager).save(str(path))
    image = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "out"
    code = main(["explain", "--model", str(path), "--input", str(image), "--methods",
                 "vanilla_gradient,integrated_gradients", "--option", "integrated_gradients.steps=4",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (out / "report.html").is_file() and (out / "summary.json").is_file()
    code = main(["explain", "--model", str(path), "--input", str(image), "--methods", "gradcam",
                 "--out", str(tmp_path / "out2"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "TorchScript" in err[0]
    assert not (tmp_path / "out2").exists()
