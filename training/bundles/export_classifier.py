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

import copy
import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from services.backends.bundle_format import FORMAT_VERSION as BUNDLE_FORMAT
from services.backends.inference import TextClassifier, read_bundle
from training.bundles.graph_passes import PASS_NAME as GRAPH_PASS
from training.bundles.graph_passes import ROUND_TRIPS_PASS_NAME as ROUND_TRIPS_PASS
from training.bundles.graph_passes import conv1d_as_conv2d, drop_height_round_trips
from training.bundles.writing import staged_bundle, write_json, write_manifest
from training.jobs.classifier import batch_tensors, encoder_for, load_model

OPSET = 17
PARITY_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 3, 17, 64)
INPUT_NAMES = ["token_ids", "lengths"]
OUTPUT_NAMES = ["logits"]
EVIDENCE_NAMES = ["window_starts", "contributions"]  # (B, F') int64, (B, K, F') float32


class ExportRefused(RuntimeError):
    """The exported graph does not reproduce the PyTorch model; nothing is written."""


def export_example(encoding: dict) -> tuple[tuple[torch.Tensor, ...], list[str], dict]:
    """Example inputs, input names and dynamic axes for a model with this input encoding."""
    if encoding["kind"] == "chars":
        # Characters arrive at the fixed length l0, so only the batch axis is dynamic; the
        # graph does not read `lengths`, so it is not an input either.
        token_ids = torch.arange(2 * encoding["length"], dtype=torch.int64).reshape(2, -1) % 60 + 1  # (2, l0)
        return (token_ids,), ["token_ids"], {"token_ids": {0: "batch"}, "logits": {0: "batch"}}
    # (2, 10) ids and (2,) lengths; only <pad> = 0 and <unk> = 1 exist in every vocabulary.
    example = batch_tensors([[0, 1, 1, 0, 1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1, 1, 0]])
    return example, INPUT_NAMES, {"token_ids": {0: "batch", 1: "length"}, "lengths": {0: "batch"}, "logits": {0: "batch"}}


class WithEvidence(torch.nn.Module):
    """Exports a model's `forward_with_evidence` (Kim's CNN), so the served graph also answers
    which window won each pooled feature and what each feature adds to each class: /explain
    reads those outputs from onnxruntime, no torch needed."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.forward_with_evidence(*inputs)


STORAGE_TYPES = ("float32", "float16")
STORAGE_CHOICES = ("auto", *STORAGE_TYPES)  # auto: float16 where rounding leaves the answers as they were
HALF_STORAGE_MIN_ELEMENTS = 4096  # smaller tensors stay float32: no size to gain
# auto keeps float16 when rounding the weights changes the predicted class of at most this share
# of the parity texts (the zoo's worst: 3 of 5,452 TREC questions, 0.055 %, all near-ties).
FLOAT16_MAX_ARGMAX_CHANGE_SHARE = 0.001


@torch.no_grad()
def round_weights_to_half(model: torch.nn.Module) -> None:
    """Round every float parameter to the nearest float16 value (kept as float32), so the
    PyTorch reference is exactly what a float16-stored graph computes."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            parameter.copy_(parameter.half().float())


def store_initializers_as_half(path: Path) -> int:
    """Rewrite model.onnx with each large float32 initializer stored as float16 and a Cast back
    to float32 (onnxruntime folds the Cast when it loads the graph, so compute stays float32).
    Returns the number of tensors converted. The weights must already be float16-exact."""
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    casts = []
    for initializer in graph.initializer:
        if initializer.data_type != onnx.TensorProto.FLOAT or np.prod(initializer.dims) < HALF_STORAGE_MIN_ELEMENTS:
            continue
        values = onnx.numpy_helper.to_array(initializer)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            raise ExportRefused(f"initializer {initializer.name} is not float16-exact; round the weights first")
        stored_name = initializer.name + "_float16"
        initializer.CopyFrom(onnx.numpy_helper.from_array(half, stored_name))
        casts.append(onnx.helper.make_node("Cast", [stored_name], [stored_name.removesuffix("_float16")], to=onnx.TensorProto.FLOAT))
    for position, cast in enumerate(casts):
        graph.node.insert(position, cast)
    onnx.checker.check_model(graph_model, full_check=True)
    onnx.save(graph_model, str(path))
    return len(casts)


def output_names(model: torch.nn.Module) -> list[str]:
    return OUTPUT_NAMES + EVIDENCE_NAMES if hasattr(model, "forward_with_evidence") else OUTPUT_NAMES


def export_onnx(model: torch.nn.Module, path: Path, encoding: dict | None = None, opset: int = OPSET) -> list[str]:
    """Export `model` to `path` and apply the graph passes of training/bundles/graph_passes.py (the
    parity check that follows compares the final graph with PyTorch). Returns the passes applied."""
    encoding = encoding or {"kind": "words"}
    example, input_names, dynamic_axes = export_example(encoding)
    names = output_names(model)
    # Eval mode, set here: the exporter keeps whatever mode it is handed, and a fresh wrapper
    # starts in training mode (dropout would be baked into the graph).
    exported = (WithEvidence(model) if names != OUTPUT_NAMES else model).eval()
    torch.onnx.export(
        exported,
        example,
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=input_names,
        output_names=names,
        dynamic_axes={**dynamic_axes, **{name: {0: "batch"} for name in names}},
    )
    check_exported_graph(path, dynamic_axes)
    return apply_graph_passes(path)


