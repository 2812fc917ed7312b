"""Digits drawn with a pen, as a user draws them on the playground's canvas: the check set of
"reads drawn pictures" for image bundles (`python -m training check-drawn`).

scikit-learn's digits were written on forms and scanned; what reaches the service from a user is
a few strokes on a canvas or a photo of a note. Those differ from the training set in ways its
held-out figure cannot show: no crossbar on a 7, a 1 with or without its flag and base, an open or
a closed 4, thin or thick lines, slanted or upright. This module draws every digit in several such
styles from hand-written strokes (no font, no data file: the same pictures on every machine),
at several line widths, slants and widths, and runs them through the service's own picture
preprocessing (models/image_encoding.py `grid_from_grey`). Nothing here trains a model: the set
only checks one (`train-image` and `cv-image` record its figure as `drawn_accuracy`; `check-drawn`
scores a bundle through onnxruntime and lists what it misread).

Strokes are polylines in a unit box (x to the right, y down); curves are sampled arcs of ellipses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from models.image_encoding import grid_from_grey

Point = tuple[float, float]
Stroke = list[Point]


def arc(cx: float, cy: float, rx: float, ry: float, start_degrees: float, end_degrees: float, points: int = 24) -> Stroke:
    """Points of an ellipse's arc from one angle to another (0 = right, 90 = down: y grows downwards)."""
    angles = np.linspace(math.radians(start_degrees), math.radians(end_degrees), points)
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


# Each digit in two or three styles that people use; every style is a list of strokes.
STYLES: dict[str, dict[str, list[Stroke]]] = {
    "0": {
        "oval": [arc(0.5, 0.5, 0.32, 0.46, -90, 270)],
        "round": [arc(0.5, 0.5, 0.42, 0.46, -90, 270)],
    },
    "1": {
        "stem": [[(0.5, 0.04), (0.5, 0.96)]],
        "flag": [[(0.28, 0.28), (0.55, 0.04), (0.55, 0.96)]],
        "flag and base": [[(0.3, 0.26), (0.55, 0.04), (0.55, 0.96)], [(0.3, 0.96), (0.8, 0.96)]],
    },
    "2": {
        "curved": [arc(0.5, 0.3, 0.32, 0.26, 190, 360) + arc(0.5, 0.3, 0.32, 0.26, 0, 40, 8)
                   + [(0.18, 0.96), (0.86, 0.96)]],
        "steep": [arc(0.5, 0.28, 0.3, 0.24, 200, 380) + [(0.2, 0.95), (0.85, 0.92)]],
    },
    "3": {
        "two bowls": [arc(0.48, 0.27, 0.3, 0.23, 200, 450) + arc(0.48, 0.73, 0.34, 0.23, -90, 160)],
        "flat top": [[(0.18, 0.04), (0.82, 0.04), (0.45, 0.42)] + arc(0.48, 0.69, 0.34, 0.27, -80, 160)],
    },
    "4": {
        "closed": [[(0.68, 0.96), (0.68, 0.04), (0.14, 0.66), (0.88, 0.66)]],
        "open": [[(0.22, 0.04), (0.16, 0.62), (0.88, 0.62)], [(0.68, 0.3), (0.68, 0.96)]],
    },
    "5": {
        "hooked": [[(0.82, 0.04), (0.28, 0.04), (0.22, 0.44)] + arc(0.47, 0.67, 0.34, 0.28, -125, 150)],
        "two strokes": [[(0.26, 0.04), (0.2, 0.46)] + arc(0.47, 0.67, 0.34, 0.28, -125, 150), [(0.26, 0.04), (0.84, 0.04)]],
    },
    "6": {
        "looped": [arc(0.9, 0.62, 0.68, 0.58, 235, 180, 16) + arc(0.5, 0.7, 0.3, 0.26, 180, 540)],
        "straight": [[(0.68, 0.04), (0.22, 0.66)] + arc(0.5, 0.7, 0.3, 0.26, 180, 540)],
    },
    "7": {
        "plain": [[(0.14, 0.04), (0.86, 0.04), (0.4, 0.96)]],
        "crossbar": [[(0.14, 0.04), (0.86, 0.04), (0.4, 0.96)], [(0.36, 0.52), (0.82, 0.52)]],
        "curved stem": [[(0.14, 0.04), (0.86, 0.04), (0.72, 0.3), (0.6, 0.55), (0.52, 0.78), (0.48, 0.96)]],
    },
    "8": {
        "two loops": [arc(0.5, 0.26, 0.26, 0.22, 0, 360), arc(0.5, 0.72, 0.32, 0.24, 0, 360)],
        "figure": [arc(0.5, 0.26, 0.26, 0.22, 90, -270)[:-1] + arc(0.5, 0.72, 0.32, 0.24, -90, 270)],
    },
    "9": {
        "straight stem": [arc(0.48, 0.3, 0.3, 0.26, 0, 360), [(0.78, 0.3), (0.72, 0.96)]],
        "curved stem": [arc(0.48, 0.3, 0.3, 0.26, 0, 360), arc(0.1, 0.3, 0.68, 0.66, 0, 80, 16)],
    },
}

