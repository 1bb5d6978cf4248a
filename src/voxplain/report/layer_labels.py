"""Short names for the layers of a layer-by-layer Grad-CAM: ``enc 1 ... bottleneck ... dec 1 ... head``.

Module paths of real networks (``model.1.submodule.1.submodule.0.conv.unit0.adn.A``)
are long and tell a reader little. What matters is where a layer sits: how far
down the encoder, at the bottleneck, or how far back up the decoder. That is
read from the execution order and the spatial size of each layer's output,
for any network:

* resolution levels are the distinct output sizes, largest first (level 1 = the
  input's resolution);
* layers before the first one at the smallest size are the encoder (``enc L``);
  in the run of layers at the smallest size, those from the first with the most
  channels on are the ``bottleneck`` (the layers before it are the encoder's last
  stage, as in MONAI's UNet, whose last down block and bottom block share a size);
  the layers after the run are the decoder (``dec L``, numbered like the encoder
  level of the same size);
* the last layer is the ``head`` when its output has the model output's shape;
* a network whose size only shrinks (a classifier) has stages (``stage L``).

Several layers at one level are told apart by ``.1``, ``.2``, ...
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["short_layer_labels", "layer_output_shapes"]


def short_layer_labels(shapes: Sequence[tuple[str, Sequence[int]]],
                       output_shape: Sequence[int] | None = None) -> dict[str, str]:
    """``{layer name: short label}`` for layers in execution order.

    Args:
        shapes: ``(name, (C, *spatial))`` of each layer's output for one sample, in execution order.
        output_shape: the model's output ``(K, *spatial)`` for one sample (to recognise the head).
    """
    if not shapes:
        return {}
    sizes = [math.prod(s[1:]) for _, s in shapes]
    levels = {size: i + 1 for i, size in enumerate(sorted(set(sizes), reverse=True))}
    smallest = min(sizes)
    first = sizes.index(smallest)
    last = first
    while last + 1 < len(sizes) and sizes[last + 1] == smallest:
        last += 1
    has_decoder = last + 1 < len(sizes)
    widest = max(shapes[i][1][0] for i in range(first, last + 1))
    bottom = next(i for i in range(first, last + 1) if shapes[i][1][0] == widest)
    head = (has_decoder and output_shape is not None
            and tuple(shapes[-1][1]) == tuple(output_shape))
    parts = []
    for i, size in enumerate(sizes):
        if not has_decoder:
            parts.append(f"stage {levels[size]}")
        elif i < bottom:
            parts.append(f"enc {levels[size]}")
        elif i <= last:
            parts.append("bottleneck")
        elif head and i == len(sizes) - 1:
            parts.append("head")
        else:
            parts.append(f"dec {levels[size]}")
    totals = Counter(parts)
    seen: Counter = Counter()
    labels = {}
    for (name, _), part in zip(shapes, parts):
        seen[part] += 1
        labels[name] = f"{part}.{seen[part]}" if totals[part] > 1 else part
    return labels


def layer_output_shapes(model: nn.Module, x: torch.Tensor, names: Sequence[str],
                        forward) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, (C, *spatial))`` of the first sample's output of each named layer, from one forward pass.

    ``forward(model, x)`` runs the model (e.g. through the engine, so its state is restored).
    """
    from ..methods.layer_select import resolve_layer

    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook(name):
        def record(module, args, output):
            if isinstance(output, torch.Tensor) and name not in shapes:
                shapes[name] = tuple(int(s) for s in output.shape[1:])
        return record

    try:
        for name in names:
            handles.append(resolve_layer(model, name).register_forward_hook(hook(name)))
        forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return [(n, shapes[n]) for n in names if n in shapes]
