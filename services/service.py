"""The model server: `bentoml serve services.service:TextService`.

    client -> the pipeline (http/pipeline.py: keys, route, admission, body, timeout, errors,
              timing, metrics; one pass for every route) -> a route (JSON API in http_api.py
              and lm_api.py, OIP v2 in open_inference.py; the hot ones through hot_routes.py)
              -> TextService (this file): validation, admission -> the runner: classify_batch /
              score_batch (adaptive batching), or one call per request (explain in slices,
              next words, generation, word vectors) -> onnxruntime -> JSON / OIP

Where the runner runs is TEXTSERVE_INFERENCE:
- `inline` (default on a CPU): in this process (in_process.py), behind the batcher of
  batching.py; no second hop, so a small model's request costs a fraction of the CPU.
- `runner`: one separate process (shared_runner.py, started by BentoML through
  `bentoml.depends`) whose batchers merge every HTTP worker's texts (and own one GPU's memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator

from services import lifecycle

lifecycle.enter()  # first: this server's own metrics folder, before any metric exists in this process

import aiohttp  # noqa: E402 (after the server's folder is set)
import bentoml  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
from bentoml.exceptions import BentoMLException, NotFound  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from services import metrics  # noqa: E402
from services.api import hot_routes  # noqa: E402
from services.api.http_api import router as json_api  # noqa: E402
from services.api.image_api import router as image_api  # noqa: E402
from services.api.lm_api import json_lines, router as language_model_api  # noqa: E402
from services.api.open_inference import router as open_inference_api  # noqa: E402
from services.api.triton_extensions import router as triton_extensions_api  # noqa: E402
from services.backends.in_process import InProcessRunner  # noqa: E402
from services.backends.inference import IMAGE_ARCHITECTURE, LANGUAGE_MODEL_ARCHITECTURE, Bundle, BundleError, text_problem  # noqa: E402
from services.api.repository import Repository  # noqa: E402
from services.api.zoo_poller import ZooPoller  # noqa: E402
from services.backends.model_agreement import Desired, ModelState, participants, state_folder, watch  # noqa: E402
from services.backends.served_models import ServedModels, served  # noqa: E402
from services.backends.model_store import zoo_tags  # noqa: E402
from services.backends.runner import ModelRunner  # noqa: E402
from services.backends.runner_errors import InferenceFailed  # noqa: E402
from services.backends.shared_runner import SharedRunnerClient  # noqa: E402
from services.config import SETTINGS, ServiceSettings  # noqa: E402
from services.errors import ApiError, overloaded, some_names  # noqa: E402
from services.http import access, bentoml_hook, connection_limits, docs_page, request_timing, routes  # noqa: E402
from services.http.admission import Admission  # noqa: E402
from services.http.errors import document_errors, install_error_handlers  # noqa: E402
from services.http.pipeline import Pipeline  # noqa: E402

logger = logging.getLogger("bentoml.textserve")
connection_limits.install(SETTINGS.header_timeout_s, SETTINGS.max_header_bytes, SETTINGS.max_headers)  # before uvicorn starts
# The HTTP workers share one listening socket. libuv (uvloop, under uvicorn) accepts every
# pending connection on one wake-up, so the first worker to wake took a whole burst of
# keep-alive connections: `make bench` saw one of two workers serve every connection at 8 and
# 32 clients (half the machine idle). One accept per wake-up spreads them; read by libuv when
# the worker starts listening, after this import.
os.environ.setdefault("UV_TCP_SINGLE_ACCEPT", "1")
READY_CHECK_SECONDS = 2.0
ADMISSION = Admission(SETTINGS.max_pending_texts)  # this worker's texts in flight
SERVING: TextService | None = None  # this worker's instance, once BentoML has built it
RUNNER_CONNECTION_ATTEMPTS = 3
GRPC_GRACE_S = 10

app = FastAPI(
    title="textserve",
    description="Neural text classifiers (ONNX, onnxruntime) with adaptive batching. "
    "Errors are {\"error\": \"...\"}; OIP v2 under /v2; Prometheus metrics at /metrics.",
    version=docs_page.service_version(),
    # FastAPI's pages load Swagger from a CDN; ours (docs_page.py) are served at / and /docs, and the
    # OpenAPI document by the pipeline (a caller without a key gets it without the model names)
    docs_url=None, redoc_url=None, openapi_url=None,
)
install_error_handlers(app)
app.include_router(json_api)
app.include_router(image_api)
app.include_router(language_model_api)
app.include_router(triton_extensions_api)  # before the OIP routes: /v2/models/stats is no model's metadata
app.include_router(open_inference_api)
OPENAPI = document_errors(app, lambda: sorted(SERVING.bundles) if SERVING is not None else [],  # after the routes: each one's error statuses,
                lambda document: docs_page.add_examples(document, names_by_kind(), model_versions()))  # the loaded model names, real examples


@bentoml.service(
    name="textserve",
    workers=SETTINGS.http_workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    # One log line per request costs about a tenth of a small model's request (docs/performance-history.md).
    # The access log and tracing are the pipeline's (http/pipeline.py); BentoML's own would see only
    # the probes and /metrics, which reach its app.
    logging={"access": {"enabled": False}},
    tracing={"excluded_urls": [".*"]},
)
@bentoml.asgi_app(app, path="/")
class TextService:
    """Entry service: validation, limits and admission, then the batched runner."""

    if SETTINGS.inference_mode == "runner":
        runner_service = bentoml.depends(ModelRunner)  # started by BentoML as its own process

    @lifecycle.stops_server_on_failure
    def __init__(self) -> None:
        self.settings: ServiceSettings = SETTINGS
        # Read here first (TextService.bento is set when BentoML serves a bento), so that the
        # in-process runner serves the same bundles.
        to_serve = served(SETTINGS, TextService.bento)  # what the other processes agreed on, with model control
        if SETTINGS.inference_mode == "inline":
            self.runner = InProcessRunner()  # adds to to_serve.failures a model whose session failed
        else:  # batched calls over the runner's socket, the others through BentoML's proxy
            self.runner = SharedRunnerClient(self.runner_service, SETTINGS.runner_workers)
        bundles = {b.name: b for b in to_serve.bundles if b.name not in to_serve.failures}
        # The models by name, the tag (name:version) each serves and the requests in flight on
        # each tag; changed while serving by the repository API (api/repository.py, backends/model_agreement.py).
        self.model_set = ServedModels(bundles, to_serve.failures, set(to_serve.unloaded), generation=to_serve.generation)
        for name in self.bundles:
            metrics.model_loaded.labels(model=name).set(1)
        for name, reason in self.failed_models.items():
            metrics.model_loaded.labels(model=name).set(0)
            logger.error("model %s failed to load and is not served: %s", name, reason)
        self.admission = ADMISSION
        self.explain_lane = Lane(SETTINGS.max_latency_ms, "explanations")
        self.ready_models: set[str] = set()  # tags the runner has said are loaded and warm
        control = SETTINGS.model_control != "none"
        self.model_state = ModelState(state_folder(SETTINGS)) if control else None
        self.model_change = asyncio.Event()  # set by this worker's own load or unload: apply it at once
        self.repository = Repository(SETTINGS, self.model_state, self.model_change, TextService.bento)
        self.control: asyncio.Task | None = None
        self.poller: asyncio.Task | None = None  # TEXTSERVE_MODEL_CONTROL=poll
        self.grpc_server = self.grpc_port_lock = None
        access.announce(SETTINGS)
        global SERVING
        SERVING = self  # the pipeline answers through this instance from now on
        freeze_what_lives()

    @property
    def bundles(self) -> dict[str, Bundle]:
        return self.model_set.bundles

    @property
    def failed_models(self) -> dict[str, str]:
        return self.model_set.failed

    @property
    def store_tags(self) -> dict[str, str]:
        return self.model_set.tags

    @bentoml.on_startup
    @lifecycle.stops_server_on_failure
    async def check_the_patches(self) -> None:
        """The one patch of BentoML and the one of uvicorn took, and the route table is the app's:
        without them the pipeline's protections would be silently missing."""
        bentoml_hook.check()
        connection_limits.check()
        routes.check_against_document(OPENAPI(with_models=False))

    @bentoml.on_startup
    @lifecycle.stops_server_on_failure
    async def follow_model_changes(self) -> None:
        """With model control: apply every load and unload, this worker's own and the others'."""
        if self.model_state is None:
            return
        from bentoml._internal.context import server_context

        me = f"http-{server_context.worker_index or 1}"
        self.acknowledge(me, {})
        self.control = asyncio.get_running_loop().create_task(
            watch(self.model_state, lambda: self.model_set.generation, lambda desired: self.apply_models(me, desired), self.model_change))
        if SETTINGS.model_control == "poll":
            self.poller = asyncio.get_running_loop().create_task(ZooPoller(self.repository, SETTINGS.model_poll_interval_s).run())

    @bentoml.on_startup
    @lifecycle.stops_server_on_failure
    async def listen_for_grpc(self) -> None:
        """OIP v2 over gRPC in this worker, beside HTTP (api/grpc_inference.py)."""
        if SETTINGS.grpc_port:
            from services.api import grpc_inference

            self.grpc_server, self.grpc_port_lock = await grpc_inference.start(self, SETTINGS)

    @bentoml.on_shutdown
    async def stop_following(self) -> None:
        for task in (self.control, self.poller):
            if task is not None:
                task.cancel()
        if self.grpc_server is not None:
            await self.grpc_server.stop(GRPC_GRACE_S)  # the calls in flight finish, new ones are refused

    async def apply_models(self, me: str, desired: Desired) -> None:
        """This worker's part of a model change (backends/model_agreement.py): inline, build the new
        version's sessions here; with the shared runner, swap only once every runner process
        has swapped. Each step confirmed in this worker's ack."""
        runners = [name for name in participants(SETTINGS) if name.startswith("runner-")]
        inline = SETTINGS.inference_mode == "inline"

        async def prepare(name: str, tag: str, bundle: Bundle) -> None:
            if inline:  # with the shared runner, the runner builds them; the bundle is read and checked here
                await asyncio.to_thread(self.runner.instance.add_model, tag, bundle)

        async def runner_has_it(name: str, tag: str) -> None:
            acks = await self.model_state.wait_for(runners, desired.generation, SETTINGS.model_load_timeout_s, "loaded")
            refused = [acks[runner]["failures"][name] for runner in runners if name in acks[runner].get("failures", {})]
            if refused:
                raise BundleError(refused[0])

        def release(tag: str) -> None:
            if inline:
                self.runner.instance.remove_model(tag)

        def confirm(failures: dict[str, str]) -> None:
            for name in desired.models:
                metrics.model_loaded.labels(model=name).set(1 if name in self.bundles else 0)
            OPENAPI.forget()  # the document lists the loaded models: built again on its next request
            self.acknowledge(me, failures)

        await self.model_set.apply(desired, prepare, release, confirm, SETTINGS.request_timeout_s,
                                   None if inline else runner_has_it)

    def acknowledge(self, me: str, failures: dict[str, str]) -> None:
        models = self.model_set
        self.model_state.acknowledge(me, models.generation, models.generation, failures, dict(models.tags), list(models.draining))

    def bundle(self, name: str, kind: str | None = None) -> Bundle:
        """The named bundle; 404 if unknown, 400 if it is not of `kind` ("classifier" or "language model")."""
        if name in self.failed_models:
            raise ApiError(503, f"model {name!r} failed to load when the server started ({self.failed_models[name]}); "
                                "the other models are served")
        if name in self.model_set.unloaded and name in self.repository.available():
            raise ApiError(404, f"model {name!r} is unloaded; loaded models: {some_names(self.bundles, name)} "
                                f"(POST /v2/repository/models/{name}/load serves it again)")
        if name not in self.bundles:
            raise ApiError(404, f"unknown model {name!r}; loaded models: {some_names(self.bundles, name)}. "
                                f"{self.repository.how_to_add(name)}")
        bundle = self.bundles[name]
        actual = model_kind(bundle)
        if kind is not None and kind != actual:
            others = sorted(n for n, b in self.bundles.items() if model_kind(b) == kind)
            raise ApiError(400, f"model {name!r} is {article(actual)} {actual}; this endpoint needs {article(kind)} {kind} (loaded {kind}s: {others})")
        return bundle

    def check_texts(self, texts: list[str], field: str = "texts", max_chars_setting: str = "max_text_chars") -> None:
        """A non-empty list of non-blank strings within the request limits, else a 4xx that says which."""
        limits = self.settings
        item = field.removesuffix("s")
        if not texts:
            raise ApiError(400, f"{field} is empty: send at least one {item}")
        if len(texts) > limits.max_texts_per_request:
            raise ApiError(413, f"{len(texts)} {field} in one request; the limit is {limits.max_texts_per_request} (TEXTSERVE_MAX_TEXTS_PER_REQUEST)")
        max_chars = getattr(limits, max_chars_setting)
        for index, text in enumerate(texts):
            problem = text_problem(text, max_chars, f"TEXTSERVE_{max_chars_setting.upper()}")
            if problem:
                raise ApiError(problem[0], f"{field}[{index}] {problem[1]}")

    async def probabilities(self, model: str, texts: list[str]) -> np.ndarray:
        """Validate, admit and run `texts` through the batched runner: (len(texts), K) float32."""
        answers = await self.batched("classify_batch", model, texts)
        return np.asarray(answers, dtype=np.float32)

    def kind_of(self, bundle: Bundle) -> str:
        return model_kind(bundle)

    def check_image_count(self, count: int) -> None:
        """At most TEXTSERVE_MAX_IMAGES_PER_REQUEST images in one request, else 413."""
        limit = self.settings.max_images_per_request
        if count > limit:
            raise ApiError(413, f"{count} images in one request; the limit is {limit} (TEXTSERVE_MAX_IMAGES_PER_REQUEST)")

    def image_encoder(self, bundle: Bundle):
        """The torch-free preprocessing an image bundle was trained with (models/image_encoding.py)."""
        from models.image_encoding import ImageEncoder

        return ImageEncoder.from_config(bundle.config["encoding"])

    async def image_probabilities(self, model: str, images: np.ndarray) -> np.ndarray:
        """Admit encoded images (B, 1, S, S) and run them through the runner's adaptive batcher,
        with other requests' images: (B, K)."""
        rows = images[:, 0].tolist()
        tag = self.store_tags[model]  # before any await: the version the route resolved

        async def send() -> list:
            return await self.runner.batched("classify_image_batch", tag, rows, time.time())

        with self.admitted(len(rows)), self.model_set.holding(tag), runner_errors():
            timed_answers = await with_connection_retry(send)
        for timed in timed_answers:
            request_timing.record(timed["queue_s"], timed["inference_s"])
        return np.asarray([timed["answer"] for timed in timed_answers], dtype=np.float32)

    async def scores(self, model: str, texts: list[str]) -> list[dict]:
        """Validate, admit and score `texts` with a language model through the batched runner."""
        return await self.batched("score_batch", model, texts)

    async def batched(self, runner_api: str, model: str, texts: list[str]) -> list:
        """Validate, admit and send `texts` to one of the runner's batchable APIs."""
        self.check_texts(texts)
        tag = self.store_tags[model]  # before any await: the version the route resolved
        with self.admitted(len(texts)), self.model_set.holding(tag), runner_errors():
            return await self.call_runner(runner_api, tag, texts)

    async def explanations(self, model: str, texts: list[str], top_k: int) -> list[dict]:
        """Validate, admit and explain `texts` in slices of at most TEXTSERVE_MAX_BATCH_TEXTS, one
        slice at a time per worker: an explanation keeps every filter's activations of its batch,
        so 256 long texts as one batch took a worker from 550 MB to over 2 GB, for good (onnxruntime
        keeps its arena). A slice that cannot start within TEXTSERVE_MAX_LATENCY_MS is refused
        with 503, as /classify's batches are."""
        self.check_texts(texts)
        tag = self.store_tags[model]
        size = self.settings.max_batch_texts
        explained: list[dict] = []
        with self.admitted(len(texts)), self.model_set.holding(tag), runner_errors():
            for start in range(0, len(texts), size):
                async with self.explain_lane.turn():
                    started = time.perf_counter()
                    explained += await with_connection_retry(
                        lambda: self.runner.to_async.explain(model=tag, texts=texts[start:start + size], top_k=top_k))
                    request_timing.record(0.0, time.perf_counter() - started)
        return explained

    async def unbatched(self, api: str, cost: int, **arguments):
        """One call of a runner API that is not batched, admitted at `cost` (texts or words it
        handles) and its failures reworded for the client."""
        arguments["model"] = tag = self.store_tags[arguments["model"]]  # the runner's sessions are by tag
        with self.admitted(cost), self.model_set.holding(tag), runner_errors():
            started = time.perf_counter()
            answer = await with_connection_retry(lambda: getattr(self.runner.to_async, api)(**arguments))
            request_timing.record(0.0, time.perf_counter() - started)
            return answer

    async def generation(self, cost: int, **arguments) -> tuple[dict, GeneratedWords]:
        """Start the runner's streamed generation, admitted at `cost` (the words asked for) until
        the stream ends. Returns once its first line (the prefix's tokens) has arrived, so a
        refusal is still an HTTP error, with the rest of the lines (one word each) as an async
        iterable that gives the admission and the model version back when it is exhausted,
        fails or is closed, even if it never started (a client that left after the start)."""
        arguments["model"] = tag = self.store_tags[arguments["model"]]
        self.reserve(cost)
        holding = self.model_set.holding(tag)
        holding.__enter__()  # until the stream ends
        started = time.perf_counter()
        lines: AsyncIterator[dict] | None = None

        def give_back() -> None:
            self.release(cost)
            holding.__exit__(None, None, None)
            request_timing.record(0.0, time.perf_counter() - started)  # seen when not streamed

        async def start() -> dict:
            nonlocal lines
            lines = json_lines(self.runner.to_async.generate(**arguments))
            return await anext(lines)  # nothing has reached the client yet: safe to send again

        try:
            with runner_errors():
                first = await with_connection_retry(start)
        except BaseException:
            give_back()
            raise
        return first, GeneratedWords(lines, give_back)

    @contextlib.contextmanager
    def admitted(self, cost: int) -> Iterator[None]:
        self.reserve(cost)
        try:
            yield
        finally:
            self.release(cost)

    def reserve(self, cost: int) -> None:
        """Count `cost` units of work (texts, words) against this worker's limit, or refuse: 429."""
        self.admission.reserve(cost)

    def release(self, cost: int) -> None:
        self.admission.release(cost)

    async def call_runner(self, runner_api: str, model: str, texts: list[str]) -> list:
        """One call of a batched runner API (in_process.py or shared_runner.py); the queue wait
        is measured from each attempt's sending. Each text's answer comes back with its batch's
        queue wait and inference time, noted for the response's timing headers."""

        async def send() -> list:
            return await self.runner.batched(runner_api, model, texts, time.time())

        timed_answers = await with_connection_retry(send)
        for timed in timed_answers:
            request_timing.record(timed["queue_s"], timed["inference_s"])
        return [timed["answer"] for timed in timed_answers]

    async def models_not_ready(self) -> list[str]:
        """Models whose runner session is not built and warmed up yet (asks the runner once)."""
        tags = self.store_tags
        if not self.ready_models >= set(tags.values()):
            try:
                # A probe must answer fast: a runner still starting counts as not ready.
                self.ready_models = set(await asyncio.wait_for(self.runner.to_async.loaded_models(), READY_CHECK_SECONDS))
            except (ApiError, BentoMLException, httpx.HTTPError, aiohttp.ClientError, asyncio.TimeoutError):
                return sorted(self.bundles)
            if self.ready_models >= set(tags.values()):
                freeze_what_lives()  # the server is built now: what exists will live as long as it
        return sorted(name for name, tag in tags.items() if tag not in self.ready_models)