LINE_WIDTHS = (0.04, 0.08, 0.14)  # of the digit's height: a fine pen, a marker, a thick brush
SLANTS = (-0.25, 0.0, 0.25)  # x moves by slant * (0.5 - y): positive leans to the right, as handwriting does
WIDTHS = (0.6, 1.0)  # the digit's width against its height


@dataclass(frozen=True)
class DrawnDigit:
    label: str
    style: str
    line_width: float
    slant: float
    width: float

    @property
    def name(self) -> str:
        return f"{self.label} {self.style}, line {self.line_width:g}, slant {self.slant:+g}, width {self.width:g}"


def variants() -> Iterator[DrawnDigit]:
    for label, styles in STYLES.items():
        for style in styles:
            for line_width in LINE_WIDTHS:
                for slant in SLANTS:
                    for width in WIDTHS:
                        yield DrawnDigit(label, style, line_width, slant, width)


def picture(digit: DrawnDigit, height: int = 160) -> np.ndarray:
    """The digit drawn dark on white paper: a grey image (H, W) in [0, 1], as a canvas would send it."""
    from PIL import Image, ImageDraw

    margin = height // 4
    width = int(height * digit.width)
    canvas = Image.new("L", (width + 2 * margin + height // 2, height + 2 * margin), 255)
    draw = ImageDraw.Draw(canvas)
    pen = max(1, round(digit.line_width * height))
    for stroke in STYLES[digit.label][digit.style]:
        points = [(margin + height // 4 + (x + digit.slant * (0.5 - y)) * width, margin + y * height) for x, y in stroke]
        draw.line(points, fill=0, width=pen, joint="curve")
        for x, y in (points[0], points[-1]):  # round pen ends
            draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=0)
    return np.asarray(canvas, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=1)  # drawn once per process (a second or so); callers only read it
def drawn_grids() -> tuple[np.ndarray, list[str], list[str]]:
    """Every variant as the service reads it: 8x8 grids of ink in [0, 16] (N, 8, 8), labels, names."""
    digits = list(variants())
    grids = np.stack([grid_from_grey(picture(digit)) for digit in digits])
    return grids, [digit.label for digit in digits], [digit.name for digit in digits]


def check_bundle(bundle_path, device: str = "cpu") -> dict:
    """An image bundle scored on the drawn set through onnxruntime, as the service reads pictures:
    {"model", "drawn_accuracy", "n", "missed": ["7 plain, line 0.04, slant -0.25, width 0.6 -> 3", ...]}."""
    from services.backends.inference import ImageClassifier, read_bundle

    classifier = ImageClassifier(read_bundle(bundle_path), device=device)
    grids, labels, names = drawn_grids()
    predicted = [classifier.labels[i] for i in classifier.probabilities(grids).argmax(axis=1)]
    missed = [f"{name} -> {guess}" for name, label, guess in zip(names, labels, predicted) if guess != label]
    return {"model": classifier.bundle.name, "drawn_accuracy": 1 - len(missed) / len(names), "n": len(names), "missed": missed}