def apply_graph_passes(path: Path) -> list[str]:
    """Rewrite the graph at `path` with every pass that applies (training/bundles/graph_passes.py);
    returns their names."""
    graph_model = onnx.load(str(path))
    applied = [name for name, graph_pass in ((GRAPH_PASS, conv1d_as_conv2d), (ROUND_TRIPS_PASS, drop_height_round_trips))
               if graph_pass(graph_model)]
    if applied:
        onnx.save(graph_model, str(path))
    return applied


def check_exported_graph(path: Path, dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Refuse a graph that fails onnx's checker, froze a dynamic input axis to the example's
    size, or keeps its weights outside the file."""
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


def same_windows(model, inputs, expected: np.ndarray, actual: np.ndarray, fired: np.ndarray) -> bool:
    """Whether onnxruntime's winning window of every fired feature is PyTorch's, or one that
    PyTorch scores the same within PARITY_ATOL: a tie (the same n-gram twice in a text, say)
    that float rounding breaks one way in one runtime and the other way in the other, seen on
    one CPU and not another. Either window is then an equally true explanation."""
    differ = np.argwhere(fired & (expected != actual))  # (n, 2): row, feature
    if not len(differ):
        return True
    with torch.no_grad():
        scores = model.window_scores(*inputs)  # per width: (B, F, windows)
    per_width = model.config.feature_maps
    for row, feature in differ:
        maps = scores[feature // per_width][row, feature % per_width]  # (windows,)
        if actual[row, feature] >= maps.shape[0]:
            return False
        if abs(float(maps[expected[row, feature]]) - float(maps[actual[row, feature]])) > PARITY_ATOL:
            return False
    return True


def parity_check(model: torch.nn.Module, classifier: TextClassifier, texts: Sequence[str]) -> dict:
    """Compare PyTorch and onnxruntime on `texts` cut into several batch sizes: logits, and the
    evidence outputs where the graph has them. Each batch mixes short and long texts, so rows
    are padded far past their own length."""
    encoder = classifier.encoder
    with_evidence = classifier.explainable
    worst = 0.0
    compared = 0
    for batch_size in PARITY_BATCH_SIZES:
        for start in range(0, min(len(texts), 4 * batch_size), batch_size):
            batch = list(texts[start : start + batch_size])
            token_ids, lengths = encoder.encode_batch(batch)
            inputs = (torch.from_numpy(token_ids), torch.from_numpy(lengths))
            with torch.no_grad():
                expected = model.forward_with_evidence(*inputs) if with_evidence else (model(*inputs),)
            actual = classifier.evidence(batch)[2:] if with_evidence else (classifier.logits(batch),)
            expected = [tensor.numpy() for tensor in expected]
            delta = float(np.abs(expected[0] - actual[0]).max())
            same_argmax = np.array_equal(expected[0].argmax(1), actual[0].argmax(1))
            if delta > PARITY_ATOL or not same_argmax:
                raise ExportRefused(
                    f"onnxruntime differs from PyTorch at batch size {batch_size}: max |delta logit| {delta:.2e} "
                    f"(limit {PARITY_ATOL:.0e}), argmax equal: {same_argmax}"
                )
            if with_evidence:
                fired = np.abs(expected[2]).sum(axis=1) > 0  # (B, F'): ties among silent features do not matter
                if not same_windows(model, inputs, expected[1], actual[1], fired) or \
                        not np.allclose(expected[2], actual[2], atol=PARITY_ATOL):
                    raise ExportRefused(f"onnxruntime's evidence outputs differ from PyTorch at batch size {batch_size}")
            worst = max(worst, delta)
            compared += len(batch)
    return {"parity_max_abs_logit_delta": worst, "parity_texts": compared, "parity_atol": PARITY_ATOL}


@torch.no_grad()
def rounding_effect(model: torch.nn.Module, encoder, texts: Sequence[str]) -> dict:
    """How much rounding the weights to float16 moves the model on real texts."""
    rounded = copy.deepcopy(model)
    round_weights_to_half(rounded)
    worst, flips = 0.0, 0
    for start in range(0, len(texts), 256):
        token_ids, lengths = encoder.encode_batch(list(texts[start : start + 256]))
        inputs = (torch.from_numpy(token_ids), torch.from_numpy(lengths))
        before, after = model(*inputs), rounded(*inputs)
        worst = max(worst, float((before - after).abs().max()))
        flips += int((before.argmax(1) != after.argmax(1)).sum())
    return {"float16_rounding_max_abs_logit_delta": worst, "float16_rounding_argmax_changes": flips, "float16_rounding_texts": len(texts)}


def ensemble_config(checkpoint: dict) -> dict:
    """config.json's `ensemble` field for a checkpoint of several members (train --members), else nothing."""
    members = checkpoint.get("member_state_dicts")
    if not members:
        return {}
    return {"ensemble": {"members": len(members), "combine": "mean-logits", "seeds": checkpoint["metrics"]["member_seeds"]}}


def export_bundle(
    checkpoint: dict,
    bundle_dir: Path,
    name: str,
    parity_texts: Sequence[str],
    extra_metrics: dict | None = None,
    storage: str = "float32",
) -> dict:
    """Write the bundle for `checkpoint` into `bundle_dir` (replaced only if parity passes).

    storage "float16" halves model.onnx: the weights are rounded to float16 (the effect on the
    logits of `parity_texts` is measured and recorded), stored as float16 and computed in float32.
    "auto" is float16 when the rounding changes the argmax of at most
    FLOAT16_MAX_ARGMAX_CHANGE_SHARE of `parity_texts`, float32 otherwise."""
    if storage not in STORAGE_CHOICES:
        raise ValueError(f"unknown storage {storage!r}; expected one of {STORAGE_CHOICES}")
    model = load_model(checkpoint)
    storage_metrics = {}
    if storage in ("float16", "auto"):
        storage_metrics.update(rounding_effect(model, encoder_for(checkpoint), parity_texts))
        if storage == "auto":
            changed = storage_metrics["float16_rounding_argmax_changes"]
            storage = "float16" if changed <= FLOAT16_MAX_ARGMAX_CHANGE_SHARE * len(parity_texts) else "float32"
            storage_metrics["weight_storage_chosen_by"] = (
                f"auto: rounding to float16 changed {changed} of {len(parity_texts)} predictions "
                f"(limit {FLOAT16_MAX_ARGMAX_CHANGE_SHARE:.1%})")
        if storage == "float16":
            round_weights_to_half(model)
    storage_metrics["weight_storage"] = storage
    with staged_bundle(bundle_dir) as staging:
        graph_passes = export_onnx(model, staging / "model.onnx", checkpoint["encoding"])
        if storage == "float16":
            store_initializers_as_half(staging / "model.onnx")
        if checkpoint.get("vocab"):
            encoder_for(checkpoint).vocab.save(staging / "vocab.json")
        write_json(staging / "labels.json", list(checkpoint["labels"]))
        write_json(
            staging / "config.json",
            {
                "format": BUNDLE_FORMAT,
                "name": name,
                "architecture": checkpoint.get("architecture", "kim-cnn"),
                "preset": checkpoint.get("preset", "rand"),
                "model": checkpoint["config"],
                "encoding": checkpoint["encoding"],
                "onnx": {"opset": OPSET, "inputs": export_example(checkpoint["encoding"])[1], "outputs": output_names(model),
                         "graph_passes": graph_passes},
                **ensemble_config(checkpoint),
            },
        )
        metrics = {**checkpoint["metrics"], **(extra_metrics or {}), **storage_metrics,
                   "parameters": sum(p.numel() for p in model.parameters())}
        write_json(staging / "metrics.json", metrics)  # provisional, for the parity session
        write_manifest(staging)
        shuffled = list(parity_texts)
        random.Random(0).shuffle(shuffled)
        metrics.update(parity_check(model, TextClassifier(read_bundle(staging)), shuffled))
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
    return metrics


def optimize_bundle(bundle_dir: Path, texts: Sequence[str]) -> dict:
    """Apply the graph passes to a released classifier bundle's model.onnx (for bundles exported
    before a pass existed; new exports get them in export_onnx). The rewritten graph must give the
    original's logits on `texts` (max |delta| <= PARITY_ATOL, the same argmax), else nothing changes."""
    original = TextClassifier(read_bundle(bundle_dir))
    with staged_bundle(bundle_dir, copy_from=bundle_dir) as staging:
        applied = apply_graph_passes(staging / "model.onnx")
        if not applied:
            raise ExportRefused(f"{bundle_dir}: no graph pass applies (no 1-D convolution, no 3-D step between 2-D ones); the bundle is unchanged")
        config = json.loads((staging / "config.json").read_text())
        passes = config["onnx"].get("graph_passes", [])
        config["onnx"]["graph_passes"] = passes + [name for name in applied if name not in passes]
        write_json(staging / "config.json", config)
        write_manifest(staging)
        rewritten = TextClassifier(read_bundle(staging))
        worst = 0.0
        for start in range(0, len(texts), 64):
            batch = list(texts[start : start + 64])
            before, after = original.logits(batch), rewritten.logits(batch)
            worst = max(worst, float(np.abs(before - after).max()))
            if worst > PARITY_ATOL or not np.array_equal(before.argmax(axis=1), after.argmax(axis=1)):
                raise ExportRefused(f"{bundle_dir}: the rewritten graph differs from the original by {worst:.2e} "
                                    f"(allowed {PARITY_ATOL:g}) or changes a prediction; the bundle is unchanged")
        metrics = {**json.loads((staging / "metrics.json").read_text()),
                   "graph_pass_max_abs_logit_delta": worst, "graph_pass_texts": len(texts)}
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
    return metrics
