"""2D image folders: one sub-folder per class of PNG/JPEG images, grey or RGB (read with Pillow).

This is the layout of the public brain-tumour MRI and chest X-ray pneumonia sets::

    root/NORMAL/img001.jpeg
    root/PNEUMONIA/img002.jpeg

Images become float32 arrays (C, H, W) scaled to [0, 1], with C = 1 (grey) or 3 (RGB):
8-bit images are divided by 255, 16-bit ones (PNG, TIFF) are read at full depth and
divided by 65535, so the same picture reads the same at either depth.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "find_images", "load_image"]

#: file suffixes read as images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: Pillow modes of 16-bit greyscale images
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
#: Pillow modes holding more than 8 bits per pixel, read as numbers rather than converted to 8 bits
_DEEP = ("I", "F", *_SIXTEEN_BIT)


def find_images(root: str | os.PathLike) -> tuple[list[tuple[Path, int]], list[str]]:
    """``([(path, class index), ...], class names)`` of an image folder; classes are its sub-folders, sorted.

    Raises ``FileNotFoundError`` if ``root`` is missing and ``ValueError`` if it has
    no class sub-folder with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes, items = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            continue
        items += [(p, len(classes)) for p in files]
        classes.append(folder.name)
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class holding PNG/JPEG images, found none")
    return items, classes


def load_image(path: str | os.PathLike, channels: int | None = None, size=None) -> np.ndarray:
    """Read a PNG/JPEG/TIFF/BMP image as float32 (C, H, W) in [0, 1].

    ``channels`` 1 (grey) or 3 (RGB) converts; None keeps the file's (grey stays 1,
    colour becomes 3). 16-bit greyscale keeps its depth (divided by 65535; a grey
    image asked for as RGB repeats it). ``size`` (H, W) or an int resizes (bilinear).
    A file that cannot be read raises ``ValueError`` naming it.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if channels is None:
                channels = 1 if img.mode in ("1", "L", "LA", *_DEEP) else 3
            if img.mode in _DEEP:  # converting would clip to 8 bits
                data = np.asarray(img, dtype=np.float32)
                # 16-bit: its full range; 32-bit int or float images: 16-bit if they go past 8 bits
                top = 65535.0 if img.mode in _SIXTEEN_BIT or data.max() > 255 else 255.0
                img_out = Image.fromarray(np.clip(data / top, 0, 1).astype(np.float32), mode="F")
            else:
                img_out = img.convert("L" if channels == 1 else "RGB")
            if size is not None:
                h, w = (size, size) if isinstance(size, int) else tuple(size)
                img_out = img_out.resize((int(w), int(h)), Image.BILINEAR)
            data = np.asarray(img_out, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"cannot read image file {path}: {reason}") from None
    if img_out.mode != "F":
        data = data / 255.0
    if data.ndim == 2:
        data = data[None] if channels == 1 else np.repeat(data[None], 3, axis=0)
    else:
        data = np.moveaxis(data, -1, 0)
    return np.ascontiguousarray(data, dtype=np.float32)
