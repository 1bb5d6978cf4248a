"""Deletion / insertion curves: oracle ordering on a linear model, batching, baselines, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tiny_models as tm
from voxplain.evaluate.faithfulness import deletion, insertion, perturbation_curves
from voxplain.targets import ClassTarget


def _positive_linear(shape=(2, 6, 6)):
    model = tm.linear(shape, classes=3)
    with torch.no_grad():
        model[1].weight.abs_()
        model[1].bias.zero_()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, *shape, generator=g) + 0.1
    return model, x


def test_oracle_deletion_of_linear_model_is_monotone_and_steepest():
    model, x = _positive_linear()
    w = model[1].weight[1].detach().reshape(1, *x.shape[1:])
    oracle = (w * x).sum(dim=1, keepdim=True)  # each voxel's exact contribution to class 1
    curves = deletion(model, x, oracle, target=1, steps=12)
    assert curves.scores.shape == (3, 13)
    assert np.all(np.diff(curves.scores, axis=1) <= 1e-5)  # monotone non-increasing
    # removing the biggest contributions first: each step removes less than the one before
    assert np.all(np.diff(curves.scores, n=2, axis=1) >= -1e-5)
    np.testing.assert_allclose(curves.scores[:, -1], 0.0, atol=1e-5)  # everything removed -> bias
    with torch.no_grad():
        np.testing.assert_allclose(curves.scores[:, 0], model(x)[:, 1].numpy(), rtol=1e-5)
    rand = deletion(model, x, torch.rand(3, 1, 6, 6), target=1, steps=12)
    reverse = deletion(model, x, -oracle, target=1, steps=12, reduce="signed")
    assert np.all(curves.auc < rand.auc) and np.all(rand.auc < reverse.auc)
    ins = insertion(model, x, oracle, target=1, steps=12)
    assert np.all(np.diff(ins.scores, axis=1) >= -1e-5)
    assert np.all(ins.auc > insertion(model, x, -oracle, target=1, steps=12, reduce="signed").auc)


@pytest.mark.parametrize("dims,shape", [(1, (32,)), (2, (16, 16)), (3, (16, 16, 16))])
def test_batched_curves_in_any_dims_and_model_restored(dims, shape):
    model = tm.classifier(dims)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 2, *shape, generator=torch.Generator().manual_seed(dims))
    amap = torch.randn(2, 1, *shape)
    target = ClassTarget(None, output="probability")
    a = perturbation_curves(model, x, amap, target, mode="deletion", steps=5, baseline="blur",
                            blur_sigma=2.0, batch_size=4)
    b = perturbation_curves(model, x, amap, target, mode="deletion", steps=5, baseline="blur", blur_sigma=2.0)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)  # chunking does not change the result
    # each sample alone gives the same curve as in the batch
    one = perturbation_curves(model, x[1:], amap[1:], target, mode="deletion", steps=5, baseline="blur",
                              blur_sigma=2.0)
    np.testing.assert_allclose(one.scores[0], a.scores[1], atol=1e-6)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for baseline in ("zero", "mean", 0.5, torch.zeros(1, 2, *shape)):
        c = insertion(model, x, amap, target, steps=3, baseline=baseline)
        assert np.isfinite(c.auc).all()


def test_constant_map_is_reproducible_random_order():
    model, x = _positive_linear()
    const = torch.ones(3, 1, 6, 6)
    a = deletion(model, x, const, target=0, steps=6, seed=1)
    b = deletion(model, x, const, target=0, steps=6, seed=1)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_faithfulness_bad_input():
    model, x = _positive_linear()
    with pytest.raises(ValueError, match="does not match the input"):
        deletion(model, x, torch.rand(3, 1, 5, 6), target=0)
    with pytest.raises(ValueError, match="mode"):
        perturbation_curves(model, x, torch.rand(3, 1, 6, 6), mode="erase")
    with pytest.raises(ValueError, match="steps"):
        deletion(model, x, torch.rand(3, 1, 6, 6), steps=0)
    with pytest.raises(ValueError, match="baseline"):
        deletion(model, x, torch.rand(3, 1, 6, 6), baseline="noise")
    with pytest.raises(ValueError, match="broadcast"):
        deletion(model, x, torch.rand(3, 1, 6, 6), baseline=torch.zeros(5, 5))
