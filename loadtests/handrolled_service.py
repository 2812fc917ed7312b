"""The baseline that `make bench` compares the service with: the FastAPI + uvicorn +
onnxruntime service a team would write by hand in an afternoon. No batching (each request runs
its own texts), no admission control, no metrics; the same bundles and the same torch-free
inference code (services/backends/inference.py, services/backends/language_model.py), so that the comparison
measures the serving layer and nothing else.

    HANDROLLED_MODELS=kim-cnn-trec6,char-lm-small-ptb uvicorn loadtests.handrolled_service:app --port 3200

Endpoints mirror the service's: POST /classify {"model", "texts"} and POST /lm/score
{"model", "texts"}. Handlers are plain `def`, so FastAPI runs them in its thread pool, as its
documentation recommends for blocking work; onnxruntime releases the GIL while it runs.
"""

from __future__ import annotations

import os

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from services.backends.inference import LANGUAGE_MODEL_ARCHITECTURE, TextClassifier, read_bundle
from services.backends.language_model import CharLanguageModel
from services.config import REPOSITORY_ROOT

ZOO = REPOSITORY_ROOT / "models" / "zoo"
THREADS = int(os.environ.get("HANDROLLED_ORT_THREADS", "0"))  # 0: onnxruntime's default, one per core

classifiers: dict[str, TextClassifier] = {}
language_models: dict[str, CharLanguageModel] = {}
for name in os.environ.get("HANDROLLED_MODELS", "kim-cnn-trec6").split(","):
    bundle = read_bundle(ZOO / name.strip())
    if bundle.architecture == LANGUAGE_MODEL_ARCHITECTURE:
        language_models[bundle.name] = CharLanguageModel(bundle, threads=THREADS)
    else:
        classifiers[bundle.name] = TextClassifier(bundle, threads=THREADS)

app = FastAPI(title="hand-rolled baseline")


class TextsRequest(BaseModel):
    model: str
    texts: list[str]


@app.post("/classify")
def classify(request: TextsRequest) -> dict:
    classifier = classifiers.get(request.model)
    if classifier is None:
        raise HTTPException(404, f"unknown model {request.model!r}")
    probabilities = classifier.probabilities(request.texts)
    labels = classifier.labels
    return {"model": request.model, "results": [
        {"label": labels[int(np.argmax(row))], "probabilities": dict(zip(labels, row.tolist()))} for row in probabilities]}


@app.post("/lm/score")
def score(request: TextsRequest) -> dict:
    language_model = language_models.get(request.model)
    if language_model is None:
        raise HTTPException(404, f"unknown language model {request.model!r}")
    return {"model": request.model, "results": [
        {"tokens": text.tokens, "log_probs": text.log_probs.tolist(), "perplexity": text.perplexity}
        for text in language_model.score(request.texts)]}
