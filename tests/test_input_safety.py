"""Inputs read right or refused clearly: 16-bit images, case grids, case names, report names, bad headers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from voxplain.cli import main
from voxplain.models import build_model, save_checkpoint

MODALITIES = ("t1", "t1ce", "t2", "flair")
SHAPE = (12, 14, 10)


def write_case(root: Path, name: str, affines: dict[str, np.ndarray] | None = None, seed: int = 0,
               flipped: tuple[str, ...] = (), nan: bool = False) -> Path:
    """A BraTS-layout case; ``affines`` per modality (default RAS 1 mm); ``flipped`` modalities are
    stored in LPS (data and affine flipped together, so they stay on the same grid); ``nan`` puts
    a NaN into t2."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    for m in MODALITIES:
        data = rng.normal(100, 10, SHAPE).astype(np.float32)
        if nan and m == "t2":
            data[3, 3, 3] = np.nan
        affine = (affines or {}).get(m, np.eye(4))
        if m in flipped:
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:3, 3] = [SHAPE[0] - 1, SHAPE[1] - 1, 0]
            data, affine = data[::-1, ::-1].copy(), affine @ flip
        nib.save(nib.Nifti1Image(data, affine), folder / f"{name}_{m}.nii.gz")
    return folder


# -- item 7: 16-bit images --------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_images_are_read_at_full_depth(tmp_path, suffix):
    from voxplain.data.images import load_image
    from voxplain.report.inputs import load_cases

    values = (np.arange(40 * 30).reshape(40, 30) * 50).astype(np.uint16)  # 0 .. 59950
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    expected = values.astype(np.float32) / 65535
    for image in (load_cases([path])[0].image, load_image(path), load_image(path, channels=1)):
        assert image.shape == (1, 40, 30) and image.dtype == np.float32
        np.testing.assert_allclose(image[0], expected, atol=1e-6)
        assert len(np.unique(image)) == values.size  # no two grey levels merged (8-bit would keep 256)
    rgb = load_image(path, channels=3)
    assert rgb.shape == (3, 40, 30)
    np.testing.assert_allclose(rgb[1], expected, atol=1e-6)
    # an 8-bit image of the same picture reads the same, to 8-bit precision
    eight = tmp_path / f"eight{suffix}"
    Image.fromarray((values // 257).astype(np.uint8)).save(eight)
    np.testing.assert_allclose(load_cases([eight])[0].image[0], expected, atol=1 / 255)


# -- item 8: modalities of one case on different grids ---------------------------------------------

def test_a_case_folder_with_modalities_on_different_grids_is_refused(tmp_path):
    from voxplain.data.brats import load_brats_case
    from voxplain.report.inputs import load_cases

    shifted = np.eye(4)
    shifted[:3, 3] = [5.0, 0, 0]  # flair 5 mm off
    folder = write_case(tmp_path, "OFF", {"flair": shifted})
    in_order = [folder / f"OFF_{m}.nii.gz" for m in MODALITIES]
    for load in (lambda: load_brats_case(folder), lambda: load_cases([folder]), lambda: load_cases(in_order)):
        with pytest.raises(ValueError, match=r"OFF_flair.nii.gz is not on the same grid as OFF_t1.nii.gz"):
            load()
    # a modality stored in another orientation but on the same grid is fine, as separate files too
    same = write_case(tmp_path, "LPS", flipped=("flair",))
    case = load_brats_case(same)
    direct = load_cases([same / f"LPS_{m}.nii.gz" for m in MODALITIES])[0]
    np.testing.assert_array_equal(case.image, direct.image)
    within = np.eye(4)
    within[:3, 3] = [5e-4, 0, 0]  # float rounding in a header: within the documented tolerance
    load_brats_case(write_case(tmp_path, "ROUND", {"flair": within}))


def test_singular_affine_names_the_file(tmp_path):
    from voxplain.data.nifti import load_nifti

    img = nib.Nifti1Image(np.ones(SHAPE, np.float32), None)
    img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # a header whose second axis has no extent
    img.header.set_qform(None, code=0)
    path = tmp_path / "flat.nii.gz"
    nib.save(img, path)
    with pytest.raises(ValueError, match=r"flat.nii.gz.*affine.*singular"):
        load_nifti(path)


# -- item 9: case names that slug to the same folder -----------------------------------------------

def test_cases_whose_names_collide_get_their_own_folders_and_rows(tmp_path, capsys):
    data = tmp_path / "cases"
    write_case(data, "Case 1")
    write_case(data, "case_1", seed=1)
    write_case(data, "CASE-2", seed=2)
    torch.manual_seed(0)
    save_checkpoint(build_model("classifier3d", in_channels=4, num_classes=2, blocks=1, base_width=2),
                    {"task": "classify"}, tmp_path / "model")
    out = tmp_path / "out"
    assert main(["explain", "--model", str(tmp_path / "model"), "--input", str(data), "--methods",
                 "vanilla_gradient", "--quiet", "--out", str(out)]) == 0
    links = re.findall(r'href="([^"]+)"', (out / "index.html").read_text())
    assert len(links) == 3 and len(set(links)) == 3
    names = {json.loads((out / link.replace("report.html", "summary.json")).read_text())["studies"][0]["name"]
             for link in links}
    assert names == {"Case 1", "case_1", "CASE-2"}


def test_unique_slugs():
    from voxplain.report.writer import unique_slugs

    assert unique_slugs(["Case 1", "case_1", "case_1-2", "CASE_1", "x"]) == [
        "case_1", "case_1-2", "case_1-2-2", "case_1-3", "x"]


# -- item 13: names that would end the page's script -----------------------------------------------

HOSTILE = ["<!--<script>", "</script><script>alert(1)</script>", "a\u2028b & <b>c</b>"]


def test_embedded_json_has_no_angle_brackets_and_reads_back(tmp_path):
    from voxplain.report import Study, write_report

    rng = np.random.default_rng(0)
    studies = [Study(name, rng.random((1, 10, 12)), ["grey"], {f"class {name}": {"m1": rng.random((1, 10, 12)),
                                                                                "m2": rng.random((1, 10, 12))}})
               for name in HOSTILE]
    write_report(tmp_path, studies, settings={"note": "<!-- -->"})
    page = (tmp_path / "report.html").read_text()
    start = page.index('<script type="application/json" id="voxplain-data">') + len(
        '<script type="application/json" id="voxplain-data">')
    body = page[start:page.index("</script>", start)]
    assert "<" not in body and ">" not in body
    data = json.loads(body)
    assert [s["name"] for s in data["studies"]] == HOSTILE


@pytest.mark.slow
def test_hostile_names_in_the_real_browser(tmp_path):
    from test_report_browser import check_report_in_browser

    from voxplain.report import Study, write_report

    rng = np.random.default_rng(0)
    shape = (10, 12, 8)
    studies = [Study(name, rng.random((1, *shape)), ["t1"], {"<!--<script>": {"a": rng.random((1, *shape)),
                                                                              "b": rng.random((1, *shape))}})
               for name in HOSTILE[:2]]
    write_report(tmp_path, studies)
    seen = check_report_in_browser(tmp_path / "report.html")  # loads, redraws, no console errors
    assert seen["studies"] == 2


# -- item 15: messages --------------------------------------------------------------------------------

def test_weights_outside_the_checkpoint_folder_are_refused(tmp_path):
    from voxplain.models import load_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model("cnn2d", in_channels=1, num_classes=2, blocks=1, base_width=2),
                           {"task": "classify"}, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    for bad in ("../../../../etc/passwd", "/etc/passwd", "sub/../../x.pt"):
        (ckpt / "config.json").write_text(json.dumps({**config, "weights": bad}))
        with pytest.raises(ValueError, match=r"'weights' must name a file inside the checkpoint folder"):
            load_model(ckpt)


def test_inspect_without_conv_layers_says_how_to_name_one(tmp_path, capsys):
    (tmp_path / "mlp.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.scale = nn.BatchNorm2d(1).eval()\n"
        "        self.fc = nn.Linear(64, 2)\n"
        "    def forward(self, x):\n        return self.fc(self.scale(x).flatten(1))\n"
        "def build():\n    return M()\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    args = ["inspect", "--model", f"{tmp_path / 'mlp.py'}:build", "--random-weights", "--input",
            str(tmp_path / "x.png"), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layer NAME" in err[0] and "`layers" in err[0]
    assert main([*args, "--layer", "scale", "--out", str(tmp_path / "b")]) == 0


# -- item 6 and issue 11 item 4: what --help says, shipped models by name --------------------------

def test_help_says_torchscript_and_bundles_carry_code(capsys):
    for command in ("explain", "inspect", "evaluate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "TorchScript" in text and "carr" in text and "code" in text, command
        assert all(name in text for name in ("demo-unet", "demo-grade", "demo-slices")), command
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert re.search(r"TorchScript[^.]*(carr|contain)[^.]*code", readme)
    assert re.search(r"MONAI bundle[^.]*code", readme)


def test_pickle_refusal_no_longer_calls_torchscript_safer(tmp_path):
    from voxplain.models.checkpoint import UnsafeModelFileError, load_model

    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    with pytest.raises(UnsafeModelFileError) as err:
        load_model(tmp_path / "whole.pt")
    message = str(err.value)
    assert "TorchScript" not in message and "module:factory" in message and "weights_only" in message


def test_shipped_models_by_name_and_a_local_folder_wins(tmp_path, monkeypatch):
    from voxplain.models.checkpoint import load_model, read_checkpoint_config, resolve_model_spec
    from voxplain.report.pipeline import load_model_spec

    monkeypatch.chdir(tmp_path)
    for name in ("demo-unet", "demo-grade", "demo-slices"):
        path = resolve_model_spec(name)
        assert Path(path).is_dir() and "assets" in Path(path).parts
        assert read_checkpoint_config(path)["model"]
        assert load_model_spec(name).config == read_checkpoint_config(path)
    torch.manual_seed(0)
    save_checkpoint(build_model("cnn2d", in_channels=1, num_classes=2, blocks=1, base_width=2),
                    {"task": "classify", "class_names": ["mine", "also mine"]}, tmp_path / "demo-grade")
    assert resolve_model_spec("demo-grade") == "demo-grade"
    assert load_model_spec("demo-grade").config["class_names"] == ["mine", "also mine"]
    assert isinstance(load_model("demo-unet"), torch.nn.Module)


def test_readme_examples_use_the_shipped_names():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("voxplain explain")
                or line.startswith("voxplain inspect")]
    with_models = [c for c in commands if "--model demo-" in c]
    assert with_models and not any("--model runs/" in c for c in commands)
