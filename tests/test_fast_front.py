"""The fast front (services/http/front.py) answers exactly as BentoML's stack does.

Two real servers, one with the front (the default) and one with TEXTSERVE_FAST_FRONT=0, get
the same requests: every bad input of docs/errors.md (tests/test_errors.py's table, but for the
slow-client cases, which the protocol layer answers the same way on both) and good requests to
each hot route. Status, error message and answer must be the same; the hot routes must carry
the timing headers; and the request metrics must count the front's answers under the same
route templates as the stack's."""

from __future__ import annotations

import json

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from services.http.front import CLASSIFY, INFER, SCORE, hot_route
from tests.conftest import ZOO
from tests.serving import running_server
from tests.test_errors import CASES, C, L

SLOW_CASES = {"slowloris-headers", "silent-connection", "slow-body"}
GOOD = [
    ("classify", "/classify", {"model": C, "texts": ["How far is it from Denver to Aspen ?", "Who wrote Hamlet ?"], "top_k": 2}),
    ("score", "/lm/score", {"model": L, "texts": ["the company said it would buy the shares"]}),
    ("v2-classifier", f"/v2/models/{C}/infer", {"id": "7", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                                                      "data": ["What is a bird ?", "Where is Rome ?"]}]}),
    ("v2-language-model", f"/v2/models/{L}/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                                                 "data": ["stock prices fell"]}]}),
]
TOLERANCE = 1e-6  # the same onnxruntime session on both; only batch composition may differ


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    settings = {"http_workers": "1", "models": f"{C},{L},digits-cnn", "request_timeout_s": "4"}
    with running_server(tmp_path_factory.mktemp("front"), ZOO, **settings) as front, \
            running_server(tmp_path_factory.mktemp("stack"), ZOO, fast_front="0", **settings) as stack:
        yield front, stack


def test_hot_routes_are_recognised_by_path():
    assert hot_route("/classify") == (CLASSIFY, None, None)
    assert hot_route("/lm/score") == (SCORE, None, None)
    assert hot_route("/v2/models/kim-cnn-trec6/infer") == (INFER, "kim-cnn-trec6", None)
    assert hot_route("/v2/models/kim-cnn-trec6/versions/abc/infer") == (INFER, "kim-cnn-trec6", "abc")
    for other in ("/classify/", "/lm/next", "/v2/models//infer", "/v2/models/a/b/infer", "/v2/models/a/versions//infer", "/explain"):
        assert hot_route(other) is None, other


@pytest.mark.parametrize("case", [case for case in CASES if case.id not in SLOW_CASES], ids=lambda case: case.id)
def test_bad_input_gets_the_same_answer_from_the_front_and_the_stack(servers, case):
    front, stack = (case.send(url) for url in servers)
    assert front.status == stack.status == case.status, (front.body[:300], stack.body[:300])
    if case.status != 200:
        assert json.loads(front.body) == json.loads(stack.body)


@pytest.mark.parametrize("name,path,body", GOOD, ids=[name for name, _, _ in GOOD])
def test_good_requests_get_the_same_answer(servers, name, path, body):
    answers = [requests.post(url + path, json=body, timeout=30) for url in servers]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        for header in ("x-queue-time", "x-inference-time", "x-total-time"):
            assert float(answer.headers[header]) >= 0
    assert float(answers[0].headers["x-inference-time"]) > 0  # the front saw the batch's time
    assert_close(answers[0].json(), answers[1].json())


def assert_close(a, b, where="body"):
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= TOLERANCE, f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_the_fronts_answers_are_counted_under_the_route_templates(servers):
    front, _ = servers
    requests.post(f"{front}/classify", json={"model": C, "texts": ["Who?"]}, timeout=30)
    requests.post(f"{front}/v2/models/{C}/infer", json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, timeout=30)
    requests.post(f"{front}/classify", json={"model": "nope", "texts": ["Who?"]}, timeout=30)
    counted = {}
    for family in text_string_to_metric_families(requests.get(f"{front}/metrics", timeout=30).text):
        if family.name == "textserve_requests":
            for sample in family.samples:
                if sample.name == "textserve_requests_total":
                    counted[(sample.labels["model"], sample.labels["endpoint"], sample.labels["status"])] = sample.value
    assert counted[(C, "/classify", "200")] >= 1
    assert counted[(C, "/v2/models/{name}/infer", "200")] >= 1
    assert counted[("", "/classify", "404")] >= 1
