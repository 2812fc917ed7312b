"""The one HTTP pipeline (services/http/pipeline.py) on a real event loop, around real ASGI apps
standing for BentoML's and FastAPI's: the order of its steps, and each concern it owns (keys,
404 / 405, admission before the body, the body limit and decompression, the timeout, one error
shape, timing headers, connection recycling, metrics by route name). Against a real server:
tests/test_attacks.py, tests/test_errors.py and the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import gzip
import json
import random
import weakref
import zlib

import pytest

from services import metrics
from services.config import ServiceSettings
from services.errors import ApiError
from services.http.admission import Admission
from services.http.body import MAX_GZIP_MEMBERS, inflate
from services.http.deadline import within_timeout
from services.http.pipeline import Pipeline
from services.http.routes import FRONT, RouteTable, check_against_document

JSON = b"application/json"


class Apps:
    """BentoML's app and FastAPI's, as far as the pipeline sees them: they note what reached them."""

    def __init__(self, delay_s: float = 0.0, stream_gap_s: float | None = None) -> None:
        self.reached: list[tuple[str, str, bytes]] = []
        self.delay_s = delay_s
        self.stream_gap_s = stream_gap_s  # answer in three chunks this far apart

    async def bentoml(self, scope, receive, send):
        self.reached.append(("bentoml", scope["path"], b""))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def fastapi(self, scope, receive, send):
        body = (await receive())["body"]
        self.reached.append(("app", scope["path"], body))
        await asyncio.sleep(self.delay_s)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", JSON)]})
        if self.stream_gap_s is not None:
            for index in range(3):
                await asyncio.sleep(self.stream_gap_s)
                await send({"type": "http.response.body", "body": str(index).encode(), "more_body": index < 2})
            return
        await send({"type": "http.response.body", "body": json.dumps({"length": len(body)}).encode()})


async def classify(exchange, service, body, parameters):
    exchange.state.model = "m"
    return json.dumps({"texts": json.loads(body)["texts"]}).encode(), JSON, []


def pipeline(apps: Apps | None = None, admission: Admission | None = None, rng=None, **settings) -> Pipeline:
    apps = apps or Apps()
    return Pipeline(apps.bentoml, apps.fastapi, admission or Admission(100), lambda: object(),
                    {"/classify": classify}, lambda route, with_models: (f"{route} {with_models}".encode(), []),
                    ServiceSettings(**settings), rng=rng)


def call(app: Pipeline, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         chunks: list[bytes] | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through `app` on a fresh event loop: (status, headers, body)."""
    sent = []
    messages = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks)] \
        if chunks is not None else [{"type": "http.request", "body": body, "more_body": False}]
    raw_headers = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    if chunks is None and method == "POST":
        raw_headers.append((b"content-length", str(len(body)).encode()))

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # the connection stays open

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path, "headers": raw_headers, "client": ("127.0.0.1", 1)},
                    receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def counted(endpoint: str, status: str) -> float:
    return metrics.requests_total.labels(model="", endpoint=endpoint, status=status)._value.get()


def test_every_answer_has_the_timing_headers_and_errors_one_shape():
    app = pipeline()
    for method, path, body in (("POST", "/classify", b'{"texts": ["a"]}'), ("GET", "/models", b""), ("GET", "/livez", b""),
                               ("GET", "/nowhere", b""), ("GET", "/classify", b"")):
        status, headers, answer = call(app, method, path, body)
        assert {b"x-queue-time", b"x-inference-time", b"x-total-time"} <= headers.keys(), path
        assert int(headers[b"content-length"]) == len(answer) if b"content-length" in headers else True
        if status >= 400:
            assert headers[b"content-type"] == JSON and list(json.loads(answer)) == ["error"], path
    assert call(app, "GET", "/nowhere")[:1] == (404,)
    status, headers, answer = call(app, "GET", "/classify")
    assert status == 405 and headers[b"allow"] == b"POST" and json.loads(answer)["error"] == "GET is not allowed on /classify"


def test_each_route_reaches_its_one_handler():
    apps = Apps()
    app = pipeline(apps)
    assert call(app, "POST", "/classify", b'{"texts": ["a", "b"]}')[2] == b'{"texts": ["a", "b"]}'  # FRONT: no app reached
    call(app, "GET", "/metrics")
    call(app, "POST", "/explain", b"{}")
    assert call(app, "GET", "/playground")[2] == b"/playground True"
    assert apps.reached == [("bentoml", "/metrics", b""), ("app", "/explain", b"{}")]


