"""Training digits redrawn as a user's picture would come out of the service's preprocessing.

A scanned form digit and a digit drawn on the playground reach the model by different roads:
the form digits were size-normalised by their makers, a picture is cropped to its ink's bounding
box, centred on a square and averaged down to 8x8 by `grid_from_grey` (models/image_encoding.py).
A picture's digit is also slanted, rotated, wider or narrower, and drawn with a thinner or thicker
pen than the forms' writers used. `jittered` gives the model those variants of its own training
digits: each 8x8 grid is drawn large (32x32, bilinear), rotated, slanted, stretched in width,
its strokes thickened or thinned, and then read back by the very function that reads pictures.
Nothing label-specific: every digit gets the same kinds of change.

Used by training/jobs/image.py when the recipe's `jitter` > 0: `jitter_copies` redrawn copies of
each training digit are made once, and in every epoch each digit is replaced by one of them with
probability `jitter`. The check of the result is training/evaluation/drawn_digits.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.image_encoding import GRID, INK_SCALE, grid_from_grey, resize

FINE = GRID * 4  # 32: the digits' own bitmap side
PAD = FINE // 4  # room for a rotated or widened digit before it is cropped to its ink again


@dataclass(frozen=True)
class Jitter:
    rotate_degrees: float = 10.0  # uniform in [-r, r]
    slant: float = 0.3  # x += slant * (centre - y), uniform in [-s, s]: leaning handwriting
    log_width: float = 0.3  # the width scaled by exp(uniform(-w, w)): narrow to wide writing
    stroke: int = 2  # the strokes grown or shrunk by up to this many fine pixels (a pen's width)


def redraw(grid: np.ndarray, degrees: float = 0.0, slant: float = 0.0, width: float = 1.0, pen: int = 0) -> np.ndarray:
    """One 8x8 grid of ink in [0, 16] drawn large, rotated by `degrees` (clockwise on the page),
    slanted (x += slant * (centre - y): positive leans right), its width times `width`, its strokes
    grown (`pen` > 0) or shrunk (< 0) by that many fine pixels, then read as a picture is."""
    fine = np.pad(resize(grid / INK_SCALE, FINE), PAD)  # (48, 48), ink high
    angle = math.radians(degrees)
    # Forward map on (y, x) about the centre: stretch x, then slant, then rotate; the transform
    # samples the input at inverse(forward) of each output pixel.
    rotate = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    forward = rotate @ np.array([[1.0, 0.0], [-slant, 1.0]]) @ np.array([[1.0, 0.0], [0.0, width]])
    inverse = np.linalg.inv(forward)
    centre = (np.array(fine.shape, dtype=float) - 1) / 2
    moved = ndimage.affine_transform(fine, inverse, offset=centre - inverse @ centre, order=1)
    if pen > 0:
        moved = ndimage.grey_dilation(moved, size=(pen + 1, pen + 1))
    elif pen < 0:
        thinner = ndimage.grey_erosion(moved, size=(1 - pen, 1 - pen))
        moved = thinner if (thinner > 0.2 * moved.max()).sum() >= 8 else moved  # a faint digit is not erased
    return grid_from_grey(moved).astype(np.float32)


def redrawn(grid: np.ndarray, jitter: Jitter, rng: np.random.Generator) -> np.ndarray:
    """`redraw` with its changes drawn at random within `jitter`'s ranges."""
    return redraw(grid,
                  degrees=rng.uniform(-jitter.rotate_degrees, jitter.rotate_degrees),
                  slant=rng.uniform(-jitter.slant, jitter.slant),
                  width=math.exp(rng.uniform(-jitter.log_width, jitter.log_width)),
                  pen=int(rng.integers(-jitter.stroke, jitter.stroke + 1)))


def redrawn_copies(grids: np.ndarray, copies: int, jitter: Jitter, rng: np.random.Generator) -> np.ndarray:
    """(N, 8, 8) grids -> (copies, N, 8, 8) redrawn variants, made once before training (a
    redrawing costs milliseconds; an epoch then only picks among them)."""
    if grids.shape[1:] != (GRID, GRID):
        raise ValueError(f"jitter redraws {GRID}x{GRID} digit grids as pictures are read; these are {grids.shape[1]}x{grids.shape[2]}")
    return np.stack([np.stack([redrawn(grid, jitter, rng) for grid in grids]) for _ in range(copies)])


def pick(grids: np.ndarray, copies: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """An epoch's grids: each one replaced, with probability `share`, by one of its redrawn copies."""
    chosen = rng.integers(0, len(copies), size=len(grids))
    replaced = rng.random(len(grids)) < share
    return np.where(replaced[:, None, None], copies[chosen, np.arange(len(grids))], grids)
