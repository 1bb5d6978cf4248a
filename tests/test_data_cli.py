"""`voxplain phantom` end to end, and the phantom read back through the loaders and datasets."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from voxplain.cli import main
from voxplain.data.brats import find_brats_cases, load_brats_case
from voxplain.data.datasets import BratsCohortDataset
from voxplain.data.template import load_template


def test_phantom_cli_writes_a_loadable_cohort(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["phantom", "--out", str(out), "--subjects", "2", "--seed", "5", "--resolution", "3",
                 "--grades", "HGG:1,LGG:1", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    cases = find_brats_cases(out)
    assert [c.name for c in cases] == ["PHANTOM_001", "PHANTOM_002"]
    with open(out / "subjects.csv", newline="") as f:
        grades = sorted(r["grade"] for r in csv.DictReader(f))
    assert grades == ["HGG", "LGG"]
    case = load_brats_case(cases[0], require_seg=True)
    tpl = load_template(3)
    assert case.image.shape == (4,) + tpl.shape
    np.testing.assert_allclose(case.meta.affine, tpl.affine)
    assert case.meta.axcodes == ("R", "A", "S")
    # the default crop at 3 mm keeps the whole tumour and brain
    ds = BratsCohortDataset(out, task="segment")
    for i in range(len(ds)):
        x, y = ds[i]
        assert tuple(x.shape) == (4, 64, 80, 64)
        full = load_brats_case(cases[i], require_seg=True)
        assert int(y[1].sum()) == int((full.seg > 0).sum())
        assert int((x != 0).any(0).sum()) == int((full.image != 0).any(0).sum())
        assert torch.isfinite(x).all()


def test_phantom_cli_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path / "c"), "--grades", "GBM:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grades" in err
    assert main(["phantom", "--out", str(tmp_path / "c"), "--healthy-fraction", "1.5"]) == 2
    assert "healthy_fraction" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit):
        main(["phantom", "--out", str(tmp_path / "c"), "--resolution", "4"])