def test_the_key_comes_first_and_an_unknown_path_needs_one_too():
    apps = Apps()
    app = pipeline(apps, api_keys="k1", admin_keys="boss")
    assert call(app, "POST", "/explain", b"{}")[0] == 401
    assert call(app, "GET", "/no/such/path")[0] == 401  # without a key, nothing tells what exists
    assert call(app, "GET", "/no/such/path", headers={"Authorization": "Bearer k1"})[0] == 404
    assert call(app, "POST", "/v2/repository/models/m/load", b"{}", {"Authorization": "Bearer k1"})[0] == 403
    assert call(app, "GET", "/v2/health/live")[0] == 200 and call(app, "GET", "/metrics")[0] == 200
    assert apps.reached == [("app", "/v2/health/live", b""), ("bentoml", "/metrics", b"")]
    # Open pages name the models only to a caller with a key.
    assert call(app, "GET", "/openapi.json")[2] == b"/openapi.json False"
    assert call(app, "GET", "/openapi.json", headers={"Authorization": "Bearer k1"})[2] == b"/openapi.json True"


def test_a_full_worker_refuses_an_admitting_route_before_reading_its_body_and_still_answers_the_rest():
    admission = Admission(limit=4)
    admission.reserve(4)
    apps = Apps()
    app = pipeline(apps, admission)
    status, headers, answer = call(app, "POST", "/explain", chunks=[])  # no body message at all: never read
    assert status == 429 and headers[b"retry-after"] == b"1" and json.loads(answer)["error"].startswith("overloaded: 4 texts")
    assert call(app, "GET", "/models")[0] == 200 and apps.reached == [("app", "/models", b"")]


def test_a_body_over_the_limit_is_refused_declared_or_as_it_passes_and_the_connection_closes():
    app = pipeline(max_body_bytes=100)
    status, headers, answer = call(app, "POST", "/explain", b"x" * 101)
    assert status == 413 and headers[b"connection"] == b"close" and "has 101 bytes; the limit is 100" in json.loads(answer)["error"]
    status, _, answer = call(app, "POST", "/explain", chunks=[b"x" * 60, b"x" * 60])
    assert status == 413 and "passed the limit of 100 bytes" in json.loads(answer)["error"]
    assert call(app, "POST", "/explain", chunks=[b"x" * 50, b"x" * 50])[2] == b'{"length": 100}'


