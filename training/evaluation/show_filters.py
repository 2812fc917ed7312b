"""`python -m training show-filters --bundle models/zoo/digits-cnn`: what does the CNN learn?

One PNG with three rows, as in the lecture notes:
- the held-out digit, as the model sees it;
- the first layer's 3x3 filters, each a small pattern (bright: weights that respond to ink);
- the first layer's feature maps for that digit (after ReLU): where each pattern fires.

The filters are read from the bundle's ONNX graph (its first Conv's weights) and the maps
computed from them with numpy, so the picture shows exactly what the served model holds. In an
ensemble (train-image --members) the first Conv is the first member's: the picture says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from models.image_encoding import ImageEncoder
from training.data.image_data import digits


def first_convolution(model_path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(weights (C, 1, k, k), bias (C,), padding) of the graph's first Conv node."""
    graph = onnx.load(str(model_path)).graph
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    conv = next(node for node in graph.node if node.op_type == "Conv")
    pads = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
    return initializers[conv.input[1]], initializers[conv.input[2]], pads[0]


def feature_maps(image: np.ndarray, weights: np.ndarray, bias: np.ndarray, padding: int) -> np.ndarray:
    """image (S, S) -> ReLU(conv) maps (C, S', S'): each filter slid over the image."""
    padded = np.pad(image, padding)
    k = weights.shape[-1]
    side = padded.shape[0] - k + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k))[:side, :side]  # (S', S', k, k)
    return np.maximum(0.0, np.einsum("ijab,cab->cij", windows, weights[:, 0]) + bias[:, None, None])


def show_filters(bundle: Path, digit_index: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = json.loads((bundle / "config.json").read_text())
    encoder = ImageEncoder.from_config(config["encoding"])
    _, (test_grids, test_labels), _ = digits()
    image = encoder.encode(test_grids[digit_index: digit_index + 1])[0, 0]
    weights, bias, padding = first_convolution(bundle / "model.onnx")
    maps = feature_maps(image, weights, bias, padding)
    columns = int(np.ceil(len(weights) / 2))
    figure, axes = plt.subplots(5, columns, figsize=(columns * 0.9, 5 * 0.95))
    for axis in axes.flat:
        axis.axis("off")
    axes[0, 0].imshow(image, cmap="gray_r")
    axes[0, 0].set_title(f"digit {test_labels[digit_index]}", fontsize=7)
    limit = np.abs(weights).max()
    for index, (kernel, fmap) in enumerate(zip(weights[:, 0], maps)):
        row, column = divmod(index, columns)
        axes[1 + row, column].imshow(kernel, cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[3 + row, column].imshow(fmap, cmap="magma")
    axes[1, 0].set_title("first-layer filters (red: +, blue: -)", fontsize=7, loc="left")
    axes[3, 0].set_title("their feature maps for this digit (ReLU)", fontsize=7, loc="left")
    members = config.get("ensemble", {}).get("members", 1)
    whose = f" (member 1 of {members})" if members > 1 else ""
    figure.suptitle(f"{config['name']}: what the first layer{whose} learned", fontsize=9)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
