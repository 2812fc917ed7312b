"""The one HTTP pipeline: every request to the service passes through it, in this order.

    uvicorn, with connection_limits.py: header bytes and count (431), header time (408)
      -> route match (routes.py: path -> route; its access, admission, handler, timeout)
      -> key (access.py; 401 / 403), before anything else of the request is looked at
      -> 404 / 405 for a path or method nobody serves
      -> admission: a full worker refuses an admitting route at once (429), its body unread
      -> body: TEXTSERVE_MAX_BODY_BYTES as it arrives, Content-Encoding undone within the same
         limit, off the event loop when large (body.py; 413, 400)
      -> handler, within the route's timeout (deadline.py; 504), a started stream never cut:
         FRONT routes through their own functions, APP routes through FastAPI, PAGE routes
         from docs_page.py, BENTOML routes (probes, /metrics) through BentoML's app
      -> one error mapping (services/errors.py): {"error": ...} with its status and headers
      -> timing headers (request_timing.py), keep-alive recycling, one count in the request
         metrics by route name and status, the access log line when it is on

Why a front of our own: a py-spy profile of a worker under 64 connections found a one-text
/classify spending most of its event-loop CPU around the model, not in it (Starlette's and
FastAPI's routing and dependency solving 28 %, BentoML's traffic metrics, tracing and context
middlewares 8 %, our own middlewares 9 %: docs/performance-history.md). Answering every route here, with
each concern written once, costs one pass. BentoML's middlewares label their metrics by raw
path (a client choosing paths grew /metrics without bound), so no request but the probes and
/metrics reaches them; the access log and tracing are done here (tracing by OpenTelemetry's
ASGI middleware around this pipeline, with BentoML's configured tracer).

Connection recycling: each response asks the client to close its connection with probability
1 / TEXTSERVE_REQUESTS_PER_CONNECTION. The workers share one listening socket and a keep-alive
connection stays with the worker that accepted it; `make bench` saw all 64 of its connections
on one of two workers for a whole level. nginx (`keepalive_requests`) and Envoy
(`max_requests_per_connection`) bound the requests of a connection for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from services import metrics
from services.config import SETTINGS, ServiceSettings
from services.errors import ApiError, error_body, http_headers, internal_error, overloaded
from services.http import access, request_timing
from services.http.admission import Admission
from services.http.body import decoded, too_large_message
from services.http.deadline import MODEL_CHANGE_VARIABLE, REQUEST_VARIABLE, model_change_timeout_s, within_timeout
from services.http.routes import ADMIN, APP, BENTOML, FRONT, KEY, MODEL_CHANGE, PAGE, TABLE, UNMATCHED, Route

logger = logging.getLogger("bentoml.textserve")
access_logger = logging.getLogger("bentoml.textserve.access")  # not "bentoml.access", which BentoML silences with its own access log off
JSON = b"application/json"
STARTING = "the server is starting: its models are not loaded yet; retry shortly"
CLOSES_CONNECTION = (408, 413, 431, 504)  # the unread rest of the request must not be parsed as another


class ClientLeft(Exception):
    """The client closed its connection before its whole body arrived: nobody to answer."""


@dataclass
class RequestState:
    """What a route notes while it handles a request (FastAPI's `request.state`)."""

    model: str = ""


class Exchange:
    """One request as the pipeline follows it (made for every request: slots, no dataclass
    machinery)."""

    __slots__ = ("scope", "started", "endpoint", "inference", "status", "close", "timing", "state", "headers")

    def __init__(self, scope: dict, close: bool = False) -> None:
        self.scope = scope
        self.started = time.perf_counter()
        self.endpoint = UNMATCHED
        self.inference = False  # a route that runs a model (admitted): counted in Triton's statistics
        self.status: int | None = None  # the status sent, once sent
        self.close = close
        self.timing = request_timing.Timing()
        self.state = RequestState()
        self.headers: dict[bytes, bytes] = {}

    @property
    def answering(self) -> bool:
        return self.status is not None

    @property
    def model(self) -> str:
        return self.state.model or self.scope.get("state", {}).get("model", "")

    def response_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`headers` and the pipeline's own: the timing headers, and `connection: close` when
        the connection is to end."""
        headers = [*headers, (request_timing.QUEUE_HEADER, request_timing.milliseconds(self.timing.queue_s)),
                   (request_timing.INFERENCE_HEADER, request_timing.milliseconds(self.timing.inference_s)),
                   (request_timing.TOTAL_HEADER, request_timing.milliseconds(time.perf_counter() - self.started))]
        if self.close:
            headers = [(name, value) for name, value in headers if name != b"connection"]
            headers.append((b"connection", b"close"))
        return headers


def close_probability(requests_per_connection: int) -> float:
    """1 / N, or 0 (never) when N is 0."""
    return 1 / requests_per_connection if requests_per_connection > 0 else 0.0


class Pipeline:
    """The ASGI app uvicorn runs in each HTTP worker (installed by bentoml_hook.py).

    `bentoml_app` is BentoML's app for this service (its lifespan builds the TextService
    instance; it answers the BENTOML routes); `app` the FastAPI app of the APP routes; `front`
    maps each FRONT route's name to its answer function; `page_of(page, with_models)` renders
    a PAGE route (None until the service is built)."""

    def __init__(self, bentoml_app, app, admission: Admission, service: Callable[[], object | None],
                 front: dict[str, Callable], page_of: Callable[[str, bool], tuple[bytes, list] | None],
                 settings: ServiceSettings = SETTINGS, rng: random.Random | None = None) -> None:
        self.bentoml_app = bentoml_app
        self.app = app
        self.admission = admission
        self.service = service
        self.front = front
        self.page_of = page_of
        self.settings = settings
        self.table = TABLE
        self.keys = access.process_keys(settings)
        self.close_probability = close_probability(settings.requests_per_connection)
        self.rng = rng or random.Random()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan: BentoML builds and stops the service
            return await self.bentoml_app(scope, receive, send)
        exchange = Exchange(scope, bool(self.close_probability) and self.rng.random() < self.close_probability)
        token = request_timing.current_timing.set(exchange.timing)
        try:
            await self.handle(exchange, receive, send)
        except ApiError as error:
            await self.refuse(exchange, error, send)
        except ClientLeft:
            exchange.status = 499  # nginx's "client closed request"; the answer would go nowhere
        except asyncio.CancelledError:
            raise  # the server is stopping, or the connection is gone: nothing to send
        except Exception as error:  # a bug: logged with its traceback; the client gets a 500 that says so
            if exchange.answering:  # FastAPI's handler answered it and logged it (errors.py), or a stream broke
                logger.warning("%s %s failed after its answer started (%s)", scope["method"], exchange.endpoint, type(error).__name__)
            else:
                logger.exception("unexpected error on %s %s", scope["method"], exchange.endpoint)
                await self.refuse(exchange, internal_error(error), send)
        finally:
            request_timing.current_timing.reset(token)
            self.account(exchange)

    async def handle(self, exchange: Exchange, receive, send) -> None:
        scope = exchange.scope
        method, path = scope["method"], scope["path"]
        match = self.table.match(method, path)
        route = match.route
        exchange.endpoint = route.name if route is not None else UNMATCHED
        exchange.inference = route is not None and route.admits
        exchange.headers = dict(scope["headers"])  # one pass; names arrive lower-cased
        # An unknown path needs a key too: a caller without one learns nothing of what exists.
        needed = self.keys.needed(route.access if route is not None else KEY, self.settings)
        if needed is not None:
            self.keys.check(header_text(exchange.headers.get(b"authorization")), needed == ADMIN)
        if route is None:
            if match.allowed:  # RFC 9110: a 405 says which methods are
                raise ApiError(405, f"{method} is not allowed on {path}", {"Allow": ", ".join(match.allowed)})
            raise ApiError(404, f"no such endpoint: {method} {path}")
        if route.admits and self.admission.full:  # before the body is read, parsed and validated
            raise overloaded(self.admission.refusal_message(), 429)
        if route.handler == PAGE:
            return await self.page(exchange, route, send)
        service = self.service()
        if service is None and route.handler != BENTOML:
            raise overloaded(STARTING, 503)
        timeout_s, variable = self.timeout_of(route)
        await within_timeout(self.dispatch(exchange, route, match.parameters, service, receive, send),
                             timeout_s, variable, lambda: exchange.answering)

    def timeout_of(self, route: Route) -> tuple[float, str]:
        if route.timeout == MODEL_CHANGE:
            return model_change_timeout_s(self.settings.model_load_timeout_s), MODEL_CHANGE_VARIABLE
        return self.settings.request_timeout_s, REQUEST_VARIABLE

    async def dispatch(self, exchange: Exchange, route: Route, parameters: dict[str, str], service, receive, send) -> None:
        if route.handler == BENTOML:  # no body: a probe or /metrics
            return await self.bentoml_app(exchange.scope, receive, self.sender(exchange, send))
        body = await self.body(exchange, receive) if exchange.scope["method"] == "POST" else b""
        if route.handler == FRONT:
            answer, content_type, headers = await self.front[route.name](exchange, service, body, parameters)
            return await self.respond(exchange, 200, answer, [(b"content-type", content_type), *headers], send)
        assert route.handler == APP, route
        await self.app(self.app_scope(exchange, body), replaying(body, receive), self.sender(exchange, send))

    async def body(self, exchange: Exchange, receive) -> bytes:
        """The whole body within TEXTSERVE_MAX_BODY_BYTES, decoded (body.py): a declared length
        over the limit is refused before a byte is read, a chunked body once it passes it."""
        limit = self.settings.max_body_bytes
        declared = exchange.headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, too_large_message(limit, int(declared)))
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft()
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise ApiError(413, too_large_message(limit, None))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return await decoded(body, exchange.headers.get(b"content-encoding"), limit)

    def app_scope(self, exchange: Exchange, body: bytes) -> dict:
        """The scope FastAPI sees: the body it will read is the decoded one, so it is told its
        real length and no encoding."""
        scope = exchange.scope
        if b"content-encoding" not in exchange.headers:
            return scope
        headers = [(name, value) for name, value in scope["headers"] if name not in (b"content-encoding", b"content-length")]
        return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}

    def sender(self, exchange: Exchange, send):
        """`send` for a handler that answers by itself (FastAPI, BentoML): the pipeline's headers
        go on its response start, and the status is noted for the metrics."""

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message = {**message, "headers": exchange.response_headers(list(message.get("headers", [])))}
            await send(message)

        return send_with_headers

    async def page(self, exchange: Exchange, route: Route, send) -> None:
        with_models = not self.keys.enabled or self.keys.accepts(header_text(exchange.headers.get(b"authorization")))
        rendered = self.page_of(route.name, with_models)
        if rendered is None:
            raise overloaded(STARTING, 503)
        body, headers = rendered
        await self.respond(exchange, 200, b"" if exchange.scope["method"] == "HEAD" else body, headers, send,
                           length=len(body))

    async def respond(self, exchange: Exchange, status: int, body: bytes, headers: list[tuple[bytes, bytes]], send,
                      length: int | None = None) -> None:
        exchange.status = status
        headers = [*headers, (b"content-length", str(len(body) if length is None else length).encode())]
        await send({"type": "http.response.start", "status": status, "headers": exchange.response_headers(headers)})
        await send({"type": "http.response.body", "body": body})

    async def refuse(self, exchange: Exchange, error: ApiError, send) -> None:
        """The one mapping of an error to its answer (services/errors.py)."""
        if exchange.answering:  # a stream that failed once started: its status is sent, the connection ends it
            logger.warning("%s failed after its answer started: %s", exchange.endpoint, error.message)
            return
        exchange.close = exchange.close or error.status in CLOSES_CONNECTION
        await self.respond(exchange, error.status, error_body(error.message), [(b"content-type", JSON), *http_headers(error)], send)

    def account(self, exchange: Exchange) -> None:
        """One count per request, by route name (bounded: never the raw path) and status."""
        status = exchange.status if exchange.status is not None else 499
        elapsed = time.perf_counter() - exchange.started
        metrics.count_request(exchange.model, exchange.endpoint, status, elapsed, exchange.inference)
        if self.settings.access_log:  # the path and the route, never a body (BentoML's line, and the route name)
            client = exchange.scope.get("client") or ("-", 0)
            access_logger.info("%s:%s (method=%s,path=%s,route=%s) (status=%s) %.3fms", client[0], client[1],
                               exchange.scope["method"], exchange.scope["path"], exchange.endpoint, status, elapsed * 1000)


def header_text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def replaying(body: bytes, receive):
    """`receive` for a handler: the body already read, then the connection's own messages (a
    streamed answer listens for the client leaving)."""
    given = False

    async def receive_body():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_body
