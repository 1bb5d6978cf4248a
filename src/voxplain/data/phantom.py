"""A synthetic BraTS-like cohort built on the MNI152 template, with known ground truth.

Each subject is the template's tissue maps (grey matter, white matter, CSF) under a
random smooth deformation, rendered in four MRI contrasts (t1, t1ce, t2, flair)
with per-subject contrast jitter, a bias field, Rician noise and a global
intensity scale, then stored as int16 like a scanner export. Most subjects carry a
tumour placed mostly in white matter with irregular borders:

* high grade (HGG): necrotic core (label 1), an enhancing rim bright on t1ce
  (label 4) and oedema bright on t2/flair (label 2);
* low grade (LGG): a non-enhancing core (label 1) and oedema (label 2).

Grade has to be read from enhancement: tumour sizes come from the same
distribution for both grades, and all subjects have small enhancing non-tumour
spots (vessels) on t1ce. An optional "shortcut" marker, a small bright ball at a
fixed place, is added more often to high-grade subjects, to test whether
explanations reveal a model that learned it instead of the tumour.

The cohort is written in the BraTS 2021 layout ``NAME/NAME_{t1,t1ce,t2,flair,seg}.nii.gz``
with the template's affine, plus ``subjects.csv`` (one row per subject) and
``cohort.json`` (the generation settings). The same settings give the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..atomic import atomic_dir
from . import synth
from .nifti import write_nifti
from .template import Template, load_template

__all__ = ["generate_cohort", "generate_subject", "PhantomSubject", "parse_grades", "parse_shortcut",
           "MODALITIES", "SUBJECT_COLUMNS", "SHORTCUT_MM"]

#: modality order of the images (the BraTS 2021 file suffixes)
MODALITIES = ("t1", "t1ce", "t2", "flair")

#: columns of subjects.csv
SUBJECT_COLUMNS = (
    "name", "grade", "healthy", "shortcut",
    "centroid_i", "centroid_j", "centroid_k", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
    "et_voxels", "tc_voxels", "wt_voxels", "et_ml", "tc_ml", "wt_ml",
)

#: where the shortcut marker sits, in MNI mm (right parietal white matter)
SHORTCUT_MM = (40.0, -70.0, 30.0)
_SHORTCUT_RADIUS_MM = 5.0

# Mean intensity of each tissue per modality, relative to white matter on T1.
# Orders follow clinical appearance: T1 WM > GM > CSF; T2 CSF > GM > WM;
# FLAIR GM > WM > CSF (CSF suppressed); t1ce like T1 with enhancing tumour bright.
_TISSUES = ("csf", "gm", "wm", "oedema", "necrosis", "enhancing", "core_lgg", "vessel", "marker")
_CONTRAST = {
    #          csf   gm    wm   oedema necro  enh   coreLGG vessel marker
    "t1":    (0.30, 0.62, 1.00, 0.62, 0.35, 0.70, 0.50, 0.75, 1.60),
    "t1ce":  (0.30, 0.64, 1.00, 0.64, 0.33, 1.55, 0.52, 1.35, 1.60),
    "t2":    (1.00, 0.62, 0.42, 0.86, 0.96, 0.70, 0.98, 0.60, 1.40),
    "flair": (0.12, 0.66, 0.50, 0.90, 0.45, 0.74, 1.00, 0.60, 1.40),
}
_JITTER = 0.07  # relative per-subject spread of each tissue mean (makes contrasts overlap)
_GRADES = ("HGG", "LGG")


@dataclass
class PhantomSubject:
    """One synthetic subject: ``image`` (4, X, Y, Z) float32 in ``MODALITIES`` order,
    ``seg`` (X, Y, Z) uint8 BraTS labels, its row of ``subjects.csv`` in ``info``, and
    the ground truth behind the image in ``tissues``: the deformed "csf", "gm", "wm"
    probability maps and the "brain", "vessels" and "marker" masks (not written to disk)."""

    name: str
    image: np.ndarray
    seg: np.ndarray
    info: dict = field(default_factory=dict)
    tissues: dict = field(default_factory=dict)


def parse_grades(grades) -> dict[str, float]:
    """Normalise a grade mix: a fraction of HGG (``0.6``), ``"0.6"``, ``"HGG:0.6,LGG:0.4"`` or a dict.

    Returns ``{"HGG": p, "LGG": 1 - p}``.
    """
    if isinstance(grades, str):
        text = grades.strip()
        if ":" in text or "=" in text:
            mix = {}
            for part in text.split(","):
                key, sep, value = part.replace("=", ":").partition(":")
                try:
                    mix[key.strip().upper()] = float(value)
                except ValueError:
                    raise ValueError(f"grades: expected NAME:WEIGHT pairs like 'HGG:0.5,LGG:0.5', "
                                     f"got {grades!r}") from None
            grades = mix
        else:
            try:
                grades = float(text)
            except ValueError:
                raise ValueError(f"grades: expected a fraction of HGG or 'HGG:w,LGG:w', got {grades!r}") from None
    if isinstance(grades, (int, float)):
        if not 0.0 <= grades <= 1.0:
            raise ValueError(f"grades: the fraction of high grade must be in [0, 1], got {grades}")
        return {"HGG": float(grades), "LGG": 1.0 - float(grades)}
    if isinstance(grades, dict):
        unknown = [k for k in grades if k.upper() not in _GRADES]
        if unknown:
            raise ValueError(f"grades: unknown grade(s) {unknown}; expected {_GRADES}")
        weights = {g: float(grades.get(g, grades.get(g.lower(), 0.0))) for g in _GRADES}
        total = sum(weights.values())
        if any(w < 0 for w in weights.values()) or total <= 0:
            raise ValueError(f"grades: weights must be non-negative and not all zero, got {grades}")
        return {g: w / total for g, w in weights.items()}
    raise ValueError(f"grades: expected a fraction, a string or a dict, got {type(grades).__name__}")


def parse_shortcut(shortcut) -> tuple[float, float]:
    """Normalise the shortcut option to (P(marker | HGG), P(marker | LGG or healthy)).

    Accepts ``0``/``None`` (no marker), a probability ``p`` (high grade only),
    ``"p"``, ``"p:q"`` or a pair ``(p, q)``.
    """
    if shortcut is None:
        return 0.0, 0.0
    if isinstance(shortcut, str):
        parts = shortcut.split(":")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"shortcut: expected P or P:Q (probabilities), got {shortcut!r}") from None
        if len(values) not in (1, 2):
            raise ValueError(f"shortcut: expected P or P:Q, got {shortcut!r}")
        shortcut = tuple(values)
    if isinstance(shortcut, (int, float)):
        shortcut = (float(shortcut), 0.0)
    p, q = (tuple(shortcut) + (0.0,))[:2]
    for v in (p, q):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"shortcut: probabilities must be in [0, 1], got {shortcut}")
    return float(p), float(q)


def _assign(subjects: int, grades: dict[str, float], healthy_fraction: float,
            rng: np.random.Generator) -> list[str]:
    """Grades of the cohort ("HGG", "LGG" or "none") in the asked proportions, shuffled.

    Counts are rounded at random (up with probability equal to the fraction), so a
    small cohort, even of one subject, follows the mix over seeds.
    """
    def rounded(x: float) -> int:
        base = int(np.floor(x + 1e-9))
        return base + int(rng.random() < x - base - 1e-9)

    n_healthy = rounded(subjects * healthy_fraction)
    n_tumour = subjects - n_healthy
    n_hgg = rounded(n_tumour * grades["HGG"])
    labels = ["HGG"] * n_hgg + ["LGG"] * (n_tumour - n_hgg) + ["none"] * n_healthy
    return [labels[i] for i in rng.permutation(subjects)]


def _tumour_centre(tpl: Template, wm: np.ndarray, inside_mm: np.ndarray, radius_mm: float,
                   rng: np.random.Generator, avoid: np.ndarray | None) -> np.ndarray:
    """A voxel in white matter deep enough in the brain for a core of ``radius_mm``."""
    spacing = tpl.resolution
    ok = (wm > 0.6) & (inside_mm > radius_mm * 0.5 + 4.0)
    if avoid is not None:
        where = np.argwhere(ok)
        near = np.linalg.norm((where - avoid) * spacing, axis=1) <= radius_mm + 2 * _SHORTCUT_RADIUS_MM
        ok[tuple(where[near].T)] = False
    candidates = np.argwhere(ok)
    if len(candidates) == 0:
        candidates = np.argwhere(wm > 0.5)
    return candidates[rng.integers(len(candidates))].astype(np.float64)


def generate_subject(name: str, grade: str, shortcut: bool, seed, resolution: int = 2,
                     template: Template | None = None) -> PhantomSubject:
    """Synthesise one subject in memory.

    Args:
        name: the subject's name (first column of its table row).
        grade: "HGG", "LGG" or "none" (no tumour).
        shortcut: add the marker ball at :data:`SHORTCUT_MM`.
        seed: anything ``numpy.random.default_rng`` takes; the same seed gives the same subject.
        resolution: voxel size in mm, unless ``template`` (a preloaded :class:`Template`) is given.
    """
    if grade not in (*_GRADES, "none"):
        raise ValueError(f"grade must be 'HGG', 'LGG' or 'none', got {grade!r}")
    tpl = template or load_template(resolution)
    rng = np.random.default_rng(seed)
    spacing = float(tpl.resolution)
    shape = tpl.shape

    coords = synth.random_deformation(shape, spacing, rng)
    gm, wm, mask_f = synth.deform(np.stack([tpl.gm, tpl.wm, tpl.mask.astype(np.float32)]), coords)
    mask = mask_f > 0.5
    gm, wm = gm * mask, wm * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    means = {m: dict(zip(_TISSUES, np.asarray(v) * rng.uniform(1 - _JITTER, 1 + _JITTER, len(v))))
             for m, v in _CONTRAST.items()}

    # tumour
    seg = np.zeros(shape, np.uint8)
    marker_vox = tpl.voxel(SHORTCUT_MM)
    if grade != "none":
        inside_mm = ndimage.distance_transform_cdt(mask, metric="taxicab") * (spacing / math.sqrt(3))
        wt_radius = float(rng.uniform(10.0, 30.0))
        centre = _tumour_centre(tpl, wm, inside_mm, wt_radius * 0.5, rng, marker_vox)
        allowed = mask & (csf < 0.5)
        for _ in range(5):
            seg = synth.tumour_labels(shape, centre, spacing, rng, grade, wt_radius, allowed)
            if grade == "LGG" or (seg == 4).any():
                break

    # other bright spots on t1ce (vessels, choroid plexus): not tumour, in every subject
    vessels = np.zeros(shape, bool)
    spots = np.argwhere(mask & (seg == 0) & (ndimage.distance_transform_cdt(mask) > 2))
    for _ in range(int(rng.integers(2, 6))):
        spot = spots[rng.integers(len(spots))]
        vessels |= synth.ball(shape, spot, max(rng.uniform(1.5, 3.0) / spacing, 0.9))
    vessels &= mask & (seg == 0)

    marker = synth.ball(shape, marker_vox, _SHORTCUT_RADIUS_MM / spacing) & mask if shortcut else None

    # soft (partial-volume) versions of the hard masks, for natural borders
    def soft(m):
        out = np.zeros(shape, np.float32)
        where = np.argwhere(m)
        box = tuple(slice(max(lo - 3, 0), hi + 4) for lo, hi in zip(where.min(0), where.max(0)))
        out[box] = np.clip(ndimage.gaussian_filter(m[box].astype(np.float32), 0.6), 0.0, 1.0)
        return out

    parts = {"oedema": seg == 2, "necrosis": (seg == 1) & (grade == "HGG"),
             "core_lgg": (seg == 1) & (grade == "LGG"), "enhancing": seg == 4, "vessel": vessels}
    if marker is not None:
        parts["marker"] = marker
    weights = {k: soft(v) for k, v in parts.items() if v.any()}
    total = sum(weights.values()) if weights else 0.0
    if weights:
        over = np.maximum(total, 1.0)
        weights = {k: w / over for k, w in weights.items()}
        total = np.minimum(total, 1.0)
    # render inside the brain only (the background of a skull-stripped scan is 0)
    texture = 1.0 + 0.06 * synth.smooth_noise(shape, 1.5, rng)[mask]
    tissue = [t[mask] for t in (csf, gm, wm)]
    inside = {k: w[mask] for k, w in weights.items()}
    rest = 1.0 - total[mask] if weights else None
    image = np.zeros((len(MODALITIES),) + shape, np.float32)
    for c, modality in enumerate(MODALITIES):
        mu = means[modality]
        img = tissue[0] * mu["csf"] + tissue[1] * mu["gm"] + tissue[2] * mu["wm"]
        if weights:
            img = img * rest + sum(w * np.float32(mu[k]) for k, w in inside.items())
        img = img * texture * synth.bias_field(shape, rng)[mask]
        noisy = synth.rician_noise(img, float(rng.uniform(0.02, 0.05)), rng)
        scale = float(rng.uniform(400.0, 1200.0))
        image[c][mask] = np.maximum(np.rint(noisy * scale), 1.0)
    info = _describe(name, grade, shortcut, seg, tpl)
    tissues = {"csf": csf, "gm": gm, "wm": wm, "brain": mask, "vessels": vessels,
               "marker": marker if marker is not None else np.zeros(shape, bool)}
    return PhantomSubject(name=name, image=image, seg=seg, info=info, tissues=tissues)


def _describe(name: str, grade: str, shortcut: bool, seg: np.ndarray, tpl: Template) -> dict:
    """The subject's row of subjects.csv."""
    voxel_ml = float(abs(np.linalg.det(tpl.affine[:3, :3]))) / 1000.0
    counts = {"et": int((seg == 4).sum()), "tc": int(np.isin(seg, (1, 4)).sum()), "wt": int((seg > 0).sum())}
    if counts["wt"]:
        centroid = np.argwhere(seg > 0).mean(axis=0)
        mm = tpl.mm(centroid)
    else:
        centroid = mm = np.full(3, np.nan)
    row = {"name": name, "grade": grade, "healthy": int(grade == "none"), "shortcut": int(bool(shortcut))}
    for axis, v in zip("ijk", centroid):
        row[f"centroid_{axis}"] = "" if math.isnan(v) else round(float(v), 2)
    for axis, v in zip("xyz", mm):
        row[f"centroid_{axis}_mm"] = "" if math.isnan(v) else round(float(v), 2)
    for region in ("et", "tc", "wt"):
        row[f"{region}_voxels"] = counts[region]
    for region in ("et", "tc", "wt"):
        row[f"{region}_ml"] = round(counts[region] * voxel_ml, 3)
    return row


