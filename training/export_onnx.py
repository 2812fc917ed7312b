"""Export a trained classifier to ONNX, prove parity with PyTorch, and write a model bundle.

checkpoint -> model.onnx (legacy TorchScript exporter, opset 17, one self-contained file,
symbolic batch and length) -> parity on real texts at batch sizes and lengths other than the
export example (max |delta logit| <= 1e-4 and identical argmax, else refused) -> bundle folder
with a sha256 manifest.

Why the legacy exporter: torch 2.13's default (dynamo) exporter writes the weights to a
separate .data file and has silently frozen a dynamic axis to the example's size in a trial;
the legacy one keeps `dynamic_axes` symbolic for every model here (models.md, export notes).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from services.inference import MANIFEST, TextClassifier, read_bundle, sha256_file
from training.train_classifier import batch_tensors, encoder_for, load_model

OPSET = 17
PARITY_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 3, 17, 64)
INPUT_NAMES = ["token_ids", "lengths"]
OUTPUT_NAMES = ["logits"]


class ExportRefused(RuntimeError):
    """The exported graph does not reproduce the PyTorch model; nothing is written."""


def export_example(encoding: dict) -> tuple[tuple[torch.Tensor, ...], list[str], dict]:
    """Example inputs, input names and dynamic axes for a model with this input encoding."""
    if encoding["kind"] == "chars":
        # Characters arrive at the fixed length l0, so only the batch axis is dynamic; the
        # graph does not read `lengths`, so it is not an input either.
        token_ids = torch.arange(2 * encoding["length"], dtype=torch.int64).reshape(2, -1) % 60 + 1  # (2, l0)
        return (token_ids,), ["token_ids"], {"token_ids": {0: "batch"}, "logits": {0: "batch"}}
    example = batch_tensors([[2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [2, 3, 4, 5, 6, 7, 8, 9]])  # (2, 10) ids, (2,) lengths
    return example, INPUT_NAMES, {"token_ids": {0: "batch", 1: "length"}, "lengths": {0: "batch"}, "logits": {0: "batch"}}


def export_onnx(model: torch.nn.Module, path: Path, encoding: dict | None = None, opset: int = OPSET) -> None:
    encoding = encoding or {"kind": "words"}
    example, input_names, dynamic_axes = export_example(encoding)
    torch.onnx.export(
        model,
        example,
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=input_names,
        output_names=OUTPUT_NAMES,
        dynamic_axes=dynamic_axes,
    )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    for tensor in graph.graph.input:
        dims = tensor.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and axis in dynamic_axes[tensor.name]:
                frozen = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
                raise ExportRefused(f"input {tensor.name} has its dynamic axis {axis} frozen in the exported graph: {frozen}")
    if any(path.parent.glob(path.name + ".data")) or any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in graph.graph.initializer
    ):
        raise ExportRefused("the exported graph keeps weights outside model.onnx")


def parity_check(model: torch.nn.Module, classifier: TextClassifier, texts: Sequence[str]) -> dict:
    """Compare PyTorch and onnxruntime logits on `texts` cut into several batch sizes.

    Each batch mixes short and long texts, so rows are padded far past their own length."""
    encoder = classifier.encoder
    worst = 0.0
    compared = 0
    for batch_size in PARITY_BATCH_SIZES:
        for start in range(0, min(len(texts), 4 * batch_size), batch_size):
            batch = list(texts[start : start + batch_size])
            token_ids, lengths = encoder.encode_batch(batch)
            with torch.no_grad():
                expected = model(torch.from_numpy(token_ids), torch.from_numpy(lengths)).numpy()
            actual = classifier.logits(batch)
            delta = float(np.abs(expected - actual).max())
            if delta > PARITY_ATOL or not np.array_equal(expected.argmax(1), actual.argmax(1)):
                raise ExportRefused(
                    f"onnxruntime differs from PyTorch at batch size {batch_size}: max |delta logit| {delta:.2e} "
                    f"(limit {PARITY_ATOL:.0e}), argmax equal: {np.array_equal(expected.argmax(1), actual.argmax(1))}"
                )
            worst = max(worst, delta)
            compared += len(batch)
    return {"parity_max_abs_logit_delta": worst, "parity_texts": compared, "parity_atol": PARITY_ATOL}


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def export_bundle(
    checkpoint: dict,
    bundle_dir: Path,
    name: str,
    parity_texts: Sequence[str],
    extra_metrics: dict | None = None,
) -> dict:
    """Write the bundle for `checkpoint` into `bundle_dir` (replaced only if parity passes)."""
    model = load_model(checkpoint)
    # A hidden sibling: the zoo ignores it, so a run killed halfway never leaves a servable half-bundle.
    staging = bundle_dir.with_name("." + bundle_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        export_onnx(model, staging / "model.onnx", checkpoint["encoding"])
        if checkpoint.get("vocab"):
            encoder_for(checkpoint).vocab.save(staging / "vocab.json")
        write_json(staging / "labels.json", list(checkpoint["labels"]))
        write_json(
            staging / "config.json",
            {
                "name": name,
                "architecture": checkpoint.get("architecture", "kim-cnn"),
                "preset": checkpoint.get("preset", "rand"),
                "model": checkpoint["config"],
                "encoding": checkpoint["encoding"],
                "onnx": {"opset": OPSET, "inputs": export_example(checkpoint["encoding"])[1], "outputs": OUTPUT_NAMES},
            },
        )
        metrics = {**checkpoint["metrics"], **(extra_metrics or {})}
        write_json(staging / "metrics.json", metrics)  # provisional, for the parity session
        write_manifest(staging)
        shuffled = list(parity_texts)
        random.Random(0).shuffle(shuffled)
        metrics.update(parity_check(model, TextClassifier(read_bundle(staging)), shuffled))
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(bundle_dir, ignore_errors=True)
    staging.rename(bundle_dir)
    return metrics


def write_manifest(bundle_dir: Path) -> None:
    files = sorted(p.name for p in bundle_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    write_json(bundle_dir / MANIFEST, {"files": {file: sha256_file(bundle_dir / file) for file in files}})
