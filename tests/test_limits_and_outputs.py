"""Inputs and options that cannot fit are refused up front; models with several outputs get a clear word."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import voxplain
from voxplain import SegmentationTarget
from voxplain.cli import main
from voxplain.engine import Engine, parse_memory
from tiny_models import classifier, segnet


class FullSizeWatch:
    """Records the spatial shapes of the real (non-meta) inputs a model is run on."""

    def __init__(self, model: nn.Module):
        self.shapes: list[tuple[int, ...]] = []
        model.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].device.type != "meta":
            self.shapes.append(tuple(args[0].shape[2:]))


# -- items 10 and 11: the memory budget -----------------------------------------------------------

def test_a_row_larger_than_the_budget_is_refused_before_the_model_runs_on_it():
    model = segnet(dims=3)
    watch = FullSizeWatch(model)
    x = torch.zeros(1, 2, 64, 64, 64)
    with pytest.raises(ValueError, match=r"needs about [0-9.]+ MB.*more than memory_budget=4.0 MB") as err:
        voxplain.explain(model, x, SegmentationTarget(0), ["vanilla_gradient"], memory_budget="4MB")
    assert "crop" in str(err.value)
    assert (64, 64, 64) not in watch.shapes, "the model ran at full size before the refusal"
    # the same with IG's many rows, and a budget that fits runs
    with pytest.raises(ValueError, match="memory_budget"):
        voxplain.explain(model, x, SegmentationTarget(0), ["integrated_gradients"], memory_budget="4MB")
    small = torch.zeros(1, 2, 8, 8, 8)
    assert voxplain.explain(model, small, SegmentationTarget(0), ["integrated_gradients"], memory_budget="64MB",
                            options={"integrated_gradients": {"steps": 4}})["integrated_gradients"].shape == small.shape


@pytest.mark.parametrize("budget", ["1KB", 1, "10B"])
def test_a_budget_below_one_rows_need_is_an_error_stating_the_need(budget):
    model, x = classifier(dims=2), torch.randn(1, 2, 16, 16)
    with pytest.raises(ValueError, match=r"one input row of shape \(2, 16, 16\) needs about [0-9.]+ (KB|MB)"):
        voxplain.explain(model, x, 0, ["vanilla_gradient"], memory_budget=budget)
    with Engine(model, memory_budget=budget) as engine, pytest.raises(ValueError, match="needs about"):
        engine.rows_per_pass((2, 16, 16))
    # the user's model is handed back as it came
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_without_a_budget_a_large_row_runs_alone_unless_the_machine_lacks_the_memory(monkeypatch):
    import voxplain.engine as engine_module

    model, x = segnet(dims=3), torch.zeros(1, 2, 24, 24, 24)
    monkeypatch.setattr(engine_module, "DEFAULT_MEMORY_BUDGET", 1024)
    with Engine(model) as engine:
        assert engine.rows_per_pass((2, 24, 24, 24)) == 1
    monkeypatch.setattr(engine_module, "available_bytes", lambda device: 2048)
    with pytest.raises(ValueError, match=r"more than the 2.0 KB free on cpu"):
        voxplain.explain(model, x, SegmentationTarget(0), ["vanilla_gradient"])


def test_memory_units_include_terabytes():
    assert parse_memory("1TB") == 1024**4
    assert parse_memory("0.5 tib") == 1024**4 // 2
    assert parse_memory("2T") == 2 * 1024**4


def test_an_empty_method_list_is_an_error():
    model, x = classifier(dims=2), torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="methods is empty.*available: .*vanilla_gradient"):
        voxplain.explain(model, x, 0, methods=[])
    with pytest.raises(ValueError, match="methods is empty"):
        voxplain.explain(model, x, 0, methods=())


# -- item 12: absurd options ---------------------------------------------------------------------

@pytest.mark.parametrize("method, options, message", [
    ("integrated_gradients", {"steps": 1_000_000_000}, "limit of 100000"),
    ("integrated_gradients", {"steps": 1_000_000_000, "rule": "gausslegendre"}, "limit of 100000"),
    ("integrated_gradients", {"steps": 5000, "rule": "gausslegendre"}, "at most 1024"),
    ("guided_ig", {"steps": 10**12}, "limit of 100000"),
    ("smoothgrad", {"samples": 10**9}, "limit of 100000"),
    ("smoothgrad_ig", {"base_options": {"steps": 10**9}}, "limit of 100000"),
    ("blur_ig", {"steps": 10**9}, "limit of 100000"),
    ("xrai", {"steps": 10**9}, "limit of 100000"),
])
def test_absurd_step_counts_are_refused_with_the_limit(method, options, message):
    with pytest.raises(ValueError, match=message):
        voxplain.explain(classifier(dims=2), torch.randn(1, 2, 8, 8), 0, [method], {method: options})


def test_cli_refuses_absurd_steps_in_one_line(tmp_path, capsys):
    (tmp_path / "net.py").write_text("import torch\ndef build():\n    return torch.nn.Sequential("
                                     "torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))\n")
    from PIL import Image
    import numpy as np

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    for rule in ("riemann_trapezoid", "gausslegendre"):
        code = main(["explain", "--model", f"{tmp_path / 'net.py'}:build", "--random-weights", "--input",
                     str(tmp_path / "x.png"),
                     "--methods", "integrated_gradients", "--option", "integrated_gradients.steps=1000000000",
                     "--option", f"integrated_gradients.rule={rule}", "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "limit of 100000" in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_turns_memory_errors_into_one_line(monkeypatch, capsys, tmp_path):
    import voxplain.cli.phantom as phantom_cli

    def exhausted(args):
        raise MemoryError()

    monkeypatch.setattr(phantom_cli, "run", exhausted)
    assert main(["phantom", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0]

    def cuda_exhausted(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore lines")

    monkeypatch.setattr(phantom_cli, "run", cuda_exhausted)
    assert main(["phantom", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0]


# -- item 15: models with several outputs -------------------------------------------------------

class TwoHeads(nn.Module):
    """Returns (logits, features) or {"logits": ..., "aux": ...}."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 3)
        self.as_dict = as_dict

    def forward(self, x):
        features = self.relu(self.conv(x))
        logits = self.head(features.mean(dim=(2, 3)))
        return {"logits": logits, "aux": features} if self.as_dict else (logits, features)