def generate_cohort(out_dir: str | os.PathLike, subjects: int = 10, seed: int = 0, resolution: int = 2,
                    grades=0.5, healthy_fraction: float = 0.0, shortcut=0.0, prefix: str = "PHANTOM",
                    progress: bool | Callable = False, overwrite: bool = True, workers: int = 2) -> list[dict]:
    """Write a synthetic BraTS-like cohort to ``out_dir`` and return the rows of its subjects.csv.

    Args:
        subjects: number of subjects.
        seed: the same seed (and settings) gives byte-identical files.
        resolution: voxel size in mm (1, 2 or 3) of the MNI152 grid.
        grades: mix of tumour grades, see :func:`parse_grades` (default half HGG).
        healthy_fraction: fraction of subjects without a tumour (grade "none").
        shortcut: marker probabilities, see :func:`parse_shortcut` (default none).
        prefix: subject names are ``{prefix}_{index:03d}``.
        progress: show a tqdm bar (True), or a callable ``(done, total)``.
        overwrite: replace an existing ``out_dir`` once the new cohort is complete.
        workers: subjects made at the same time (threads; the output does not depend on it).
    """
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")
    if int(subjects) != subjects or subjects < 1:
        raise ValueError(f"subjects must be a positive integer, got {subjects!r}")
    if not 0.0 <= float(healthy_fraction) <= 1.0:
        raise ValueError(f"healthy_fraction must be in [0, 1], got {healthy_fraction!r}")
    if not prefix or any(c in prefix for c in "/\\_") or prefix != prefix.strip():
        raise ValueError(f"prefix must be a non-empty name without '/', '\\' or '_', got {prefix!r}")
    mix = parse_grades(grades)
    p_marker = parse_shortcut(shortcut)
    tpl = load_template(resolution)
    rng = np.random.default_rng([int(seed), 0])
    cohort_grades = _assign(int(subjects), mix, float(healthy_fraction), rng)
    markers = [bool(rng.random() < (p_marker[0] if g == "HGG" else p_marker[1])) for g in cohort_grades]

    bar = None
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=int(subjects), desc="phantom", unit="subject")

    def make(i: int, tmp: Path) -> dict:
        subject = generate_subject(f"{prefix}_{i + 1:03d}", cohort_grades[i], markers[i], seed=[int(seed), 1, i],
                                   template=tpl)
        _write_subject(subject, tpl, tmp)
        return subject.info

    rows = []
    try:
        with atomic_dir(out_dir, kind="phantom", overwrite=overwrite) as tmp:
            # subjects are independent (one seed each), so threads change the speed, not the bytes
            pool = ThreadPoolExecutor(max(1, min(int(workers), int(subjects))))
            try:
                jobs = [pool.submit(make, i, tmp) for i in range(int(subjects))]
                for i, job in enumerate(jobs):
                    rows.append(job.result())
                    if bar is not None:
                        bar.update(1)
                    elif callable(progress):
                        progress(i + 1, int(subjects))
            finally:  # before atomic_dir removes the folder on error: no thread may still write there
                pool.shutdown(wait=True, cancel_futures=True)
            _write_table(rows, tmp / "subjects.csv")
            settings = {"generator": "voxplain.data.phantom", "version": 1, "subjects": int(subjects),
                        "seed": int(seed), "resolution": int(resolution), "grades": mix,
                        "healthy_fraction": float(healthy_fraction), "shortcut": list(p_marker),
                        "shortcut_mm": list(SHORTCUT_MM), "shortcut_radius_mm": _SHORTCUT_RADIUS_MM,
                        "modalities": list(MODALITIES), "labels": {"1": "necrotic or non-enhancing core",
                                                                   "2": "oedema", "4": "enhancing tumour"}}
            (tmp / "cohort.json").write_text(json.dumps(settings, indent=2) + "\n")
    finally:
        if bar is not None:
            bar.close()
    return rows


def _write_subject(subject: PhantomSubject, tpl: Template, root: Path) -> None:
    folder = root / subject.name
    folder.mkdir()
    for c, modality in enumerate(MODALITIES):
        write_nifti(subject.image[c], tpl.affine, folder / f"{subject.name}_{modality}.nii.gz", dtype=np.int16)
    write_nifti(subject.seg, tpl.affine, folder / f"{subject.name}_seg.nii.gz", dtype=np.uint8)


def _write_table(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUBJECT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())
