"""The grid of CXAI stage 1: conv blocks x batch sizes x learning rates, checked before anything trains."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SweepGrid", "config_key", "DEFAULT_BLOCKS", "DEFAULT_BATCH_SIZES", "DEFAULT_LEARNING_RATES"]

DEFAULT_BLOCKS = (3, 5, 7)
DEFAULT_BATCH_SIZES = (16, 32, 64, 128)
DEFAULT_LEARNING_RATES = (1e-2, 1e-3, 1e-4)


@dataclass(frozen=True)
class SweepGrid:
    """A full-factorial grid over the 2D CNN's depth and the optimiser's settings.

    The default is CXAI's 36 configurations: 3 block counts x 4 batch sizes x 3 learning rates.
    """

    blocks: tuple[int, ...] = DEFAULT_BLOCKS
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    learning_rates: tuple[float, ...] = DEFAULT_LEARNING_RATES

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", _unique("blocks", self.blocks, int))
        object.__setattr__(self, "batch_sizes", _unique("batch sizes", self.batch_sizes, int))
        object.__setattr__(self, "learning_rates", _unique("learning rates", self.learning_rates, float))
        bad = [b for b in self.blocks if b < 1]
        if bad:
            raise ValueError(f"conv block counts must be >= 1, got {bad}")
        bad = [b for b in self.batch_sizes if b < 1]
        if bad:
            raise ValueError(f"batch sizes must be >= 1, got {bad}")
        bad = [lr for lr in self.learning_rates if not (lr > 0 and math.isfinite(lr))]
        if bad:
            raise ValueError(f"learning rates must be positive and finite, got {bad}")

    @property
    def search_space(self) -> dict[str, list]:
        """The grid in Optuna's ``GridSampler`` form."""
        return {"blocks": list(self.blocks), "batch_size": list(self.batch_sizes),
                "learning_rate": list(self.learning_rates)}

    def configurations(self) -> list[dict]:
        """Every configuration, block count varying slowest."""
        return [{"blocks": b, "batch_size": bs, "learning_rate": lr}
                for b, bs, lr in itertools.product(self.blocks, self.batch_sizes, self.learning_rates)]

    def __len__(self) -> int:
        return len(self.blocks) * len(self.batch_sizes) * len(self.learning_rates)

    def check_against(self, n_train: int, image_size: int) -> None:
        """Reject settings the data cannot support: batches larger than the training set."""
        too_big = [b for b in self.batch_sizes if b > n_train]
        if too_big:
            raise ValueError(
                f"batch size(s) {too_big} exceed the training set of {n_train} images; "
                "use smaller batch sizes or more data"
            )
        if image_size < 8:
            raise ValueError(f"image size must be at least 8 pixels, got {image_size}")


PARAMS = ("blocks", "batch_size", "learning_rate")


def config_key(config: dict) -> str | None:
    """A stable name for one configuration, e.g. ``b5_bs32_lr0.001``.

    ``None`` for a trial whose parameters are not all chosen yet (a trial that is just starting).
    """
    if any(k not in config for k in PARAMS):
        return None
    return f"b{int(config['blocks'])}_bs{int(config['batch_size'])}_lr{float(config['learning_rate']):g}"


def _unique(what: str, values: Sequence, kind: type) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{what} must be a list of numbers, got {values!r}")
    if not values:
        raise ValueError(f"{what}: the grid needs at least one value")
    out = []
    for v in values:
        if isinstance(v, bool):
            raise TypeError(f"{what} must be numbers, got {v!r}")
        if kind is int:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError(f"{what} must be whole numbers, got {v!r}")
            v = int(v)
        else:
            v = float(v)
        if v not in out:
            out.append(v)
    return tuple(out)
