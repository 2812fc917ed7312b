"""Score a released bundle on a labelled file through onnxruntime: the service's own code path
(services.backends.inference), so a figure printed here is what the service would answer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import math

import numpy as np

from models.text_encoding import scoring_stream
from services.backends.inference import TextClassifier, read_bundle
from services.backends.language_model import CharLanguageModel
from training.datasets import LabelledText, first_unknown_label


def evaluate_classifier(
    bundle_path: str | Path, examples: Sequence[LabelledText], batch_size: int = 256, device: str = "cpu"
) -> dict:
    """{"model", "accuracy", "n"} of the bundle on `examples`."""
    classifier = TextClassifier(read_bundle(bundle_path), device=device)
    label_ids = {label: i for i, label in enumerate(classifier.labels)}
    unknown = first_unknown_label(examples, classifier.labels,
                                  "evaluate on data labelled with the model's labels (the --format it was trained with)")
    if unknown:
        raise unknown
    targets = np.array([label_ids[e.label] for e in examples])
    predictions = np.concatenate(
        [
            classifier.logits([e.text for e in examples[start : start + batch_size]]).argmax(axis=1)
            for start in range(0, len(examples), batch_size)
        ]
    )
    return {"model": classifier.bundle.name, "accuracy": float((predictions == targets).mean()), "n": len(examples)}


def evaluate_language_model(bundle_path: str | Path, tokens: list[str], device: str = "cpu") -> dict:
    """{"model", "perplexity", "tokens"} of a bundle on a token stream through onnxruntime, the
    whole file read as one stream with the state carried, exactly as training validates."""
    served = CharLanguageModel(read_bundle(bundle_path), device=device)
    input_chars, targets = scoring_stream(tokens, served.vocab, served.chars)
    return {"model": served.name, "perplexity": math.exp(-served.stream_log_probs(input_chars, targets).mean()),
            "tokens": len(targets)}
