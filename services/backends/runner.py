"""The inference runner: the onnxruntime sessions of every model.

The batched calls (classify_batch, classify_image_batch, score_batch) are plain methods fed by
our own IdleDispatchBatcher (batching.py): inline, the HTTP worker's (in_process.py); with the
shared runner, the runner process's, over its Unix socket (shared_runner.py). Each runs every
model's share of a batch as one padded batch. Explain, next words, generation and word vectors
are BentoML APIs called once per request (generation streams its words), in process or through
`bentoml.depends`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import platform
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Generator
from pathlib import Path

import bentoml
import numpy as np

from services import lifecycle, metrics
from services.config import SETTINGS, available_cores, resolve_device
from services.backends.cost_batching import agreed_budget
from services.backends.explain import explain_texts
from services.backends.inference import IMAGE_ARCHITECTURE, LANGUAGE_MODEL_ARCHITECTURE, ImageClassifier, TextClassifier, softmax
from services.backends.language_model import CharLanguageModel
from services.backends.inference import Bundle
from services.backends.model_agreement import Desired, ModelState, state_folder, watch
from services.backends.served_models import ServedModels, reason_of, served
from services.backends.runner_errors import ModelNotLoaded, inference_failure
from services.backends.shared_runner import QueuedItem, RunnerSocketServer, socket_path

WARM_UP_TEXTS = ["Warm-up text one .", "a second , somewhat longer warm-up text for the batch ?"]
logger = logging.getLogger("bentoml.textserve")


@bentoml.service(
    name="model_runner",
    workers=SETTINGS.runner_workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
)
class ModelRunner:
    @lifecycle.stops_server_on_failure
    def __init__(self) -> None:
        self.socket_server: RunnerSocketServer | None = None  # listening only as BentoML's runner process
        device = resolve_device(SETTINGS.device)
        threads = SETTINGS.session_threads()
        self.classifiers: dict[str, TextClassifier] = {}
        self.language_models: dict[str, CharLanguageModel] = {}
        self.image_classifiers: dict[str, ImageClassifier] = {}
        self.device, self.threads = device, threads
        # Sessions by store tag (name:version): while a model is reloaded, its old version's
        # requests still in flight finish on the old sessions (served_models.py).
        to_serve = served(SETTINGS, ModelRunner.bento)  # inline: the HTTP service's answer
        self.model_set = ServedModels({b.name: b for b in to_serve.bundles}, to_serve.failures, set(to_serve.unloaded),
                                   generation=to_serve.generation)
        for name, bundle in list(self.model_set.bundles.items()):
            try:
                self.add_model(self.model_set.tags[name], bundle)
            except Exception as error:  # an unreadable graph, a vocabulary that does not fit it, ...
                if device == "cuda":
                    raise  # on a GPU the cause may be the device: the whole server must say so, not serve a part
                to_serve.failures[name] = reason_of(error)
                del self.model_set.bundles[name], self.model_set.tags[name]
                logger.error("model %s failed to load: %s", name, error)
        self.control: asyncio.Task | None = None

    def add_model(self, tag: str, bundle: Bundle) -> None:
        """Build `bundle`'s sessions and warm them up (the first run allocates), then serve them
        as `tag`; raises if any of that fails, with nothing changed."""
        if bundle.architecture == IMAGE_ARCHITECTURE:
            image_classifier = ImageClassifier(bundle, device=self.device, threads=self.threads)
            image_classifier.probabilities(np.zeros((2, 8, 8), dtype=np.float32))
            self.image_classifiers[tag] = image_classifier
        elif bundle.architecture == LANGUAGE_MODEL_ARCHITECTURE:
            language_model = CharLanguageModel(bundle, device=self.device, threads=self.threads)
            language_model.score(WARM_UP_TEXTS)
            self.budget_batches(tag, language_model)
            self.language_models[tag] = language_model
        else:
            classifier = TextClassifier(bundle, device=self.device, threads=self.threads)
            classifier.probabilities(WARM_UP_TEXTS)
            self.budget_batches(tag, classifier)
            self.classifiers[tag] = classifier
        logger.info("loaded %s on %s, %d threads", tag, self.device, self.threads)

    def budget_batches(self, tag: str, model: TextClassifier | CharLanguageModel) -> None:
        """Give `model` its padded-token budget per run (TEXTSERVE_BATCH_TOKENS, else measured
        here on its own sessions: backends/cost_batching.py) and its padding metrics."""
        name = model_name(tag)
        folder = budget_folder() if lifecycle.role() != "other" else None
        key = f"{tag.replace(':', '-')}-{self.device}-{self.threads}-threads-{machine_signature()}"
        model.token_budget = SETTINGS.batch_tokens or agreed_budget(folder, key, lambda: model.measure_token_budget(SETTINGS.max_batch_texts))
        metrics.batch_token_budget.labels(model=name).set(model.token_budget)
        logger.info("%s: %d padded tokens per run (%s)", tag, model.token_budget, "TEXTSERVE_BATCH_TOKENS" if SETTINGS.batch_tokens else "measured on this machine")
        padded_series, share_series = metrics.batch_padded_tokens.labels(model=name), metrics.batch_padding_ratio.labels(model=name)

        def observe(padded: int, tokens: int) -> None:
            padded_series.observe(padded)
            share_series.observe(1 - tokens / padded if padded else 0.0)

        model.observe_batch = observe

    def remove_model(self, tag: str) -> None:
        """Stop serving `tag`; its sessions are freed once the last call using them returns."""
        for table in (self.classifiers, self.language_models, self.image_classifiers):
            table.pop(tag, None)

    def classify_batch(self, items: list[QueuedItem]) -> list[dict]:
        """Per item, in the order of `items` (several models may be mixed): {"answer": its
        probabilities, "queue_s", "inference_s"} (see run_by_model)."""

        def classify(model: str, texts: list[str]) -> list[list[float]]:
            classifier = self.classifiers.get(model)
            if classifier is None:  # the HTTP worker checks names first; this guards direct calls
                raise ModelNotLoaded(f"model {model_name(model)!r} is not loaded")
            return np.asarray(classifier.probabilities(texts), dtype=np.float64).tolist()  # (len(texts), K)

        return run_by_model(items, classify)

    @bentoml.api
    def explain(self, model: str, texts: list[str], top_k: int) -> list[dict]:
        """Per text: the predicted label and the n-grams that added most to its logit."""
        classifier = self.classifiers.get(model)
        if classifier is None:
            raise ModelNotLoaded(f"model {model_name(model)!r} is not loaded")
        started = time.perf_counter()
        try:
            explanations = explain_texts(classifier, texts, top_k)
        except Exception as error:
            raise inference_failure(model_name(model), error) from error
        metrics.inference_duration_seconds.labels(model=model_name(model)).observe(time.perf_counter() - started)
        return explanations

    def classify_image_batch(self, items: list[QueuedItem]) -> list[dict]:
        """Images of several requests in one adaptive batch, as classify_batch does for texts:
        per item {"answer": its probabilities, "queue_s", "inference_s"}."""

        def classify(model: str, images: list) -> list[list[float]]:
            classifier = self.image_classifiers.get(model)
            if classifier is None:
                raise ModelNotLoaded(f"image model {model_name(model)!r} is not loaded")
            batch = np.asarray(images, dtype=np.float32)[:, None, :, :]  # (B, 1, S, S)
            return softmax(classifier.logits_of_images(batch)).astype(np.float64).tolist()

        return run_by_model(items, classify, payload=lambda item: item.image)

    # ------------------------------------------------------------------ language models

    def language_model(self, name: str) -> CharLanguageModel:
        if name not in self.language_models:  # the HTTP worker checks names first; this guards direct calls
            raise ModelNotLoaded(f"language model {model_name(name)!r} is not loaded")
        return self.language_models[name]

    def score_batch(self, items: list[QueuedItem]) -> list[dict]:
        """Per item: {"answer": its tokens, their log-probabilities and whether each is in the
        vocabulary, "queue_s", "inference_s"} (see run_by_model)."""

        def score(model: str, texts: list[str]) -> list[dict]:
            return [{"tokens": text.tokens, "log_probs": text.log_probs.tolist(), "in_vocabulary": text.in_vocabulary}
                    for text in self.language_model(model).score(texts)]

        return run_by_model(items, score)

    @bentoml.api
    def next_words(self, model: str, prefix: str, k: int) -> dict:
        with self.timed(model):
            tokens, words = self.language_model(model).next_words(prefix, k)
        return {"tokens": tokens, "next": [{"word": w, "probability": p} for w, p in words]}

    @bentoml.api
    def generate(self, model: str, prefix: str, max_words: int, temperature: float, top_k: int, seed: int,
                 stop_at_eos: bool) -> Generator[str, None, None]:
        """Streams JSON lines: first {"prefix_tokens"}, then one {"word", "probability"} per word."""
        language_model = self.language_model(model)
        started = time.perf_counter()
        yield json.dumps({"prefix_tokens": language_model.tokenize(prefix)}) + "\n"
        for word, probability in language_model.generate(prefix, max_words, temperature, top_k, seed, stop_at_eos):
            yield json.dumps({"word": word, "probability": probability}) + "\n"
        metrics.inference_duration_seconds.labels(model=model_name(model)).observe(time.perf_counter() - started)

    @bentoml.api
    def word_vectors(self, model: str, words: list[str], layer: str) -> list[dict]:
        language_model = self.language_model(model)
        with self.timed(model):
            vectors = language_model.vectors(words, layer).astype(float).tolist()
        return [{"word": w, "in_vocabulary": w in language_model.vocab, "vector": v} for w, v in zip(words, vectors)]

    @bentoml.api
    def neighbors(self, model: str, words: list[str], k: int, layer: str) -> list[dict]:
        language_model = self.language_model(model)
        with self.timed(model):
            found = language_model.neighbors(words, k, layer)
        return [{"word": w, "in_vocabulary": w in language_model.vocab,
                 "neighbors": [{"word": n, "cosine": c} for n, c in row]} for w, row in zip(words, found)]

    def timed(self, model: str):
        return metrics.inference_duration_seconds.labels(model=model_name(model)).time()

    # ------------------------------------------------------------------ the shared runner's socket

    @bentoml.on_startup
    @lifecycle.stops_server_on_failure
    async def listen_for_http_workers(self) -> None:
        """Run as BentoML's runner process (TEXTSERVE_INFERENCE=runner): answer the HTTP workers'
        batched calls on this worker's socket (shared_runner.py). Not called in process."""
        from bentoml._internal.context import server_context

        index = server_context.worker_index or 1
        self.socket_server = RunnerSocketServer(self, SETTINGS.max_batch_texts, SETTINGS.max_latency_ms, SETTINGS.concurrent_batches())
        await self.socket_server.start(socket_path(index))
        if SETTINGS.model_control != "none":
            self.control = asyncio.get_running_loop().create_task(self.follow_model_changes(f"runner-{index}"))

    async def follow_model_changes(self, me: str) -> None:
        """As a runner process: apply each model change (model_agreement.py), building a new
        version's sessions in its prepare phase. A replaced version's sessions are freed once
        no HTTP worker's ack lists it as serving or draining (the HTTP workers swap after this
        process, and finish their requests on the old version after that)."""
        state = ModelState(state_folder(SETTINGS))
        models = self.model_set
        replaced: set[str] = set()

        def confirm(failures: dict[str, str]) -> None:
            state.acknowledge(me, models.generation, models.generation, failures, dict(models.tags), list(models.draining))

        def free_unused() -> None:
            if not replaced:
                return
            used = {tag for name, ack in state.acks().items() if name.startswith("http-")
                    for tag in (*ack.get("serving", {}).values(), *ack.get("draining", []))}
            for tag in [tag for tag in replaced if tag not in used and tag not in models.tags.values() and tag not in models.prepared]:
                replaced.discard(tag)
                self.remove_model(tag)

        def release(tag: str) -> None:
            replaced.add(tag)
            free_unused()

        async def prepare(name: str, tag: str, bundle: Bundle) -> None:
            # A rollback to a version still waiting to be freed (an HTTP worker was draining it):
            # its new sessions are wanted, so it is no longer one to free (a load called off
            # releases it again).
            was_replaced = tag in replaced
            replaced.discard(tag)
            try:
                await asyncio.to_thread(self.add_model, tag, bundle)
            except BaseException:
                if was_replaced:  # the old sessions are still there, and still to be freed
                    replaced.add(tag)
                raise

        async def apply(desired: Desired) -> None:
            await models.apply(desired, prepare, release, confirm, drain_timeout_s=0)

        confirm({})
        await watch(state, lambda: models.generation, apply, asyncio.Event(), free_unused)

    @bentoml.on_shutdown
    async def finish_what_was_asked(self) -> None:
        if self.control is not None:
            self.control.cancel()
        if self.socket_server is not None:
            await self.socket_server.drain()

    @bentoml.api
    def loaded_models(self) -> list[str]:
        """Session keys (store tags, name:version) of the models whose sessions are built and warmed up."""
        return sorted([*self.classifiers, *self.language_models, *self.image_classifiers])