class LogitsOnly(nn.Module):
    def __init__(self, heads: TwoHeads):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        out = self.heads(x)
        return out["logits"] if isinstance(out, dict) else out[0]


def test_a_tuple_or_dict_output_gets_a_clear_message():
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"returned a tuple of 2 outputs \(\(1, 3\), \(1, 4, 8, 8\)\).*output_key"):
        voxplain.explain(TwoHeads(), x, 0, ["vanilla_gradient"])
    with pytest.raises(ValueError, match=r"returned a dict with keys 'logits', 'aux'.*output_key"):
        voxplain.explain(TwoHeads(as_dict=True), x, 0, ["vanilla_gradient"])
    with pytest.raises(ValueError, match=r"output_key=5 does not select an output.*indices 0..1"):
        voxplain.explain(TwoHeads(), x, 0, ["vanilla_gradient"], output_key=5)
    with pytest.raises(ValueError, match="returns a single tensor"):
        voxplain.explain(classifier(dims=2), x, 0, ["vanilla_gradient"], output_key=0)


@pytest.mark.parametrize("as_dict, key", [(False, 0), (True, "logits")])
def test_output_key_selects_the_output_to_explain(as_dict, key):
    torch.manual_seed(0)
    model, x = TwoHeads(as_dict), torch.randn(2, 2, 8, 8)
    methods = ["vanilla_gradient", "integrated_gradients", "gradcam", "guided_backprop"]
    options = {"integrated_gradients": {"steps": 8}}
    picked = voxplain.explain(model, x, 1, methods, options, output_key=key, memory_budget="64MB")
    plain = voxplain.explain(LogitsOnly(model), x, 1, methods, options)
    for m in methods:
        torch.testing.assert_close(picked[m], plain[m])


def test_cli_output_key(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    (tmp_path / "heads.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.conv = nn.Conv2d(1, 2, 3, padding=1)\n"
        "    def forward(self, x):\n        f = self.conv(x)\n        return {'logits': f.mean(dim=(2, 3)), 'f': f}\n"
        "def build():\n    return M()\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    args = ["explain", "--model", f"{tmp_path / 'heads.py'}:build", "--random-weights", "--input",
            str(tmp_path / "x.png"),
            "--methods", "vanilla_gradient", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output-key" in err[0] and "'logits'" in err[0]
    assert main([*args, "--output-key", "logits", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "report.html").is_file()