def test_a_compressed_body_is_inflated_within_the_limit_for_every_route():
    apps = Apps()
    app = pipeline(apps, max_body_bytes=1000)
    assert call(app, "POST", "/explain", gzip.compress(b"y" * 1000), {"Content-Encoding": "gzip"})[2] == b'{"length": 1000}'
    status, _, answer = call(app, "POST", "/explain", gzip.compress(b" " * 100_000), {"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed request body passes the limit of 1000 bytes" in json.loads(answer)["error"]
    status, _, answer = call(app, "POST", "/explain", b"not gzip", {"Content-Encoding": "gzip"})
    assert status == 400 and "not valid gzip data" in json.loads(answer)["error"]
    status, _, answer = call(app, "POST", "/explain", b"{}", {"Content-Encoding": "br"})
    assert status == 400 and "unsupported Content-Encoding 'br'" in json.loads(answer)["error"]


@pytest.mark.parametrize("encoding,compress", [("gzip", gzip.compress), ("deflate", zlib.compress), ("GZIP", gzip.compress),
                                               ("deflate", lambda b: zlib.compress(b, wbits=-15)), ("identity", lambda b: b)])
def test_the_encodings_clients_send_are_inflated(encoding, compress):
    assert inflate(compress(b"hello " * 100), encoding, 600) == b"hello " * 100


def test_gzip_members_are_joined_up_to_a_bound():
    assert inflate(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip", 10) == b"abcd"
    with pytest.raises(ApiError, match=f"more than {MAX_GZIP_MEMBERS} concatenated"):
        inflate(gzip.compress(b"") * (MAX_GZIP_MEMBERS + 1), "gzip", 10)
    with pytest.raises(ApiError, match="not valid gzip"):
        inflate(gzip.compress(b"abc")[:-5], "gzip", 10)


def test_no_answer_started_in_time_is_504_a_started_stream_is_never_cut():
    status, headers, answer = call(pipeline(Apps(delay_s=5), request_timeout_s=1), "POST", "/explain", b"{}")
    assert status == 504 and "no answer within 1 s (TEXTSERVE_REQUEST_TIMEOUT_S)" in json.loads(answer)["error"]
    assert headers[b"connection"] == b"close"
    status, _, answer = call(pipeline(Apps(stream_gap_s=0.6), request_timeout_s=1), "POST", "/explain", b"{}")
    assert (status, answer) == (200, b"012")  # its last chunk left 1.8 s after the start, past the 1 s timeout


def test_a_model_change_past_its_time_says_it_goes_on():
    async def late(variable: str) -> ApiError:
        with pytest.raises(ApiError) as refused:
            await within_timeout(asyncio.sleep(10), 0.05, variable)
        return refused.value

    change = asyncio.run(late("TEXTSERVE_MODEL_LOAD_TIMEOUT_S"))
    assert change.status == 504 and "the change goes on and may still complete" in change.message
    request = asyncio.run(late("TEXTSERVE_REQUEST_TIMEOUT_S"))
    assert request.message.endswith("(TEXTSERVE_REQUEST_TIMEOUT_S); the request was cancelled")


REQUEST_CONTEXT = contextvars.ContextVar("request_context")


class RequestContext:
    """Stands for a request's tracing span: something only the request should keep alive."""


def test_finished_requests_are_let_go_at_once():
    # BentoML's own timeout middleware kept each request's context for the whole timeout.
    app = pipeline(request_timeout_s=30)

    def one_request() -> weakref.ref:
        context = RequestContext()
        token = REQUEST_CONTEXT.set(context)
        call(app, "GET", "/models")
        REQUEST_CONTEXT.reset(token)
        return weakref.ref(context)

    references = [one_request() for _ in range(100)]
    gc.collect()
    assert sum(reference() is not None for reference in references) == 0


def test_about_one_response_in_n_closes_its_connection():
    def closes(app) -> bool:
        return call(app, "GET", "/models")[1].get(b"connection") == b"close"

    assert all(closes(pipeline(requests_per_connection=1)) for _ in range(10))
    assert not any(closes(pipeline(requests_per_connection=0)) for _ in range(10))
    sampled = pipeline(rng=random.Random(7), requests_per_connection=10)
    closed = sum(closes(sampled) for _ in range(1000))
    assert 65 <= closed <= 135  # binomial(1000, 0.1): mean 100, sd 9.5


def test_requests_are_counted_once_by_route_name_never_by_raw_path():
    app = pipeline()
    before = counted("unmatched", "404"), counted("/v2/models/{name}", "200")
    for index in range(20):
        call(app, "GET", f"/static_assets/{index}")
    call(app, "GET", "/v2/models/abc")
    assert counted("unmatched", "404") - before[0] == 20
    assert counted("/v2/models/{name}", "200") - before[1] == 1
    labels = {sample.labels.get("endpoint") for family in metrics.requests_total.collect() for sample in family.samples}
    assert not any(label and label.startswith("/static_assets") for label in labels)


def test_the_route_table_matches_templates_and_methods():
    table = RouteTable()
    assert table.match("POST", "/v2/models/kim-cnn-trec6/infer").route.handler == FRONT
    versioned = table.match("POST", "/v2/models/kim-cnn-trec6/versions/abc/infer")
    assert versioned.route.name == "/v2/models/{name}/infer" and versioned.parameters == {"name": "kim-cnn-trec6", "version": "abc"}
    for path in ("/classify/", "/v2/models//infer", "/v2/models/a/b/infer", "/v2/models/a/versions//infer", "/static_assets/x"):
        assert table.match("POST", path).route is None, path
    assert table.match("GET", "/classify").allowed == ("POST",)


def test_the_table_and_the_openapi_document_are_checked_against_each_other():
    import services.service as service

    check_against_document(service.OPENAPI(with_models=False))
    document = json.loads(json.dumps(service.OPENAPI(with_models=False)))
    document["paths"]["/secret"] = {"get": {}}
    del document["paths"]["/explain"]
    with pytest.raises(RuntimeError, match=r"not in the table \[\('/secret', 'GET'\)\]; not documented \[\('/explain', 'POST'\)\]"):
        check_against_document(document)
