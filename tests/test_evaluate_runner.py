"""Features, shortcut share, the cohort runner, the output folder and `voxplain evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_models as tm
from voxplain.evaluate.features import feature_errors, mask_features, threshold_map
from voxplain.evaluate.output import write_evaluation
from voxplain.evaluate.runner import EvalCase, evaluate_cases
from voxplain.evaluate.shortcut import cohort_marker, marker_mask, marker_share


def test_features_of_a_map_equal_to_a_ball():
    shape = (20, 20, 20)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    ball = (zz - 8) ** 2 + (yy - 10) ** 2 + (xx - 12) ** 2 <= 16
    amap = torch.from_numpy(ball.astype(np.float32))[None, None] * 5 + 0.01 * torch.rand(1, 1, *shape)
    assert feature_errors(amap, ball[None])["dice"][0] > 0.95  # Otsu: a few background voxels join
    fe = feature_errors(amap, ball[None], spacing=(2.0, 2.0, 2.0), method="fraction", value=0.5)
    assert fe["dice"][0] == pytest.approx(1.0)
    assert fe["volume_error"][0] == pytest.approx(0.0)
    assert fe["centroid_distance"][0] == pytest.approx(0.0, abs=1e-9)
    assert fe["volume_true"][0] == pytest.approx(ball.sum() * 8 / 1000)  # ml
    f = mask_features(ball[None])
    np.testing.assert_allclose(f["centroid"][0], [8, 10, 12])
    for method, value in (("fraction", 0.5), ("percentile", 90)):
        assert threshold_map(amap, method, value).shape == (1, *shape)


def test_features_degenerate_values():
    truth = np.zeros((2, 10, 10), bool)
    truth[0, 2:5, 2:5] = True  # sample 1: empty truth
    const = torch.ones(2, 1, 10, 10)
    fe = feature_errors(const, truth)
    assert fe["volume_pred"][0] == 0 and fe["dice"][0] == 0.0 and np.isnan(fe["centroid_distance"][0])
    assert np.isnan(fe["volume_error"][1]) and np.isnan(fe["dice"][1])
    with pytest.raises(ValueError, match="threshold method"):
        threshold_map(const, "mean")
    with pytest.raises(ValueError, match="true mask must have shape"):
        feature_errors(const, np.zeros((2, 9, 10), bool))


def test_marker_share_and_mask():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -10
    m = marker_mask((12, 12, 12), affine, (0.0, 0.0, 0.0), 2.5)
    assert m[5, 5, 5] and m.sum() == 7  # the centre voxel and its 6 face neighbours at 2 mm
    amap = torch.zeros(1, 1, 12, 12, 12)
    amap[0, 0][m] = 1.0
    share = marker_share(amap, m)
    assert share["share"][0] == pytest.approx(1.0)
    assert share["enrichment"][0] == pytest.approx(12**3 / 7)
    zero = marker_share(torch.zeros(1, 1, 12, 12, 12), m)
    assert zero["enrichment"][0] == pytest.approx(1.0)
    assert np.isnan(marker_share(amap, np.zeros((12, 12, 12), bool))["share"][0])


def test_cohort_marker_reads_cohort_json(tmp_path):
    assert cohort_marker(tmp_path) is None
    (tmp_path / "cohort.json").write_text(json.dumps({"shortcut": [0.8, 0.1], "shortcut_mm": [40, -70, 30],
                                                      "shortcut_radius_mm": 5.0}))
    assert cohort_marker(tmp_path) == ((40.0, -70.0, 30.0), 5.0)
    (tmp_path / "cohort.json").write_text(json.dumps({"shortcut": [0.0, 0.0]}))
    assert cohort_marker(tmp_path) is None


@pytest.fixture(scope="module")
def result_3d():
    model = tm.classifier(3, in_channels=2, classes=2)
    g = torch.Generator().manual_seed(0)
    cases = []
    for i in range(2):
        regions = torch.zeros(3, 12, 12, 12)
        regions[1, 3:9, 3:9, 3:9] = 1
        regions[0, 4:7, 4:7, 4:7] = 1
        marker = np.zeros((12, 12, 12), bool)
        marker[10:, 10:, 10:] = True
        cases.append(EvalCase(f"c{i}", torch.randn(2, 12, 12, 12, generator=g), None, regions,
                              ("TC", "WT", "ET"), marker if i == 1 else None, (2.0, 2.0, 2.0)))
    return evaluate_cases(model, cases, ["vanilla_gradient", "gradcam"], steps=4,
                          pic_thresholds=[0.05, 0.2, 0.5], batch_size=8)


def test_runner_collects_every_family(result_3d):
    res = result_3d
    assert res.cases == ["c0", "c1"]
    s = res.summary()
    for m in ("vanilla_gradient", "gradcam"):
        for k in ("deletion_auc", "insertion_auc", "sic_auc", "aic_auc", "WT_relevance_mass", "TC_roc_auc",
                  "ET_pointing_game", "dice", "sparseness", "entropy", "marker_share",
                  "randomisation_spearman_abs", "random_logit_ssim"):
            assert k in s[m], k
            assert len(res.per_case[m][k]) == 2, k
        # ET is empty in both cases, the marker and the randomisation concern one case only
        assert np.isnan(s[m]["ET_pointing_game"]) and res.counts()[m]["ET_pointing_game"] == 0
        assert np.isnan(res.per_case[m]["marker_share"][0]) and np.isfinite(res.per_case[m]["marker_share"][1])
        assert res.counts()[m]["randomisation_ssim"] == 1
    assert set(res.curves["gradcam"]) >= {"deletion", "insertion", "sic"}


def test_write_evaluation_folder(result_3d, tmp_path):
    out = write_evaluation(result_3d, tmp_path / "eval")
    names = {p.name for p in out.iterdir()}
    assert {"metrics.json", "metrics_per_case.json", "metrics.csv", "metrics_per_case.csv", "curves.json",
            "curves.png", "randomisation.json", "randomisation.png", "report.html"} <= names
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"vanilla_gradient", "gradcam"}
    assert metrics["gradcam"]["ET_pointing_game"] is None  # NaN -> null
    per_case = json.loads((out / "metrics_per_case.json").read_text())
    assert per_case["cases"] == ["c0", "c1"]
    html = (out / "report.html").read_text()
    assert "<table" in html and "data:image/png;base64," in html and "http" not in html.split("<body>")[1]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "method" and "WT_relevance_mass" in header


def test_runner_rejects_unknown_family():
    with pytest.raises(ValueError, match="famil"):
        evaluate_cases(tm.classifier(2), [], ["vanilla_gradient"], families=["speed"])


def test_cli_evaluate_errors(tmp_path, capsys):
    from voxplain.cli import main

    assert main(["evaluate", "--out", str(tmp_path / "o")]) == 2
    assert "--model and --data" in capsys.readouterr().err
    assert main(["evaluate", "--demo", "--out", str(tmp_path / "o"), "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["evaluate", "--demo", "--out", str(tmp_path / "o"), "--metrics", "speed"]) == 2
    assert main(["evaluate", "--demo", "--out", str(tmp_path / "o"), "--option", "bad"]) == 2
    assert not (tmp_path / "o").exists()


def test_cli_evaluate_on_a_checkpoint_and_image_folder(tmp_path):
    """A module:factory model on a tiny image folder: no masks, so no localisation columns."""
    from PIL import Image

    from voxplain.cli import main

    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            arr = (np.random.default_rng(i).random((16, 16)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "factory.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),"
        " nn.Flatten(), nn.Linear(4, 2))\n")
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", f"{tmp_path / 'factory.py'}:make", "--random-weights", "--data",
               str(tmp_path / "imgs"),
               "--size", "16,16", "--out", str(out), "--methods", "vanilla_gradient,gradcam", "--steps", "3",
               "--cases", "2", "--randomisation-cases", "0", "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "deletion_auc" in metrics["gradcam"] and not any(k.startswith("WT_") for k in metrics["gradcam"])
