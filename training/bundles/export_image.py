"""Export a trained image CNN to ONNX, prove parity with PyTorch, and write a model bundle.

checkpoint -> model.onnx (input `images` float32 (B, 1, S, S), symbolic batch; output `logits`;
an ensemble's graph returns the mean of its members' logits)
-> parity on the held-out images at batch sizes 1, 7 and 64 through the service's own
ImageClassifier (max |delta logit| <= 1e-4 and identical argmax, else refused) -> bundle with a
sha256 manifest (model.onnx, labels.json, config.json, metrics.json).

    python -m training export-image --checkpoint checkpoints/digits-cnn.pt --bundle models/zoo/digits-cnn
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from services.backends.bundle_format import FORMAT_VERSION as BUNDLE_FORMAT
from services.backends.inference import IMAGE_ARCHITECTURE, ImageClassifier, read_bundle
from training.bundles.export_classifier import OPSET, PARITY_ATOL, ExportRefused, ensemble_config
from training.bundles.writing import staged_bundle, write_json, write_manifest
from training.jobs.image import load_image_model

PARITY_BATCH_SIZES = (1, 7, 64)


def export_image_bundle(checkpoint: dict, bundle_dir: Path, name: str, parity_grids: np.ndarray, extra_metrics: dict | None = None) -> dict:
    model = load_image_model(checkpoint)
    side = checkpoint["config"]["input_size"]
    with staged_bundle(bundle_dir) as staging:
        torch.onnx.export(model, (torch.zeros(2, 1, side, side),), str(staging / "model.onnx"), dynamo=False,
                          input_names=["images"], output_names=["logits"], opset_version=OPSET,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        write_json(staging / "labels.json", list(checkpoint["labels"]))
        write_json(staging / "config.json", {
            "format": BUNDLE_FORMAT, "name": name, "architecture": IMAGE_ARCHITECTURE, "preset": checkpoint["preset"], "model": checkpoint["config"],
            "encoding": checkpoint["encoding"], "onnx": {"opset": OPSET, "inputs": ["images"], "outputs": ["logits"]},
            **ensemble_config(checkpoint)})
        metrics = {**checkpoint["metrics"], **(extra_metrics or {}), "parameters": sum(p.numel() for p in model.parameters())}
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
        metrics.update(image_parity(model, ImageClassifier(read_bundle(staging)), parity_grids))
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
    return metrics


def image_parity(model: torch.nn.Module, classifier: ImageClassifier, grids: np.ndarray) -> dict:
    """PyTorch against onnxruntime, through the service's encoder, at several batch sizes."""
    worst, checked = 0.0, 0
    for batch_size in PARITY_BATCH_SIZES:
        images = classifier.encoder.encode(grids[:batch_size])
        with torch.no_grad():
            expected = model(torch.from_numpy(images)).numpy()
        actual = classifier.logits_of_images(images)
        worst = max(worst, float(np.abs(expected - actual).max()))
        checked += len(images)
        if worst > PARITY_ATOL or (expected.argmax(1) != actual.argmax(1)).any():
            raise ExportRefused(f"ONNX logits differ from PyTorch's by {worst:.2e} (limit {PARITY_ATOL:g}) at batch {batch_size}")
    return {"parity_max_abs_logit_delta": worst, "parity_images": checked, "parity_batch_sizes": list(PARITY_BATCH_SIZES)}
