"""Export the character-aware language model: two graphs, a parity gate with the state carried,
and a bundle.

    checkpoint -> step.onnx          char_ids (B, T, W), h, c (L, B, H) -> logits (B, T, V), h_out, c_out
               -> word_encoder.onnx  char_ids (N, W) -> cnn (N, F), highway (N, F)
               -> parity against PyTorch (below) -> bundle folder with a sha256 manifest

Batch and time are symbolic in the step graph (the legacy exporter; torch 2.13's default one
froze this model's time axis in a trial), the word width is the training width. The gate runs
at batch sizes and lengths other than the export example's (2 x 5):
  - the whole given validation text as one stream (batch 1, chunks of 700, state carried):
    onnxruntime's perplexity within 0.1 % of PyTorch's;
  - three streams side by side in chunks of 23: every logit within 1e-4, state carried;
  - word vectors of vocabulary words and of strings never seen: within 1e-4.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from models.text_encoding import LanguageModelVocab, WordCharEncoder, scoring_stream
from services.backends.bundle_format import FORMAT_VERSION as BUNDLE_FORMAT
from services.backends.inference import read_bundle
from services.backends.language_model import STEP_GRAPH, WORD_ENCODER_GRAPH, CharLanguageModel
from training.bundles.export_classifier import (
    OPSET, STORAGE_CHOICES, ExportRefused, check_exported_graph, round_weights_to_half, store_initializers_as_half,
)
from training.bundles.writing import staged_bundle, write_json, write_manifest
from training.jobs.language_model import ARCHITECTURE, load_language_model, stream_perplexity

PERPLEXITY_RTOL = 1e-3  # 0.1 %
LOGIT_ATOL = 1e-4
VECTOR_ATOL = 1e-4
FLOAT16_MAX_PERPLEXITY_RISE = 1e-3  # storage auto: float16 unless rounding costs more than 0.1 % perplexity (the zoo's: +0.0016 %)
UNSEEN_WORDS = ("computer-aided", "misinformed", "looooook", "zürich", "x")


class StepGraph(torch.nn.Module):
    """The model with its state as two plain inputs and outputs, for the exporter."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, char_ids: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, (h_out, c_out) = self.model(char_ids, (h, c))
        return logits, h_out, c_out


class WordEncoderGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, char_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.word_vectors(char_ids)


def export_graphs(model: torch.nn.Module, folder: Path) -> None:
    with warnings.catch_warnings():
        # The exporter warns that an LSTM exported at batch 2 may fail at other batch sizes
        # unless h0/c0 are inputs; here they are, and the parity gate runs batches of 1 and 3.
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        export_both_graphs(model, folder)


def export_both_graphs(model: torch.nn.Module, folder: Path) -> None:
    config = model.config
    example_chars = torch.arange(2 * 5 * config.word_width).reshape(2, 5, -1) % (config.num_chars - 1) + 1  # (2, 5, W)
    h, c = model.initial_state(2)
    step_axes = {"char_ids": {0: "batch", 1: "steps"}, "h": {1: "batch"}, "c": {1: "batch"},
                 "logits": {0: "batch", 1: "steps"}, "h_out": {1: "batch"}, "c_out": {1: "batch"}}
    torch.onnx.export(StepGraph(model).eval(), (example_chars, h, c), str(folder / STEP_GRAPH), dynamo=False,
                      opset_version=OPSET, input_names=["char_ids", "h", "c"], output_names=["logits", "h_out", "c_out"],
                      dynamic_axes=step_axes)
    check_exported_graph(folder / STEP_GRAPH, step_axes)
    word_axes = {"char_ids": {0: "words"}, "cnn": {0: "words"}, "highway": {0: "words"}}
    torch.onnx.export(WordEncoderGraph(model).eval(), (example_chars[0],), str(folder / WORD_ENCODER_GRAPH), dynamo=False,
                      opset_version=OPSET, input_names=["char_ids"], output_names=["cnn", "highway"], dynamic_axes=word_axes)
    check_exported_graph(folder / WORD_ENCODER_GRAPH, word_axes)


