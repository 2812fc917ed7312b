"""Labelled images for the image CNNs, as (grids (N, H, W) of ink in [0, 16], labels (N,) int).

- `digits()`: the 1,797 8x8 handwritten digits scikit-learn ships inside its package (nothing
  downloads), split once and for all: the last 360 images (20 %) are the held-out test set, the
  first 1,437 are for training (training/jobs/image.py takes 10 % of them as dev).
- `read_idx(images, labels)`: an MNIST-style IDX file pair (ubyte, 0..255 with ink high).
- `read_png_folder(root)`: one sub-folder of PNG/JPEG files per class; the folder name is the label.
Pictures go through the service's own preprocessing (models/image_encoding.py), so a model
trained on them sees what the service will feed it.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from models.image_encoding import INK_SCALE, grid_from_picture

DIGITS_TEST_SIZE = 360
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def digits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """((train grids, labels), (test grids, labels), label names) of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    grids, labels = data.images.astype(np.float32), data.target.astype(np.int64)
    cut = len(grids) - DIGITS_TEST_SIZE
    return (grids[:cut], labels[:cut]), (grids[cut:], labels[cut:]), [str(name) for name in data.target_names]


def _idx_array(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        zero, dtype_code, dimensions = struct.unpack(">HBB", file.read(4))
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(f">{dimensions}I", file.read(4 * dimensions))
        return np.frombuffer(file.read(), dtype=np.uint8).reshape(shape)


def read_idx(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An MNIST-style pair: images (N, H, W) 0..255 with ink high -> grids in [0, 16]."""
    images, labels = _idx_array(Path(images_path)), _idx_array(Path(labels_path))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"IDX shapes do not match: images {images.shape}, labels {labels.shape}")
    return images.astype(np.float32) * (INK_SCALE / 255.0), labels.astype(np.int64), [str(i) for i in range(int(labels.max()) + 1)]


def read_png_folder(root: Path, max_pixels: int = 4096 * 4096) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """root/LABEL/*.png -> 8x8 grids through the service's preprocessing, labels, label names."""
    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    grids, labels = [], []
    for index, name in enumerate(classes):
        for picture in sorted((Path(root) / name).iterdir()):
            if picture.suffix.lower() in PICTURE_SUFFIXES:
                grids.append(grid_from_picture(picture.read_bytes(), max_pixels))
                labels.append(index)
    if not grids:
        raise ValueError(f"{root}: no pictures in class sub-folders")
    return np.stack(grids).astype(np.float32), np.array(labels, dtype=np.int64), classes