def budget_folder() -> Path:
    """Where the measured token budgets are kept for every server of this machine (a pod's own
    temp folder in Kubernetes): a model version measured once on this hardware with these
    threads is not measured again at the next start."""
    return Path(tempfile.gettempdir()) / "textserve-token-budgets"


@functools.cache  # read once per process, not once per model loaded
def machine_signature() -> str:
    """The hardware a budget was measured on: the CPU model and the cores this process may use."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{available_cores()}-cores-{hashlib.sha256(line.encode()).hexdigest()[:8]}"
    return f"{available_cores()}-cores-{platform.machine()}"


def model_name(key: str) -> str:
    """The model name of a session key (a store tag, name:version), for metrics and messages."""
    return key.partition(":")[0]


def run_by_model(items: list, run: Callable[[str, list], list], payload: Callable = lambda item: item.text) -> list[dict]:
    """One adaptive batch: record its size and each item's queue wait, run each model's share
    of the items as one call of `run(model, texts)`, and return, in item order, each answer with
    its queue wait and its model's inference time (the service turns them into headers)."""
    started = time.time()
    metrics.batch_texts.observe(len(items))
    rows_by_model: dict[str, list[int]] = defaultdict(list)
    for row, item in enumerate(items):
        rows_by_model[item.model].append(row)
    answers: list = [None] * len(items)
    for model, rows in rows_by_model.items():
        model_started = time.perf_counter()
        try:
            model_answers = run(model, [payload(items[row]) for row in rows])
            if len(model_answers) != len(rows):  # zip below would drop or leave out answers silently
                raise RuntimeError(f"the graph answered {len(model_answers)} rows for {len(rows)} inputs")
        except bentoml.exceptions.BentoMLException:
            raise
        except Exception as error:  # onnxruntime's own exception types, a failing encoder, ...
            raise inference_failure(model_name(model), error) from error
        inference_s = time.perf_counter() - model_started
        metrics.count_model_run(model_name(model), len(rows), inference_s, [max(0.0, started - items[row].sent_at) for row in rows])
        for row, answer in zip(rows, model_answers):
            answers[row] = {"answer": answer, "queue_s": max(0.0, started - items[row].sent_at), "inference_s": inference_s}
    return answers
