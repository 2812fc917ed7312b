"""Images to model input, torch-free: shared by training (training/jobs/image.py) and serving
(services/api/image_api.py), so the service sees an image exactly as the model was trained to.

The model's unit is scikit-learn's digits: an 8x8 grid of ink amounts from 0 (paper) to 16 (full
ink), as the digits were made (32x32 bitmaps, on-pixels counted per 4x4 block). `encode` scales
such a grid to [0, 1] and resizes it to the model's side (LeNet-5 reads 32x32).

A photo or scan (PNG, JPEG, ...) becomes such a grid in `grid_from_picture`: grey levels, ink as
the high values (a light background is inverted), cropped to the ink's bounding box, centred on
a square (no margin: the digits fill their grid top to bottom), and averaged down to 8x8
blocks, like the digits' 4x4 counting.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

INK_SCALE = 16.0  # scikit-learn digits: 0..16
GRID = 8  # the digits' side


class ImageError(ValueError):
    """The bytes are not a readable image, or the image cannot be used."""


class ImageTooLarge(ImageError):
    """More pixels than the limit allows: refused before the pixels are decoded."""


@dataclass(frozen=True)
class ImageEncoder:
    size: int = GRID  # the model's input side
    scale: float = INK_SCALE

    def encode(self, grids: np.ndarray) -> np.ndarray:
        """(B, H, W) ink amounts in [0, scale] -> (B, 1, size, size) float32 in [0, 1]."""
        grids = np.asarray(grids, dtype=np.float32)
        if grids.ndim != 3:
            raise ImageError(f"expected (images, height, width), got shape {grids.shape}")
        if not np.isfinite(grids).all():
            raise ImageError("pixel values must be finite numbers")
        scaled = np.clip(grids / self.scale, 0.0, 1.0)
        if scaled.shape[1:] != (self.size, self.size):
            scaled = np.stack([resize(image, self.size) for image in scaled])
        return scaled[:, None, :, :].astype(np.float32)

    def to_config(self) -> dict:
        return {"kind": "image", "size": self.size, "scale": self.scale, "grid": GRID}

    @classmethod
    def from_config(cls, encoding: dict) -> ImageEncoder:
        if encoding.get("kind") != "image":
            raise ValueError(f"not an image encoding: {encoding.get('kind')!r}")
        return cls(encoding["size"], encoding["scale"])


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """A float image (H, W) resized to (size, size), bilinear (Pillow's 'F' mode keeps floats)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)


def grid_from_picture(data: bytes, max_pixels: int) -> np.ndarray:
    """PNG/JPEG/... bytes -> an 8x8 grid of ink amounts in [0, 16], as the digits are."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow refuses larger ones (decompression bombs) before decoding
    try:
        with Image.open(io.BytesIO(data)) as picture:
            if picture.width * picture.height > max_pixels:
                raise ImageTooLarge(f"the image has {picture.width}x{picture.height} pixels; the limit is {max_pixels} (TEXTSERVE_MAX_IMAGE_PIXELS)")
            grey = np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the image has more than twice the limit of {max_pixels} pixels (TEXTSERVE_MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"not a readable image: send PNG, JPEG, GIF, BMP or WebP bytes ({type(error).__name__})") from None
    return grid_from_grey(grey)


def grid_from_grey(grey: np.ndarray) -> np.ndarray:
    """A grey image (H, W) in [0, 1] -> an 8x8 grid of ink in [0, 16]."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    light_paper = border.mean() > 0.5  # dark ink on light paper (a scan), or light ink on dark (MNIST-like)
    ink = 1.0 - grey if light_paper else grey
    paper = float(np.median(1.0 - border if light_paper else border))
    ink = np.clip((ink - paper) / max(1e-6, float(ink.max()) - paper), 0.0, 1.0)
    rows, columns = np.nonzero(ink > 0.2)
    if rows.size == 0:
        raise ImageError("the image has no ink: it is blank")
    ink = ink[rows.min(): rows.max() + 1, columns.min(): columns.max() + 1]
    side = max(ink.shape)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - ink.shape[0]) // 2, (side - ink.shape[1]) // 2
    square[top: top + ink.shape[0], left: left + ink.shape[1]] = ink
    fine = resize(square, GRID * 4)  # 32x32, then each 4x4 block averaged: the digits' counting
    blocks = fine.reshape(GRID, 4, GRID, 4).mean(axis=(1, 3))
    return np.clip(blocks / max(1e-6, blocks.max()), 0.0, 1.0) * INK_SCALE