# What `bentoml build` packs into the bento (deploy/bentofile.yaml): the store versions of the
# zoo's bundles. Served from a bento there is no zoo folder; the bento's own list is used.
if SETTINGS.zoo.is_dir():
    TextService.models.extend(bentoml.models.BentoModel(tag) for tag in zoo_tags(SETTINGS))

def names_by_kind() -> dict[str, list[str]]:
    """The loaded models' names by kind ("classifier", "language model", "image classifier")."""
    kinds: dict[str, list[str]] = {}
    for name, bundle in sorted(SERVING.bundles.items()) if SERVING is not None else ():
        kinds.setdefault(model_kind(bundle), []).append(name)
    return kinds


def model_versions() -> dict[str, str]:
    """Each served model's OIP v2 version (the docs page's versioned examples)."""
    return {name: bundle.version for name, bundle in SERVING.bundles.items()} if SERVING is not None else {}


def page_of(route: str, with_models: bool) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """A PAGE route's answer (body, headers) once this worker serves, else None: the docs page
    and the playground (docs_page.py), the OpenAPI document and BentoML's client schema; the
    model names and examples only `with_models` (a caller with a key, or a server without keys)."""
    if SERVING is None:
        return None
    document = OPENAPI(with_models)
    if route == "/openapi.json":
        return json.dumps(document).encode(), [(b"content-type", b"application/json")]
    if route == "/schema.json":
        return json.dumps(docs_page.bentoml_schema(document)).encode(), [(b"content-type", b"application/json")]
    kinds = names_by_kind() if with_models else {}
    explainable = sorted(name for name, bundle in SERVING.bundles.items()
                         if "window_starts" in bundle.config.get("onnx", {}).get("outputs", [])) if with_models else []
    page = "playground" if route == "/playground" else "docs"
    html = docs_page.render(document, kinds, page, explainable, model_versions() if with_models else {})
    return html.encode(), [(b"content-type", docs_page.HTML), (b"content-security-policy", docs_page.CONTENT_SECURITY_POLICY),
                           (b"cache-control", b"no-cache")]


