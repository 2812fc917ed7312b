"""The inference runner: one onnxruntime session per model, fed by BentoML's adaptive batcher.

Every HTTP worker sends its texts here through `bentoml.depends`, so /classify and OIP v2
requests share one batcher: BentoML merges concurrent calls into one list, we run each model's
share of it as one padded batch, and BentoML splits the answers back per call.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import bentoml
import numpy as np
from pydantic import BaseModel

from services import metrics
from services.config import SETTINGS, resolve_device
from services.explain import explain_texts
from services.inference import TextClassifier
from services.model_store import stored_bundles

WARM_UP_TEXTS = ["Warm-up text one .", "a second , somewhat longer warm-up text for the batch ?"]
logger = logging.getLogger("bentoml.textserve")


class TextItem(BaseModel):
    model: str
    text: str
    sent_at: float  # time.time() when the HTTP worker sent it; gives the queue wait


@bentoml.service(
    name="classifier_runner",
    workers=SETTINGS.runner_workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
)
class ClassifierRunner:
    def __init__(self) -> None:
        device = resolve_device(SETTINGS.device)
        threads = SETTINGS.session_threads()
        self.classifiers: dict[str, TextClassifier] = {}
        for bundle in stored_bundles(SETTINGS):
            classifier = TextClassifier(bundle, device=device, threads=threads)
            classifier.probabilities(WARM_UP_TEXTS)  # first run allocates; readiness waits for it
            self.classifiers[bundle.name] = classifier
            logger.info("loaded %s (sha256 %s) on %s, %d threads", bundle.name, bundle.sha256[:12], device, threads)

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_texts, max_latency_ms=SETTINGS.max_latency_ms)
    def classify_batch(self, items: list[TextItem]) -> list[list[float]]:
        """Probabilities for each item, in the order of `items` (several models may be mixed)."""
        started = time.time()
        metrics.batch_texts.observe(len(items))
        for item in items:
            metrics.queue_wait_seconds.observe(max(0.0, started - item.sent_at))
        rows_by_model: dict[str, list[int]] = defaultdict(list)
        for row, item in enumerate(items):
            rows_by_model[item.model].append(row)
        answers: list[list[float]] = [[] for _ in items]
        for model, rows in rows_by_model.items():
            classifier = self.classifiers.get(model)
            if classifier is None:  # the HTTP worker checks names first; this guards direct calls
                raise bentoml.exceptions.NotFound(f"model {model!r} is not loaded")
            model_started = time.perf_counter()
            probabilities = classifier.probabilities([items[row].text for row in rows])  # (len(rows), K)
            metrics.inference_duration_seconds.labels(model=model).observe(time.perf_counter() - model_started)
            metrics.texts_total.labels(model=model).inc(len(rows))
            for row, row_probabilities in zip(rows, np.asarray(probabilities, dtype=np.float64).tolist()):
                answers[row] = row_probabilities
        return answers

    @bentoml.api
    def explain(self, model: str, texts: list[str], top_k: int) -> list[dict]:
        """Per text: the predicted label and the n-grams that added most to its logit."""
        classifier = self.classifiers.get(model)
        if classifier is None:
            raise bentoml.exceptions.NotFound(f"model {model!r} is not loaded")
        started = time.perf_counter()
        explanations = explain_texts(classifier, texts, top_k)
        metrics.inference_duration_seconds.labels(model=model).observe(time.perf_counter() - started)
        return explanations

    @bentoml.api
    def loaded_models(self) -> list[str]:
        """Names of the models whose sessions are built and warmed up."""
        return sorted(self.classifiers)
