"""An int8 variant of a released bundle: `python -m training quantize --bundle models/zoo/NAME`.

fp32 bundle -> onnxruntime's quant_pre_process (folds the float16 storage casts, so the
quantizer sees float32 initializers) -> onnxruntime quantization -> `NAME-int8` beside it,
written only if it passes its gate. The method follows the graph, as the issue and a trial
decided (dynamic quantization turns Conv into ConvInteger, which made CNNs 2-3.5x slower):

- graphs with convolutions: static QDQ quantization, calibrated (MinMax, per channel) on
  CALIBRATION_TEXTS texts of the bundle's own training split; Conv, Gemm and the embedding
  Gather are quantized, everything else stays float32;
- recurrent classifiers and the language model: dynamic quantization of LSTM, MatMul, Gemm
  and the embedding Gather (weights int8, activations quantized per call). onnxruntime has an
  int8 LSTM (DynamicQuantizeLSTM) but no int8 GRU or vanilla RNN: those bundles are refused,
  since their recurrence, where the time goes, would stay float32.

The gate compares like with like, both through onnxruntime: a classifier's accuracy on the
dev split its training run held out (reproduced from the train command recorded in the bundle,
and checked to reproduce the recorded dev accuracy) may drop at most MAX_ACCURACY_DROP; the
language model's validation perplexity may rise at most MAX_PERPLEXITY_RISE.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from services.backends.inference import LANGUAGE_MODEL_ARCHITECTURE, Bundle, TextClassifier, read_bundle
from services.backends.language_model import STEP_GRAPH, WORD_ENCODER_GRAPH
from training.data.datasets import read_ptb, split_dev
from training.evaluation.evaluate import evaluate_classifier, evaluate_language_model
from training.arguments import recorded
from training.bundles.writing import staged_bundle, write_json, write_manifest

INT8_SUFFIX = "-int8"
MAX_ACCURACY_DROP = 0.005  # 0.5 accuracy points on the dev split
MAX_PERPLEXITY_RISE = 0.01  # 1 % of the fp32 validation perplexity
CALIBRATION_TEXTS = 1024
CALIBRATION_BATCH = 64
STATIC_OPS = ["Conv", "Gemm", "Gather"]
DYNAMIC_OPS = ["LSTM", "MatMul", "Gemm", "Gather"]
FLOAT_ONLY_RECURRENCES = {"GRU", "RNN"}  # no DynamicQuantizeGRU/RNN in onnxruntime
class QuantizationRefused(RuntimeError):
    """The int8 graph costs more accuracy or perplexity than the gate allows; nothing is written."""


def training_split(train_arguments: dict) -> tuple[list, list]:
    """(train, dev) examples exactly as the recorded `train` split them (its data, format, columns,
    dev fraction and seed, as values: training/arguments.py `recorded_arguments`)."""
    from training.arguments import read_examples

    examples = read_examples(argparse.Namespace(**train_arguments))
    return split_dev(examples, dev_fraction=train_arguments["dev_fraction"], seed=train_arguments["seed"])


class EncodedTexts(CalibrationDataReader):
    """Calibration batches: texts encoded by the bundle's own encoder, fed as the graph's inputs."""

    def __init__(self, classifier: TextClassifier, texts: list[str]) -> None:
        names = {graph_input.name for graph_input in classifier.session.get_inputs()}
        batches = []
        for start in range(0, len(texts), CALIBRATION_BATCH):
            token_ids, lengths = classifier.encoder.encode_batch(texts[start : start + CALIBRATION_BATCH])
            batches.append({k: v for k, v in (("token_ids", token_ids), ("lengths", lengths)) if k in names})
        self.batches = iter(batches)

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def graph_ops(onnx_path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(onnx_path)).graph.node}


def quantize_graph(source: Path, target: Path, calibration: CalibrationDataReader | None) -> str:
    """Quantize one graph file; returns a description of the method for the bundle's config."""
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Symbolic shape inference is skipped: the graphs' dynamic axes (batch, length, word
        # length) are all the quantizer needs, and it fails on the LM's state inputs.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        if calibration is not None:
            quantize_static(
                str(prepared), str(target), calibration, quant_format=QuantFormat.QDQ, op_types_to_quantize=STATIC_OPS,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            return f"static QDQ int8 ({', '.join(STATIC_OPS)}; per-channel weights, MinMax calibration)"
        quantize_dynamic(str(prepared), str(target), op_types_to_quantize=DYNAMIC_OPS, weight_type=QuantType.QInt8)
        return f"dynamic int8 ({', '.join(DYNAMIC_OPS)})"


def quantize_classifier(bundle_dir: Path, out_dir: Path, command: str) -> dict:
    source = read_bundle(bundle_dir)
    train_part, dev_part = training_split(recorded(source.metrics, "train", "re-export it from a checkpoint of `train`"))
    fp32 = evaluate_classifier(bundle_dir, dev_part)
    recorded_accuracy = source.metrics["dev_accuracy"]
    if abs(fp32["accuracy"] - recorded_accuracy) > 1.5 / len(dev_part):  # float16 storage may flip one text
        raise QuantizationRefused(
            f"{bundle_dir}: its dev split, reproduced from the recorded train arguments, scores {fp32['accuracy']:.4f}, "
            f"not the recorded {recorded_accuracy:.4f}; the gate would not compare like with like")
    ops = graph_ops(bundle_dir / "model.onnx")
    if ops & FLOAT_ONLY_RECURRENCES:
        raise QuantizationRefused(
            f"{bundle_dir}: onnxruntime has no int8 kernel for {sorted(ops & FLOAT_ONLY_RECURRENCES)}; the recurrence, where "
            "the time goes, would stay float32 (a trial: GRU 1.0x at batch 64, and a larger file)")
    with staged_bundle(out_dir, copy_from=bundle_dir) as staging:
        static = "Conv" in ops
        calibration = None
        if static:
            texts = [example.text for example in train_part[:CALIBRATION_TEXTS]]
            calibration = EncodedTexts(TextClassifier(source), texts)
        method = quantize_graph(bundle_dir / "model.onnx", staging / "model.onnx", calibration)
        metrics = finish_bundle(staging, source, out_dir.name, method, command)
        int8 = evaluate_classifier(staging, dev_part)
        drop = fp32["accuracy"] - int8["accuracy"]
        if drop > MAX_ACCURACY_DROP:
            raise QuantizationRefused(
                f"{out_dir.name}: dev accuracy {int8['accuracy']:.4f} against fp32 {fp32['accuracy']:.4f}, "
                f"a drop of {100 * drop:.2f} points (the gate allows {100 * MAX_ACCURACY_DROP:.1f})")
        metrics.update(dev_accuracy=int8["accuracy"], dev_examples=len(dev_part), fp32_dev_accuracy=fp32["accuracy"],
                       int8_accuracy_drop=drop, calibration_texts=len(train_part[:CALIBRATION_TEXTS]) if static else 0)
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
    return metrics


def validation_tokens(export_arguments: dict) -> list[str]:
    """The validation text the language model's export measured its perplexity on."""
    return read_ptb(export_arguments["data"])


def quantize_language_model(bundle_dir: Path, out_dir: Path, command: str, valid_tokens: list[str] | None = None) -> dict:
    source = read_bundle(bundle_dir)
    valid_tokens = valid_tokens or validation_tokens(recorded(source.metrics, "export", "re-export it with this version"))
    fp32_perplexity = evaluate_language_model(bundle_dir, valid_tokens)["perplexity"]
    with staged_bundle(out_dir, copy_from=bundle_dir) as staging:
        for graph in (STEP_GRAPH, WORD_ENCODER_GRAPH):
            method = quantize_graph(bundle_dir / graph, staging / graph, calibration=None)
        metrics = finish_bundle(staging, source, out_dir.name, method, command)
        int8 = evaluate_language_model(staging, valid_tokens)
        rise = int8["perplexity"] / fp32_perplexity - 1
        if rise > MAX_PERPLEXITY_RISE:
            raise QuantizationRefused(
                f"{out_dir.name}: validation perplexity {int8['perplexity']:.2f} against fp32 {fp32_perplexity:.2f}, "
                f"{100 * rise:.2f} % higher (the gate allows {100 * MAX_PERPLEXITY_RISE:.0f} %)")
        metrics.update(valid_perplexity_onnx=int8["perplexity"], valid_tokens_scored=int8["tokens"],
                       fp32_valid_perplexity=fp32_perplexity, int8_perplexity_rise=rise)
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
    return metrics


def finish_bundle(staging: Path, source: Bundle, name: str, method: str, command: str) -> dict:
    """config.json and metrics.json of the int8 bundle: the fp32 bundle's, renamed, with where
    it came from. Cross-validation figures belong to the fp32 recipe and are not carried over."""
    config = {**source.config, "name": name, "quantization": {"method": method, "of": source.name, "of_sha256": source.sha256}}
    write_json(staging / "config.json", config)
    metrics = {key: value for key, value in source.metrics.items() if not key.startswith(("cv_", "parity_"))}
    metrics.update(quantize_command=command, quantized_from=source.name)
    write_json(staging / "metrics.json", metrics)
    write_manifest(staging)
    return metrics


def quantize_bundle(bundle_dir: Path, command: str, out_dir: Path | None = None, valid_tokens: list[str] | None = None) -> dict:
    """Write `NAME-int8` beside `bundle_dir` (or at `out_dir`); returns its metrics. A language
    model is gated on `valid_tokens`, by default the text its export command validated on."""
    bundle_dir = Path(bundle_dir)
    out_dir = out_dir or bundle_dir.with_name(bundle_dir.name + INT8_SUFFIX)
    if bundle_dir.name.endswith(INT8_SUFFIX):
        raise QuantizationRefused(f"{bundle_dir} is already an int8 bundle")
    config = json.loads((bundle_dir / "config.json").read_text())
    if config.get("architecture") == LANGUAGE_MODEL_ARCHITECTURE:
        return quantize_language_model(bundle_dir, out_dir, command, valid_tokens)
    return quantize_classifier(bundle_dir, out_dir, command)