def build_pipeline(bentoml_app):
    """The app uvicorn runs in each HTTP worker (http/bentoml_hook.py installs it)."""
    pipeline = Pipeline(bentoml_app, app, ADMISSION, lambda: SERVING, hot_routes.ANSWERS, page_of)
    return bentoml_hook.traced(pipeline, SETTINGS)


bentoml_hook.install(TextService, build_pipeline)


class Lane:
    """Work that runs one at a time in this worker, or is refused (503) when its turn does not
    come within `max_wait_ms`: a queue that cannot grow past what the worker clears in time."""

    def __init__(self, max_wait_ms: int, what: str) -> None:
        self.max_wait_s = max_wait_ms / 1000
        self.what = what
        self.free = asyncio.Semaphore(1)

    @contextlib.asynccontextmanager
    async def turn(self):
        try:
            async with asyncio.timeout(self.max_wait_s):
                await self.free.acquire()
        except TimeoutError:
            raise overloaded(f"overloaded: {self.what} cannot start within {self.max_wait_s * 1000:g} ms "
                             "(TEXTSERVE_MAX_LATENCY_MS); retry shortly") from None
        try:
            yield
        finally:
            self.free.release()


CLOSING_STREAMS: set[asyncio.Task] = set()  # the runner's streams being closed (GeneratedWords.close)


