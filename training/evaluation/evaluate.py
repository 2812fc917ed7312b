"""Score a released bundle on a labelled file through onnxruntime: the service's own code path
(services.backends.inference), so a figure printed here is what the service would answer."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.text_encoding import scoring_stream
from services.backends.inference import TextClassifier, read_bundle
from services.backends.language_model import CharLanguageModel
from training.data.datasets import LabelledText, first_unknown_label


def evaluate_classifier(
    bundle_path: str | Path, examples: Sequence[LabelledText], batch_size: int = 256, device: str = "cpu",
    out: Path | None = None,
) -> dict:
    """{"model", "accuracy", "n"} of the bundle on `examples`; with `out`, also one JSON line per
    example there: its text, gold label, predicted label and every label's probability."""
    classifier = TextClassifier(read_bundle(bundle_path), device=device)
    label_ids = {label: i for i, label in enumerate(classifier.labels)}
    unknown = first_unknown_label(examples, classifier.labels,
                                  "evaluate on data labelled with the model's labels (the --format it was trained with)")
    if unknown:
        raise unknown
    targets = np.array([label_ids[e.label] for e in examples])
    probabilities = np.concatenate(
        [
            classifier.probabilities([e.text for e in examples[start : start + batch_size]])
            for start in range(0, len(examples), batch_size)
        ]
    )  # (N, K)
    predictions = probabilities.argmax(axis=1)
    if out is not None:
        with open(out, "w", encoding="utf-8") as lines:
            for example, row, predicted in zip(examples, probabilities, predictions):
                lines.write(json.dumps({"text": example.text, "gold": example.label, "predicted": classifier.labels[predicted],
                                        "probabilities": dict(zip(classifier.labels, map(float, row)))}, ensure_ascii=False) + "\n")
    return {"model": classifier.bundle.name, "accuracy": float((predictions == targets).mean()), "n": len(examples),
            **({"out": str(out)} if out is not None else {})}


def evaluate_language_model(bundle_path: str | Path, tokens: list[str], device: str = "cpu") -> dict:
    """{"model", "perplexity", "tokens"} of a bundle on a token stream through onnxruntime, the
    whole file read as one stream with the state carried, exactly as training validates."""
    served = CharLanguageModel(read_bundle(bundle_path), device=device)
    input_chars, targets = scoring_stream(tokens, served.vocab, served.chars)
    return {"model": served.name, "perplexity": math.exp(-served.stream_log_probs(input_chars, targets).mean()),
            "tokens": len(targets)}
