"""The work every peer server does for a request, shared so that the servers differ in their
serving layer only: the project's own bundles, encoder and onnxruntime CPU sessions
(services/backends/inference.py, services/backends/language_model.py: numpy + onnxruntime, no
torch), and the same JSON answers as the hand-rolled baseline (loadtests/handrolled_service.py).

A peer runs in a virtualenv of its own (.venv-bench-NAME, from loadtests/peers/requirements-NAME.txt)
and reaches this module and the project's packages through PYTHONPATH=the repository root.

Batching servers hand a peer several requests at once, each with one or more texts: `answer_batch`
flattens them, runs each model once on all of its texts, and splits the answers back per request.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.backends.inference import LANGUAGE_MODEL_ARCHITECTURE, TextClassifier, read_bundle
from services.backends.language_model import CharLanguageModel, ScoredText

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
ZOO = REPOSITORY_ROOT / "models" / "zoo"


class BadRequest(ValueError):
    """A request body that is not {"model": a served model, "texts": [strings, at least one]}."""


@dataclass
class PeerModels:
    """The bundles one peer process (or one Triton instance) serves, each with its own sessions."""

    classifiers: dict[str, TextClassifier] = field(default_factory=dict)
    language_models: dict[str, CharLanguageModel] = field(default_factory=dict)

    @classmethod
    def load(cls, names: Sequence[str], threads: int) -> "PeerModels":
        """`threads`: onnxruntime intra-op threads per session; 0 lets onnxruntime take one per core."""
        models = cls()
        for name in names:
            bundle = read_bundle(ZOO / name)
            if bundle.architecture == LANGUAGE_MODEL_ARCHITECTURE:
                models.language_models[bundle.name] = CharLanguageModel(bundle, threads=threads)
            else:
                models.classifiers[bundle.name] = TextClassifier(bundle, threads=threads)
        return models

    def check(self, body: object) -> tuple[str, list[str]]:
        """(model, texts) of a decoded JSON body, or BadRequest saying what is wrong."""
        if not isinstance(body, dict):
            raise BadRequest('expected a JSON object {"model": ..., "texts": [...]}')
        model, texts = body.get("model"), body.get("texts")
        if model not in self.classifiers and model not in self.language_models:
            raise BadRequest(f"unknown model {model!r}; served: {sorted([*self.classifiers, *self.language_models])}")
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
            raise BadRequest('"texts" must be a non-empty list of strings')
        return model, texts

    def answer_batch(self, requests: Sequence[tuple[str, list[str]]]) -> list[dict]:
        """One answer per (model, texts) request, in order: each model runs once, on the texts of
        every request for it (a batch may mix models: group, run, split back)."""
        answers: list[dict | None] = [None] * len(requests)
        by_model: dict[str, list[int]] = defaultdict(list)
        for index, (model, _) in enumerate(requests):
            by_model[model].append(index)
        for model, indices in by_model.items():
            texts = [text for index in indices for text in requests[index][1]]
            results = (classification_results(self.classifiers[model], texts) if model in self.classifiers
                       else score_results(self.language_models[model].score(texts)))
            start = 0
            for index in indices:
                count = len(requests[index][1])
                answers[index] = {"model": model, "results": results[start : start + count]}
                start += count
        return answers  # type: ignore[return-value]


def classification_results(classifier: TextClassifier, texts: Sequence[str]) -> list[dict]:
    """Label and every label's probability per text, as the hand-rolled baseline answers."""
    labels = classifier.labels
    return [{"label": labels[int(np.argmax(row))], "probabilities": dict(zip(labels, row.tolist()))}
            for row in classifier.probabilities(texts)]


def score_results(scored: Sequence[ScoredText]) -> list[dict]:
    """Tokens, their log-probabilities and the perplexity per text, as the hand-rolled baseline answers."""
    return [{"tokens": text.tokens, "log_probs": text.log_probs.tolist(), "perplexity": text.perplexity} for text in scored]