class GeneratedWords:
    """The words of a generation after its first line, as an async iterable; `close()` (also
    called when the words run out or fail) gives back what the request held, once, and closes
    the runner's stream, so that the runner stops generating for a client that has left."""

    def __init__(self, lines: AsyncIterator[dict], give_back) -> None:
        self.lines = lines
        self.give_back = give_back
        self.closed = False
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()  # where close() must run
        except RuntimeError:  # made outside a loop (a test): close() runs wherever it is called
            self.loop = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.give_back()
        with contextlib.suppress(RuntimeError):  # no running loop: the process is ending
            task = asyncio.get_running_loop().create_task(self.lines.aclose())
            CLOSING_STREAMS.add(task)  # held until done (the loop keeps only a weak reference)
            task.add_done_callback(CLOSING_STREAMS.discard)
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: nobody awaits it

    def __del__(self) -> None:
        # A request cancelled (its timeout) after its handler returned the stream and before the
        # response started runs neither the stream nor its background task: the last owner of
        # this object is then the cancelled response, and what the request held comes back here,
        # on the event loop (a collection may run this in another thread; the counters are the loop's).
        if getattr(self, "closed", True):  # closed already, or __init__ never finished
            return
        if self.loop is None:
            self.close()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending
            self.loop.call_soon_threadsafe(self.close)

    async def __aiter__(self) -> AsyncIterator[dict]:
        try:
            with runner_errors():  # a failure mid-stream, too, reaches the client as an ApiError
                async for line in self.lines:
                    yield line
        finally:
            self.close()


