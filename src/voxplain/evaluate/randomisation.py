"""Do the maps depend on the model at all? Randomisation sanity checks (Adebayo et al. 2018).

* :func:`cascading_randomisation`: on a deep copy of the model, re-initialise the
  parameterised layers one after another from the output down (cumulatively) and
  after each step recompute every method's map; compare it with the map of the
  trained model. A method that passes the check produces maps that become
  *dissimilar* as the model is destroyed.
* :func:`random_logit`: explain a randomly chosen other class instead of the
  explained one; a class-sensitive method gives a dissimilar map.

Similarity (:func:`map_similarity`, per sample): Spearman rank correlation of
the absolute maps (``spearman_abs``) and of the signed maps
(``spearman_signed``), over all channels and voxels, and SSIM
(``skimage.metrics.structural_similarity``, N-D) of the per-voxel absolute
relevance (channels summed) scaled by its 99th percentile and clipped to [0, 1]
(data range 1; window 7 voxels, or the largest odd size that fits).

Degenerate input: Spearman correlation is NaN when either map is constant
(rank correlation is undefined); SSIM of two all-zero maps is 1.

Re-initialisation uses each module's own ``reset_parameters`` (PyTorch's
default initialisers; for normalisation layers also their running statistics)
under a seeded RNG, and a N(0, 0.02) draw for modules without one. The user's
model is never touched. The explained class is fixed to the trained model's
choice (for ``ClassTarget(None)`` the predicted class is resolved first), so the
randomised models explain the same class. Method options naming layers must be
strings (module names), which stay valid on the copy.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from ..engine import Engine
from ..explain import explain
from ..run import check_input, open_run
from ..targets import ClassTarget, Target, as_target
from ._checks import as_map, voxel_relevance

__all__ = ["map_similarity", "cascading_randomisation", "random_logit", "CascadingResult",
           "randomisable_layers", "SIMILARITIES"]

SIMILARITIES = ("spearman_abs", "spearman_signed", "ssim")
_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    def scale(r):
        top = np.percentile(r, 99)
        if top <= 0:
            top = r.max()
        return np.clip(r / top, 0.0, 1.0) if top > 0 else np.zeros_like(r)

    a, b = scale(a), scale(b)
    win = min(7, min(a.shape))
    win = win if win % 2 else win - 1
    if win < 3:
        raise ValueError(f"SSIM needs at least 3 voxels along every axis, got a map of spatial shape {a.shape}")
    return float(structural_similarity(a, b, data_range=1.0, win_size=win))


def map_similarity(reference, other) -> dict[str, np.ndarray]:
    """Per-sample similarity of two maps of the same shape (B, C, *spatial): ``{name: (B,)}``."""
    a, b = as_map(reference, "reference map"), as_map(other, "compared map")
    if a.shape != b.shape:
        raise ValueError(f"maps to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = voxel_relevance(a, "abs").double().numpy(), voxel_relevance(b, "abs").double().numpy()
    an, bn = a.double().numpy().reshape(a.shape[0], -1), b.double().numpy().reshape(b.shape[0], -1)
    out = {k: np.empty(a.shape[0]) for k in SIMILARITIES}
    for i in range(a.shape[0]):
        out["spearman_abs"][i] = _spearman(np.abs(an[i]), np.abs(bn[i]))
        out["spearman_signed"][i] = _spearman(an[i], bn[i])
        out["ssim"][i] = _ssim(ra[i], rb[i])
    return out


def randomisable_layers(model: nn.Module, x: Tensor, include_norm: bool = True,
                        sliding_window=None) -> list[tuple[str, nn.Module]]:
    """Modules with their own parameters, in the order they run on ``x`` (first run counts; on one window
    under ``sliding_window``)."""
    from ..sliding_window import as_sliding_window

    with Engine(model, sliding_window=as_sliding_window(sliding_window)) as engine:
        trace = engine.trace(x.to(engine.device))
    seen, out = set(), []
    for info in trace:
        m = info.module
        if id(m) in seen or not any(True for _ in m.parameters(recurse=False)):
            continue
        if not include_norm and isinstance(m, _NORM):
            continue
        seen.add(id(m))
        out.append((info.name, m))
    return out


def _reinitialise(module: nn.Module, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            if hasattr(module, "reset_parameters"):
                # initialise on the CPU so that the draws do not depend on the device
                device = next(module.parameters()).device
                module.to("cpu")
                module.reset_parameters()
                if isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
                    # PyTorch resets norm layers to the identity; draw them like Adebayo et al.
                    module.weight.normal_(1.0, 0.5)
                    module.bias.normal_(0.0, 0.5)
                module.to(device)
            else:
                for p in module.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape) * 0.02)


def _fixed_target(model: nn.Module, x: Tensor, target, device, batch_size, memory_budget,
                  sliding_window=None) -> Target:
    tgt = as_target(target)
    if isinstance(tgt, ClassTarget) and tgt.index is None:
        with open_run(model, x, tgt, device=device, batch_size=batch_size, memory_budget=memory_budget,
                      sliding_window=sliding_window) as run:
            classes = run.target.classes.clone()
        return ClassTarget(classes, output=tgt.output, activation=tgt.activation)
    return tgt


@dataclass
class CascadingResult:
    """Similarity to the trained model's map after each cumulative randomisation step.

    ``stages[0]`` is ``"original"``; ``stages[k]`` names the k-th layer randomised (top down).
    ``similarity[method][measure]`` has shape (len(stages), B).
    """

    stages: list[str]
    similarity: dict[str, dict[str, np.ndarray]]
    maps: dict[str, list[Tensor]] = field(default_factory=dict)  # per method, per stage (if kept)

    def as_dict(self) -> dict:
        """JSON-friendly form (without maps)."""
        return {"stages": self.stages,
                "similarity": {m: {k: v.tolist() for k, v in d.items()} for m, d in self.similarity.items()}}


def cascading_randomisation(model: nn.Module, x, methods: Sequence[str], target=None,
                            options: Mapping[str, Mapping[str, Any]] | None = None,
                            layers: Sequence[str] | None = None, include_norm: bool = True,
                            seed: int = 0, keep_maps: bool = False, device=None,
                            batch_size: int | None = None, memory_budget=None,
                            progress: bool = False, sliding_window=None) -> CascadingResult:
    """Cascading model-parameter randomisation from the top layer down.

    Args:
        methods: registry names of the methods to check.
        layers: module names to randomise, top first; default every module with
            parameters, from the last one run to the first.
        include_norm: also randomise normalisation layers (when ``layers`` is not given).
        seed: seeds the re-initialisation and random methods.
        keep_maps: also return every map (memory: methods x layers x input size).
        sliding_window: apply the model by sliding windows (as :func:`voxplain.explain`).
    """
    x = check_input(x)
    methods = list(methods)
    target = _fixed_target(model, x, target, device, batch_size, memory_budget, sliding_window)
    kw = dict(options=options, device=device, batch_size=batch_size, memory_budget=memory_budget, seed=seed,
              sliding_window=sliding_window)
    original = explain(model, x, target, methods, **kw)
    work = copy.deepcopy(model)
    named = dict(work.named_modules())
    if layers is None:
        order = [name for name, _ in randomisable_layers(work, x, include_norm, sliding_window)][::-1]
    else:
        order = list(layers)
        missing = [n for n in order if n not in named]
        if missing:
            raise ValueError(f"layer(s) {missing} not found in the model; names are those of named_modules(), "
                             f"e.g. {[n for n, m in work.named_modules() if n][:8]}")
    stages = ["original"] + order
    sims = {m: {k: np.empty((len(stages), x.shape[0])) for k in SIMILARITIES} for m in methods}
    maps: dict[str, list[Tensor]] = {m: [original[m]] for m in methods} if keep_maps else {}
    for m in methods:
        for k, v in map_similarity(original[m], original[m]).items():
            sims[m][k][0] = v
    bar = Engine(model, progress=progress).progress_bar(len(order), "cascading randomisation")
    for step, name in enumerate(order, start=1):
        _reinitialise(named[name], seed * 1009 + step)
        current = explain(work, x, target, methods, **kw)
        for m in methods:
            for k, v in map_similarity(original[m], current[m]).items():
                sims[m][k][step] = v
            if keep_maps:
                maps[m].append(current[m])
        bar.update(1)
    bar.close()
    return CascadingResult(stages, sims, maps)


def random_logit(model: nn.Module, x, methods: Sequence[str], target=None,
                 options: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0, device=None,
                 batch_size: int | None = None, memory_budget=None,
                 sliding_window=None) -> dict[str, dict[str, np.ndarray]]:
    """Similarity between the map of the explained class and of a random other class, per method.

    Needs a classification model with at least two classes; returns
    ``{method: {measure: (B,)}}``. The other class is drawn per sample from a seeded RNG.
    """
    x = check_input(x)
    tgt = _fixed_target(model, x, target, device, batch_size, memory_budget, sliding_window)
    if not isinstance(tgt, ClassTarget):
        raise ValueError("the random-logit check needs a classification target (ClassTarget or a class index), "
                         f"got {tgt!r}")
    with open_run(model, x, tgt, device=device, batch_size=batch_size, memory_budget=memory_budget,
                  sliding_window=sliding_window) as run:
        bound, k = run.target, run.output.shape[1]
    if k < 2:
        raise ValueError(f"the random-logit check needs at least two classes, the model has {k}")
    rng = np.random.default_rng(seed)
    classes = bound.classes.numpy()
    others = np.array([rng.choice([c for c in range(k) if c != int(cl)]) for cl in classes])
    kw = dict(options=options, device=device, batch_size=batch_size, memory_budget=memory_budget, seed=seed,
              sliding_window=sliding_window)
    a = explain(model, x, ClassTarget(torch.as_tensor(classes), tgt.output, tgt.activation), list(methods), **kw)
    b = explain(model, x, ClassTarget(torch.as_tensor(others), tgt.output, tgt.activation), list(methods), **kw)
    return {m: map_similarity(a[m], b[m]) for m in methods}
