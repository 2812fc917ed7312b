"""Admission: the per-worker count of texts in flight and the refusal before the body is read."""

import asyncio
import json

import pytest

from services.http.admission import Admission, RefuseWhenFull, admitting_route
from services.http.errors import ApiError


def test_reserve_counts_cost_up_to_the_limit_and_refuses_past_it():
    admission = Admission(limit=10)
    admission.reserve(6)
    admission.reserve(4)  # exactly the limit is admitted
    assert admission.pending == 10 and admission.full
    with pytest.raises(ApiError) as refused:
        admission.reserve(1)
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "1"}
    assert "10 texts" in refused.value.message and "TEXTSERVE_MAX_PENDING_TEXTS" in refused.value.message
    assert admission.pending == 10  # a refusal counts nothing
    admission.release(7)
    assert admission.pending == 3 and not admission.full
    admission.reserve(7)


def test_a_request_larger_than_the_limit_is_413_not_429():
    admission = Admission(limit=10)
    with pytest.raises(ApiError) as refused:
        admission.reserve(11)
    assert refused.value.status == 413 and "send fewer" in refused.value.message
    assert admission.pending == 0


@pytest.mark.parametrize(("method", "path", "route"), [
    ("POST", "/classify", "/classify"),
    ("POST", "/lm/generate", "/lm/{api}"),
    ("POST", "/v2/models/kim-cnn-trec6/infer", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/kim-cnn-trec6/versions/1/infer", "/v2/models/{name}/infer"),
    ("GET", "/classify", None),
    ("GET", "/v2/health/ready", None),
    ("POST", "/classify/extra", None),
    ("POST", "/v2/models/a/b/infer", None),
])
def test_only_inference_posts_are_admitting_routes(method, path, route):
    assert admitting_route(method, path) == route


def call(middleware, method: str, path: str) -> tuple[list[dict], list[str]]:
    """Run one request through `middleware`; the messages it sent and what the inner app saw."""
    sent, reached = [], []

    async def inner_app(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        raise AssertionError("a refusal must not read the body")

    async def send(message):
        sent.append(message)

    asyncio.run(RefuseWhenFull(inner_app, middleware)({"type": "http", "method": method, "path": path}, receive, send))
    return sent, reached


def test_a_full_worker_refuses_an_inference_post_without_reading_it():
    admission = Admission(limit=4)
    admission.reserve(4)
    sent, reached = call(admission, "POST", "/classify")
    assert reached == []
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 429 and headers[b"retry-after"] == b"1" and b"x-total-time" in headers
    assert int(headers[b"content-length"]) == len(body["body"])
    assert json.loads(body["body"])["error"].startswith("overloaded: 4 texts")


def test_a_full_worker_still_answers_probes_and_a_worker_with_room_admits():
    full = Admission(limit=1)
    full.reserve(1)
    assert call(full, "GET", "/v2/health/ready")[1] == ["/v2/health/ready"]
    room = Admission(limit=2)
    room.reserve(1)  # one more text fits: the service decides on the parsed cost
    sent, reached = call(room, "POST", "/classify")
    assert reached == ["/classify"] and sent[0]["status"] == 200