@torch.no_grad()
def parity_check(model: torch.nn.Module, served: CharLanguageModel, input_chars: np.ndarray, targets: np.ndarray) -> dict:
    torch_perplexity, tokens = stream_perplexity(model, input_chars, targets)
    onnx_perplexity = math.exp(-served.stream_log_probs(input_chars, targets).mean())
    relative = abs(onnx_perplexity / torch_perplexity - 1)
    if relative > PERPLEXITY_RTOL:
        raise ExportRefused(f"perplexity {onnx_perplexity:.3f} in onnxruntime, {torch_perplexity:.3f} in PyTorch "
                            f"({relative:.2%} apart; at most {PERPLEXITY_RTOL:.1%})")

    rows, chunk = 3, 23  # three streams side by side, a length the export never saw
    usable = min(len(targets) // rows, 10 * chunk)
    streams = input_chars[: rows * usable].reshape(rows, usable, -1)
    state = model.initial_state(rows)
    h, c = served.initial_state(rows)
    worst_logit = 0.0
    for start in range(0, usable, chunk):
        expected, state = model(torch.from_numpy(streams[:, start : start + chunk]), state)
        logits, h, c = served.step(np.ascontiguousarray(streams[:, start : start + chunk]), h, c)
        worst_logit = max(worst_logit, float(np.abs(logits - expected.numpy()).max()))
    if worst_logit > LOGIT_ATOL:
        raise ExportRefused(f"step graph logits differ from PyTorch by {worst_logit:.2e} (at most {LOGIT_ATOL:g})")

    words = [*served.vocab.words[:500], *UNSEEN_WORDS]
    expected_cnn, expected_highway = model.word_vectors(torch.from_numpy(served.chars.encode_words(words)))
    worst_vector = max(float(np.abs(served.vectors(words, "cnn") - expected_cnn.numpy()).max()),
                       float(np.abs(served.vectors(words, "highway") - expected_highway.numpy()).max()))
    if worst_vector > VECTOR_ATOL:
        raise ExportRefused(f"word encoder vectors differ from PyTorch by {worst_vector:.2e} (at most {VECTOR_ATOL:g})")
    return {"valid_perplexity_onnx": onnx_perplexity, "valid_tokens_scored": tokens,
            "parity_perplexity_torch": torch_perplexity, "parity_perplexity_relative_delta": relative,
            "parity_max_abs_logit_delta": worst_logit, "parity_max_abs_vector_delta": worst_vector,
            "parity_perplexity_rtol": PERPLEXITY_RTOL, "parity_logit_atol": LOGIT_ATOL}


def export_language_model(checkpoint: dict, bundle_dir: Path, name: str, valid_tokens: list[str],
                          extra_metrics: dict | None = None, storage: str = "float32") -> dict:
    """Write the bundle for a train-lm checkpoint into `bundle_dir` (replaced only if parity
    passes). `valid_tokens` is the text the gate scores (the validation file). storage "auto" is
    float16 when the rounding raises the validation perplexity by at most FLOAT16_MAX_PERPLEXITY_RISE."""
    if checkpoint.get("architecture") != ARCHITECTURE:
        raise ValueError(f"not a language-model checkpoint (architecture {checkpoint.get('architecture')!r})")
    if storage not in STORAGE_CHOICES:
        raise ValueError(f"unknown storage {storage!r}; expected one of {STORAGE_CHOICES}")
    model = load_language_model(checkpoint)
    vocab = LanguageModelVocab(tuple(checkpoint["vocab"]))
    chars = WordCharEncoder.from_config(checkpoint["encoding"])
    input_chars, targets = scoring_stream(valid_tokens, vocab, chars)
    storage_metrics: dict = {}
    if storage in ("float16", "auto"):
        before, _ = stream_perplexity(model, input_chars, targets)
        unrounded = copy.deepcopy(model.state_dict())
        round_weights_to_half(model)
        after, _ = stream_perplexity(model, input_chars, targets)
        storage_metrics.update(float16_rounding_perplexity_before=before, float16_rounding_perplexity_after=after)
        if storage == "auto":
            rise = after / before - 1
            storage = "float16" if rise <= FLOAT16_MAX_PERPLEXITY_RISE else "float32"
            storage_metrics["weight_storage_chosen_by"] = (
                f"auto: rounding to float16 moved the validation perplexity by {rise:+.4%} (limit +{FLOAT16_MAX_PERPLEXITY_RISE:.1%})")
            if storage == "float32":
                model.load_state_dict(unrounded)
    storage_metrics["weight_storage"] = storage
    with staged_bundle(bundle_dir) as staging:
        export_graphs(model, staging)
        if storage == "float16":
            for graph in (STEP_GRAPH, WORD_ENCODER_GRAPH):
                store_initializers_as_half(staging / graph)
        write_json(staging / "vocab.json", {"words": list(vocab.words)})
        write_json(staging / "config.json", {
            "format": BUNDLE_FORMAT,
            "name": name,
            "architecture": ARCHITECTURE,
            "preset": checkpoint["preset"],
            "model": checkpoint["config"],
            "encoding": checkpoint["encoding"],
            "onnx": {"opset": OPSET, "graphs": {STEP_GRAPH: ["char_ids", "h", "c"], WORD_ENCODER_GRAPH: ["char_ids"]}},
        })
        metrics = {**checkpoint["metrics"], **(extra_metrics or {}), **storage_metrics,
                   "parameters": sum(p.numel() for p in model.parameters())}
        write_json(staging / "metrics.json", metrics)  # provisional, for the parity session
        write_manifest(staging)
        metrics.update(parity_check(model, CharLanguageModel(read_bundle(staging)), input_chars, targets))
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
    return metrics