def article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def model_kind(bundle: Bundle) -> str:
    """What a bundle answers: "classifier" (texts), "language model" or "image classifier"."""
    if bundle.architecture == LANGUAGE_MODEL_ARCHITECTURE:
        return "language model"
    return "image classifier" if bundle.architecture == IMAGE_ARCHITECTURE else "classifier"


def freeze_what_lives() -> None:
    """What exists now (frameworks, sessions, vocabularies, the app) lives as long as the
    process: move it out of the garbage collector's sight. Otherwise every full collection walks
    all of it and stops the event loop for about 100 ms, which was a small model's p99
    (docs/performance-history.md). Called once the models are loaded and again once they are ready."""
    gc.collect()
    gc.freeze()


async def with_connection_retry(call):
    """Await `call()`, calling it again when the connection to the runner (not the inference)
    failed. BentoML's internal client keeps idle connections for 15 s while the runner's server
    may close them sooner (BentoML issue #4971), so a write can hit a closed socket; inference
    has no side effects, so sending it again is safe."""
    for attempt in range(1, RUNNER_CONNECTION_ATTEMPTS + 1):
        try:
            return await call()
        except aiohttp.ClientConnectionError as error:
            if attempt == RUNNER_CONNECTION_ATTEMPTS:
                raise
            logger.warning("runner connection failed (%s: %s); sending again", type(error).__name__, error)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def runner_errors() -> Iterator[None]:
    """A runner's refusal or an unreachable runner, as the ApiError a client should see."""
    try:
        yield
    except BentoMLException as error:
        raise runner_error(error) from None
    except (httpx.HTTPError, aiohttp.ClientError) as error:
        raise overloaded(f"the inference runner is unreachable ({type(error).__name__}); retry shortly") from None


def runner_error(error: BentoMLException) -> ApiError:
    """BentoML's refusals, reworded to say what happened and what to do."""
    status = int(error.error_code)
    if status == 503:
        return overloaded("overloaded: the batch queue cannot start these texts within "
                          f"{SETTINGS.max_latency_ms} ms (TEXTSERVE_MAX_LATENCY_MS); retry shortly")
    if status == 429:
        return overloaded("overloaded: the inference runner refuses more concurrent requests; retry shortly", 429)
    if status == 504:
        return ApiError(504, f"inference did not finish within {SETTINGS.request_timeout_s} s (TEXTSERVE_REQUEST_TIMEOUT_S)")
    if isinstance(error, NotFound):  # ModelNotLoaded (a NotFound once through BentoML's proxy): this worker serves the model, the runner does not
        return overloaded(f"the inference runner does not have this model ({error}); its log says why; retry shortly")
    if isinstance(error, InferenceFailed):
        return ApiError(500, str(error))  # names the model and onnxruntime's reason
    return ApiError(500, f"inference failed in the runner: {error}")
