"""A self-contained evaluation demo: a synthetic 2D task with known ground truth and a shortcut.

Images (1, 32, 32): a disc that is brighter (class 1) or darker (class 0) than the
background, among random bright and dark squares, plus noise. A small bright
square in a fixed corner (the *shortcut marker*) appears in most class-1 images
and few class-0 images, so a model can partly learn it instead of the disc. A
small CNN is trained for a few seconds on the CPU; the held-out cases carry the
disc as their "WT" mask and the marker mask, so every metric family applies.
Nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from .runner import EvalCase

__all__ = ["demo_data", "demo_model", "train_demo_model", "demo_cases", "MARKER_SLICE"]

#: where the shortcut marker sits in every demo image
MARKER_SLICE = (slice(2, 6), slice(2, 6))


def demo_data(n: int, size: int = 32, seed: int = 0, shortcut: tuple[float, float] = (0.8, 0.1)):
    """``(images (n, 1, size, size), labels (n,), discs (n, size, size) bool, markers (n, size, size) bool)``."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 1, size, size, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    discs = torch.zeros(n, size, size, dtype=torch.bool)
    markers = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        for _ in range(6):
            lo = torch.randint(8, size - 5, (2,), generator=g)
            x[i, 0, lo[0]:lo[0] + 4, lo[1]:lo[1] + 4] += float(torch.rand(1, generator=g)) * 1.6 - 0.8
        c = torch.randint(10, size - 6, (2,), generator=g).float()
        disc = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= 16
        discs[i] = disc
        x[i, 0] += disc.float() if y[i] == 1 else -disc.float()
        if float(torch.rand(1, generator=g)) < shortcut[0 if y[i] == 1 else 1]:
            markers[i][MARKER_SLICE] = True
            x[i, 0][MARKER_SLICE] += 1.5
    return x, y, discs, markers


def demo_model(width: int = 16, seed: int = 0) -> nn.Module:
    """Five conv-ReLU layers (max-pooling after the first two), global average pooling, linear."""
    torch.manual_seed(seed)
    layers, c = [], 1
    for i in range(5):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if i < 2 else [])
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))


def train_demo_model(steps: int = 60, seed: int = 0) -> tuple[nn.Module, float]:
    """Train :func:`demo_model` on fresh demo data; returns the model (eval mode) and held-out accuracy."""
    x, y, _, _ = demo_data(512, seed=seed)
    model = demo_model(seed=seed)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:32]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt, yt, _, _ = demo_data(128, seed=seed + 1000)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return model, acc


def demo_cases(n: int = 20, seed: int = 1) -> list[EvalCase]:
    """Held-out demo cases with the disc as region ``WT`` and the marker where present."""
    x, _, discs, markers = demo_data(n, seed=seed + 2000)
    return [EvalCase(f"demo{i:03d}", x[i], None, discs[i][None].float(), ("WT",),
                     markers[i].numpy() if markers[i].any() else None) for i in range(n)]
