"""The fast front: the hot routes answered in one ASGI pass, ahead of BentoML's stack.

A py-spy profile of an HTTP worker under 64 connections (docs/performance.md, "Where the time
goes") found a one-text /classify request spending most of its event-loop CPU in the layers
around the model, not in it: Starlette's and FastAPI's routing, request objects and dependency
solving (28 % of the GIL-held samples), BentoML's traffic metrics, tracing and context
middlewares (8 %), and our own six middlewares, each a pass over the headers and a wrapped
`send` (9 %). This app sits outside all of them and answers

    POST /classify, POST /lm/score, POST /v2/models/{name}[/versions/{version}]/infer

itself, in one pass that does what those layers did for these routes: connection recycling
(keep_alive.py), the fast 429 of a full worker (admission.py), the body limit (413,
body_limit.py), the request timeout (504, bentoml_timeout.py), the timing headers and request
metrics (request_timing.py), and the {"error": ...} bodies (errors.py). The routes' own work
is the same functions the FastAPI routes call (`classify_answer`, `score_answer`,
`infer_answer`), so validation, messages and answers cannot drift between the two paths; the
FastAPI routes still exist, document the API in OpenAPI and serve when the front is off.

Everything else (the docs page, /metrics, probes, the other routes, and every route when
TEXTSERVE_FAST_FRONT=0, TEXTSERVE_ACCESS_LOG=1 or TEXTSERVE_TRACING=1, which need BentoML's own
middlewares) passes to BentoML's app untouched. BentoML's traffic metrics
(bentoml_service_request_*) do not count the hot routes; textserve_requests_total and
textserve_request_duration_seconds count every route (docs/performance.md says which metrics).

`install()` wraps BentoML's ServiceAppFactory so that the app uvicorn runs in each HTTP worker
is this front around BentoML's (services/service.py calls it at import, as BentoML loads it in
the worker before building the app).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services import metrics
from services.http import access, docs_page, request_timing
from services.http.bentoml_timeout import within_timeout
from services.http.admission import RETRY_AFTER_S, Admission
from services.http.body_limit import too_large_message
from services.config import SETTINGS, ServiceSettings
from services.http.errors import ApiError, error_body, raw_headers
from services.http.keep_alive import close_probability
from services.api.http_api import classify_answer
from services.api.lm_api import score_answer
from services.api.open_inference import infer_answer

logger = logging.getLogger("bentoml.textserve")
JSON = b"application/json"
CLASSIFY, SCORE, INFER = "/classify", "/lm/score", "/v2/models/{name}/infer"


@dataclass
class RequestState:
    """What a route notes while it handles a request (request.state in FastAPI's routes)."""

    model: str = ""


@dataclass
class HotRequest:
    """The parts of a request the hot routes read; `.state` as a FastAPI Request has."""

    headers: dict[bytes, bytes]
    state: RequestState = field(default_factory=RequestState)


def hot_route(path: str) -> tuple[str, str | None, str | None] | None:
    """(route template, model name, version) of a hot POST path, None for any other path."""
    if path == CLASSIFY or path == SCORE:
        return path, None, None
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        parts = path[len("/v2/models/"):-len("/infer")].split("/")
        if len(parts) == 1 and parts[0]:
            return INFER, parts[0], None
        if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
            return INFER, parts[0], parts[2]
    return None


class FastFront:
    """ASGI app: the hot routes here, everything else to `app` (BentoML's)."""

    def __init__(self, app, admission: Admission, settings: ServiceSettings = SETTINGS,
                 service: Callable[[], object | None] = lambda: None, rng: random.Random | None = None) -> None:
        self.app = app
        self.admission = admission
        self.settings = settings
        self.service = service  # the TextService instance once BentoML has built it, else None
        self.close_probability = close_probability(settings.requests_per_connection)
        self.rng = rng or random.Random()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        route = hot_route(scope["path"])
        service = self.service() if route is not None else None
        if service is None:
            return await self.app(scope, receive, send)
        await self.answer(service, route, scope, receive, send)

    async def answer(self, service, route: tuple[str, str | None, str | None], scope, receive, send) -> None:
        started = time.perf_counter()
        endpoint, name, version = route
        headers = dict(scope["headers"])  # one pass; names arrive lower-cased
        request = HotRequest(headers)
        timing = request_timing.Timing()
        extra: list[tuple[bytes, bytes]] = []
        close = self.close_probability and self.rng.random() < self.close_probability
        try:
            if self.admission.full:  # before the body is read, as RefuseWhenFull does
                raise ApiError(429, self.admission.refusal_message(), {"Retry-After": RETRY_AFTER_S})
            token = request_timing.current_timing.set(timing)
            try:  # the timeout covers the body's arrival too: a body sent a byte a second gets 504
                answered = await self.within_timeout(self.read_and_route(endpoint, name, version, request, service, receive))
            finally:
                request_timing.current_timing.reset(token)
            if answered is None:
                return  # the client went away while sending; nobody to answer
            body, content_type, extra = answered
            status = 200
        except ApiError as error:
            status, body, content_type = error.status, error_body(error.message), JSON
            extra = raw_headers(error.headers)
            close = close or error.status in (413, 504)  # the unread rest of the body must not be parsed as a request
        except asyncio.CancelledError:
            raise  # the server is shutting down or the client left; nothing to send
        except Exception as error:  # a bug: logged with its traceback, the client gets a 500 that says so
            logger.exception("unexpected error on POST %s", scope["path"])
            status, body, content_type = 500, error_body(f"internal error ({type(error).__name__}); the server log has the details"), JSON
        response_headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra,
                            (request_timing.QUEUE_HEADER, request_timing.milliseconds(timing.queue_s)),
                            (request_timing.INFERENCE_HEADER, request_timing.milliseconds(timing.inference_s)),
                            (request_timing.TOTAL_HEADER, request_timing.milliseconds(time.perf_counter() - started))]
        if close:
            response_headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})
        model = request.state.model
        metrics.requests_total.labels(model=model, endpoint=endpoint, status=str(status)).inc()
        metrics.request_duration_seconds.labels(model=model, endpoint=endpoint).observe(time.perf_counter() - started)

    async def read_body(self, headers: dict[bytes, bytes], receive) -> bytes | None:
        """The whole body within TEXTSERVE_MAX_BODY_BYTES, else 413 (a declared length over the
        limit before a byte is read; a chunked body once it passes it); None if the client left."""
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, too_large_message(limit, int(declared)))
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise ApiError(413, too_large_message(limit, None))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def read_and_route(self, endpoint: str, name: str | None, version: str | None, request: HotRequest, service,
                             receive) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
        raw = await self.read_body(request.headers, receive)
        if raw is None:
            return None
        return await self.route(endpoint, name, version, request, service, raw)

    async def route(self, endpoint: str, name: str | None, version: str | None, request: HotRequest, service,
                    raw: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
        """(body, content type, extra headers) of a hot route's answer."""
        if endpoint == CLASSIFY:
            return await classify_answer(request, service, raw), JSON, []
        if endpoint == SCORE:
            return await score_answer(request, service, raw), JSON, []
        header_length = request.headers.get(b"inference-header-content-length")
        encoding = request.headers.get(b"content-encoding")
        body, headers = await infer_answer(request, service, raw, name, version,
                                           header_length.decode("latin-1") if header_length is not None else None,
                                           encoding.decode("latin-1") if encoding is not None else None)
        content_type = headers.pop("content-type").encode()
        return body, content_type, [(key.encode(), value.encode()) for key, value in headers.items()]

    async def within_timeout(self, work: Awaitable):
        """`work`, or 504 once TEXTSERVE_REQUEST_TIMEOUT_S has passed (BentoML's traffic timeout
        for the other routes)."""
        return await within_timeout(work, self.settings.request_timeout_s)


def enabled(settings: ServiceSettings) -> bool:
    """The front answers the hot routes unless turned off, or unless a BentoML middleware that
    must see every request is on (its access log, its tracing)."""
    return settings.fast_front and not settings.access_log and not settings.tracing


def install(service_definition, admission: Admission, current_instance: Callable[[], object | None],
            settings: ServiceSettings = SETTINGS, page_of: Callable[[str], str | None] | None = None) -> None:
    """Make BentoML's app factory return, for `service_definition` (the decorated TextService),
    its app behind FastFront when the front is enabled, behind the service's own pages
    (docs_page.Pages, in place of BentoML's index) and behind access.RequireKeys when keys are
    configured (outermost: no route is answered before the key is checked). Idempotent."""
    from _bentoml_impl.server.app import ServiceAppFactory

    if getattr(ServiceAppFactory, "_textserve_front", False):
        return
    build = ServiceAppFactory.__call__

    def build_with_front(factory):
        app = build(factory)
        if factory.service is not service_definition:
            return app  # another service (the runner) keeps BentoML's app as it is
        if enabled(settings):
            app = FastFront(app, admission, settings, current_instance)
        if page_of is not None:
            app = docs_page.Pages(app, page_of)
        return access.wrap(app, settings)

    ServiceAppFactory.__call__ = build_with_front
    ServiceAppFactory._textserve_front = True
