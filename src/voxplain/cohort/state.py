"""What makes a cohort resumable: the settings fingerprint, which cases are complete, the failures table.

A case is complete when its folder is an intact voxplain output (its marker lists
exactly what is there) whose ``summary.json`` records the same fingerprint: a digest
of everything that decides the result (the model's class, config and every
parameter and buffer; the methods, their options, the targets, task, region, seed,
and voxplain's version). The device, batch size and memory budget decide how it
is computed, not what, and are left out.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_file, is_intact

__all__ = ["model_digest", "fingerprint", "case_record", "write_failures", "FAILURES_NAME", "one_line"]

#: the table of failed cases in a cohort's output folder
FAILURES_NAME = "failures.csv"


def model_digest(model: torch.nn.Module, config: Mapping | None = None) -> str:
    """SHA-256 of a model's class, its checkpoint config and every tensor of its state (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n".encode())
    h.update(json.dumps(config or {}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"\n{name} {t.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: str, **settings: Any) -> str:
    """A short digest of ``model`` (a :func:`model_digest`) and the settings that decide a result."""
    from .. import __version__

    data = {"voxplain": __version__, "model": model, **settings}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


def one_line(err: BaseException) -> str:
    """An exception as one line: its message, else its type's name."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def case_record(folder: str | os.PathLike, kind: str, fp: str, record: str = "summary.json") -> dict | None:
    """The cohort record of a complete case folder (from its ``record`` file), or None if it must be (re)done.

    Complete: an intact output of ``kind`` whose record's ``cohort.fingerprint`` is ``fp``.
    """
    folder = Path(folder)
    if not is_intact(folder, kind):
        return None
    try:
        data = json.loads((folder / record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cohort = data.get("settings", {}).get("cohort") if isinstance(data, dict) else None
    if not isinstance(cohort, dict) or cohort.get("fingerprint") != fp:
        return None
    return data


def write_failures(path: str | os.PathLike, failures: Sequence[tuple[str, str, str]]) -> None:
    """``failures.csv``: one ``case, worker, reason`` row per failed case (a header only when none failed)."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["case", "worker", "reason"])
            w.writerows(failures)
