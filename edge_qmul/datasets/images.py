"""Reading an image folder ``root/<class>/[<owner>/]<image>``: class sub-folders sorted by name give
labels 0..K-1, every image is converted to grayscale or RGB and resized bilinearly. The one loader
behind ``Store.import_image_folder`` and ``tools/train_base.py --images``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..quant import QuantParams, quantize
from .samples import SampleBatch, SampleError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")


def find_images(root: Path) -> tuple[list[str], list[tuple[Path, int, tuple[str, ...]]]]:
    """The class names (sub-folders of ``root`` sorted by name; hidden ones skipped) and, per image
    file under them in path order, ``(file, label, its path parts inside the class folder)``; e.g.
    ``("ann", "img0.png")`` for ``root/cat/ann/img0.png``. SampleError if there are no classes or no
    images."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SampleError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
    found = []
    for label, cname in enumerate(classes):
        for p in sorted((root / cname).rglob("*")):
            rel = p.relative_to(root / cname)
            if not p.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            found.append((p, label, rel.parts))
    if not found:
        raise SampleError(f"{root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return classes, found


def read_pixels(files: Sequence[Path], size: tuple[int, int], channels: int) -> np.ndarray:
    """The images as float32 (N, H, W, channels) pixel values in [0, 255]: converted to grayscale
    (``channels=1``) or RGB (3) and resized to ``size=(H, W)``, bilinear. Needs Pillow; an unreadable
    file raises SampleError naming it."""
    try:  # Pillow is an optional dependency, needed only to read images
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading images needs Pillow: pip install 'edge-qmul[device]'") from e
    h, w = size
    mode = "L" if channels == 1 else "RGB"
    x = np.empty((len(files), h, w, channels), np.float32)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert(mode).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise SampleError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None
        x[i] = a.reshape(h, w, channels)
    return x


def image_folder_samples(root: str | os.PathLike, quant: QuantParams, size: tuple[int, int], channels: int = 1,
                         owner: str | None = None,
                         value_range: tuple[float, float] = (0.0, 1.0)) -> SampleBatch:
    """The images of ``root/<class>/...`` as int8 samples: with ``owner`` every image belongs to it;
    otherwise images sit in ``root/<class>/<owner>/`` and the folder names their owner. Pixels are
    mapped from [0, 255] to ``value_range`` and quantized with ``quant``. Anything wrong raises
    SampleError naming the folder or file."""
    root = Path(root)
    if not root.is_dir():
        raise SampleError(f"{root}: not a directory")
    if channels not in (1, 3):
        raise SampleError(f"channels must be 1 or 3, got {channels!r}")
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise SampleError(f"size must be (H, W), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise SampleError(f"size must be positive, got {size!r}")
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise SampleError(f"value_range must be finite with hi > lo, got {value_range!r}")
    classes, found = find_images(root)
    owners = []
    for p, _label, parts in found:
        if owner is None and len(parts) != 2:
            raise SampleError(f"{p}: no owner for this image: pass owner=, or put images in {root}/<class>/<owner>/")
        owners.append(owner if owner is not None else parts[0])
    x = read_pixels([p for p, _, _ in found], (h, w), channels)
    x = np.float32(lo) + x * np.float32((hi - lo) / 255.0)
    labels = np.array([label for _, label, _ in found], np.int64)
    return SampleBatch(quantize(x, quant, np.int8), labels, owners, classes, "images")
