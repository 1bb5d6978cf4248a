"""Localisation and complexity metrics: known answers, 2D/3D batches, degenerate input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxplain.evaluate.complexity import entropy, sparseness
from voxplain.evaluate.localisation import (localisation_metrics, pointing_game, region_localisation,
                                            relevance_mass, relevance_rank, roc_auc)


def _ball_masks(b, shape, radius, seed=0):
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    masks = []
    for _ in range(b):
        c = [float(torch.randint(radius, s - radius, (1,), generator=g)) for s in shape]
        d2 = sum((gr - ci) ** 2 for gr, ci in zip(grids, c))
        masks.append(d2 <= radius**2)
    return torch.stack(masks)


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_map_equal_to_mask_scores_perfectly(shape):
    mask = _ball_masks(3, shape, 4)
    amap = mask[:, None].float().expand(3, 2, *shape)  # two channels, both the mask
    m = localisation_metrics(amap, mask)
    np.testing.assert_allclose(m["pointing_game"], 1.0)
    np.testing.assert_allclose(m["relevance_mass"], 1.0)
    np.testing.assert_allclose(m["relevance_rank"], 1.0)
    np.testing.assert_allclose(m["roc_auc"], 1.0)


@pytest.mark.parametrize("shape", [(48, 48), (24, 24, 24)])
def test_random_map_scores_about_the_volume_fraction(shape):
    mask = _ball_masks(4, shape, 6, seed=1)
    frac = mask.flatten(1).float().mean(1).numpy()
    amap = torch.rand(4, 1, *shape, generator=torch.Generator().manual_seed(2))
    mass = relevance_mass(amap, mask)
    rank = relevance_rank(amap, mask)
    np.testing.assert_allclose(mass, frac, atol=0.02)
    np.testing.assert_allclose(rank, frac, atol=0.05)
    np.testing.assert_allclose(roc_auc(amap, mask), 0.5, atol=0.05)


def test_roc_auc_matches_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    amap = torch.randint(0, 5, (2, 1, 7, 6), generator=g).float()  # many ties
    mask = torch.rand(2, 7, 6, generator=g) > 0.6
    ours = roc_auc(amap, mask)
    for i in range(2):
        r = amap[i, 0].numpy().ravel()
        m = mask[i].numpy().ravel()
        pos, neg = r[m], r[~m]
        ref = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
        assert ours[i] == pytest.approx(ref)


def test_pointing_game_tolerance_and_channels():
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 5:8, 5:8] = True
    amap = torch.zeros(1, 2, 20, 20)
    amap[0, 1, 10, 7] = -3.0  # the strongest evidence is negative: |a| counts by default
    assert pointing_game(amap, mask)[0] == 0.0
    assert pointing_game(amap, mask, tolerance=3)[0] == 1.0
    assert pointing_game(amap, mask, tolerance=2.5)[0] == 0.0
    amap[0, 0, 6, 6] = 1.0
    assert pointing_game(amap, mask, reduce="positive")[0] == 1.0


def test_degenerate_inputs_have_documented_values():
    shape = (10, 10)
    mask = torch.zeros(2, *shape, dtype=torch.bool)
    mask[0, :5] = True  # half the image; sample 1 has an empty mask
    const = torch.full((2, 1, *shape), 3.0)
    m = localisation_metrics(const, mask)
    for name in ("pointing_game", "relevance_mass", "relevance_rank"):
        assert m[name][0] == pytest.approx(0.5), name
        assert np.isnan(m[name][1]), name
    assert m["roc_auc"][0] == 0.5 and np.isnan(m["roc_auc"][1])
    zero = torch.zeros(2, 1, *shape)
    assert relevance_mass(zero, mask)[0] == pytest.approx(0.5)
    full = torch.ones(1, *shape, dtype=torch.bool)
    assert relevance_mass(torch.rand(1, 1, *shape), full)[0] == pytest.approx(1.0)
    assert np.isnan(roc_auc(torch.rand(1, 1, *shape), full)[0])
    assert sparseness(zero)[0] == 0.0
    assert entropy(zero, normalise=True)[0] == pytest.approx(1.0)


def test_bad_shapes_raise_clear_errors():
    amap = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"mask must have shape .*\(2, 8, 8\)"):
        relevance_mass(amap, torch.ones(2, 8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="spatial"):
        relevance_mass(torch.rand(8, 8), torch.ones(8, 8))
    with pytest.raises(ValueError, match="NaN"):
        relevance_mass(torch.full((1, 1, 4, 4), float("nan")), torch.ones(4, 4))
    with pytest.raises(ValueError, match="reduce"):
        relevance_mass(amap, torch.ones(8, 8), reduce="max")
    with pytest.raises(ValueError, match="regions must have shape"):
        region_localisation(amap, torch.ones(2, 2, 8, 8))
    # a mask without batch axis broadcasts over the batch
    assert relevance_mass(amap, torch.ones(8, 8)).shape == (2,)


def test_region_localisation_per_brats_region():
    shape = (12, 12, 12)
    regions = torch.zeros(1, 3, *shape)
    regions[0, 2, 2:10, 2:10, 2:10] = 1  # WT
    regions[0, 1, 4:8, 4:8, 4:8] = 1  # TC
    # ET absent in this case
    amap = regions[:, 1:2].clone()
    out = region_localisation(amap, regions, tolerance=1)
    assert set(out) == {"ET", "TC", "WT"}
    assert np.isnan(out["ET"]["relevance_mass"][0])
    assert out["TC"]["relevance_mass"][0] == pytest.approx(1.0)
    assert out["WT"]["relevance_mass"][0] == pytest.approx(1.0)
    # 64 sure hits, then 448 of the 1664 tied zeros drawn at random, 448 of which lie in WT
    assert out["WT"]["relevance_rank"][0] == pytest.approx((64 + 448 * 448 / 1664) / 512)


def test_complexity_orders_sparse_above_diffuse():
    shape = (16, 16, 16)
    diffuse = torch.ones(1, 1, *shape) + 0.01 * torch.rand(1, 1, *shape)
    sparse = torch.zeros(1, 1, *shape)
    sparse[0, 0, 3, 3, 3] = 1.0
    assert sparseness(sparse)[0] > 0.99 and sparseness(diffuse)[0] < 0.01
    assert entropy(sparse)[0] == pytest.approx(0.0)
    assert entropy(diffuse, normalise=True)[0] > 0.99
    # Gini of a known vector: [0, 0, 0, 1] -> 0.75
    v = torch.tensor([0.0, 0.0, 0.0, 1.0]).reshape(1, 1, 4)
    assert sparseness(v)[0] == pytest.approx(0.75)
