"""Every kind of bad input and the answer it gets, against a real server: the rows of
docs/errors.md, one case each (a test checks that the document and this table agree).

Each case sends its input and checks the status and that the JSON error says what was wrong;
after the whole table the server still answers a good request from every worker."""

from __future__ import annotations

import json
import re
import select
import socket
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import requests

from tests.conftest import REPOSITORY, ZOO
from tests.serving import running_server

CLASSIFIER, LANGUAGE_MODEL = "kim-cnn-trec6", "char-lm-small-ptb"
HEADER_TIMEOUT_S, REQUEST_TIMEOUT_S = 2, 4  # short here so that the slow-client cases are quick
ERRORS_DOC = REPOSITORY / "docs" / "errors.md"


@dataclass(frozen=True)
class Answer:
    status: int
    body: str


@dataclass(frozen=True)
class Case:
    id: str
    send: Callable[[str], Answer]
    status: int
    says: str  # a fragment of the "error" message (or of the body, for a 200)


def post(path: str, body=None, data: bytes | None = None, **kwargs) -> Callable[[str], Answer]:
    def send(url: str) -> Answer:
        headers = {"content-type": "application/json"} if data is not None else {}
        response = requests.post(url + path, json=body, data=data, headers=headers, timeout=60, **kwargs)
        return Answer(response.status_code, response.text)
    return send


def get(path: str) -> Callable[[str], Answer]:
    def send(url: str) -> Answer:
        response = requests.get(url + path, timeout=30)
        return Answer(response.status_code, response.text)
    return send


def raw(url: str, first: bytes, then: Callable[[socket.socket], None]) -> Answer:
    """Speak HTTP over a socket: send `first`, run `then` (the slow part), read the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(first)
        try:
            then(sock)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection: its answer is already in the buffer
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
            if b"\r\n\r\n" in reply:
                head, _, body = reply.partition(b"\r\n\r\n")
                length = re.search(rb"content-length: (\d+)", head, re.I)
                if length and len(body) >= int(length.group(1)):
                    break
    status_line, _, rest = reply.partition(b"\r\n")
    return Answer(int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode())


def trickle(sock: socket.socket, chunks, interval_s: float = 1.0) -> None:
    """Send `chunks` one every interval_s, stopping as soon as the server has answered."""
    for chunk in chunks:
        if select.select([sock], [], [], 0)[0]:
            return
        sock.sendall(chunk)
        time.sleep(interval_s)


def slowloris(url: str) -> Answer:
    """Headers one line a second, never finished."""
    return raw(url, b"POST /classify HTTP/1.1\r\nHost: textserve\r\n",
               lambda sock: trickle(sock, [b"X-Slow: 1\r\n"] * (HEADER_TIMEOUT_S * 5)))


def silent_connection(url: str) -> Answer:
    """A connection that never sends a byte."""
    return raw(url, b"", lambda sock: trickle(sock, [b""] * (HEADER_TIMEOUT_S * 3)))


def slow_body(url: str) -> Answer:
    """Complete headers, then the body one byte a second."""
    body = json.dumps({"model": CLASSIFIER, "texts": ["Who wrote Hamlet ?"]}).encode()
    head = (f"POST /classify HTTP/1.1\r\nHost: textserve\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return raw(url, head, lambda sock: trickle(sock, [bytes([byte]) for byte in body]))


def header_lines(lines: list[bytes]) -> Callable[[str], Answer]:
    """A GET whose headers are `lines`, sent at once."""
    return lambda url: raw(url, b"GET /v2/health/live HTTP/1.1\r\nHost: textserve\r\n" + b"".join(lines) + b"\r\n",
                           lambda sock: None)


def gzip_bomb(url: str) -> Answer:
    """38 KB of gzip that inflates to 40 MB."""
    import gzip

    response = requests.post(f"{url}/classify", data=gzip.compress(b" " * 40_000_000, 9),
                             headers={"content-type": "application/json", "content-encoding": "gzip"}, timeout=60)
    return Answer(response.status_code, response.text)


def chunked_body(size: int) -> Callable[[str], Answer]:
    def send(url: str) -> Answer:
        response = requests.post(f"{url}/classify", data=(b"x" * 1_000_000 for _ in range(size // 1_000_000)),
                                 headers={"content-type": "application/json"}, timeout=60)
        return Answer(response.status_code, response.text)
    return send


def huge_picture() -> str:
    """A 2,100 x 2,100 PNG (4.4 million pixels, over the 4,194,304 limit) that compresses to a few KB."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (2100, 2100), 255).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


HUGE_PICTURE = huge_picture()
C, L = CLASSIFIER, LANGUAGE_MODEL
CASES = [
    Case("invalid-json", post("/classify", data=b'{"model": "kim-cnn-trec6", "texts": [nope]}'), 400, "the body is not valid JSON"),
    Case("not-an-object", post("/classify", [C, ["x"]]), 400, "body: Input should be an object"),
    Case("wrong-type-field", post("/classify", {"model": C, "texts": "Who?"}), 400, "texts: Input should be a valid array"),
    Case("wrong-type-item", post("/classify", {"model": C, "texts": ["Who?", 7]}), 400, "texts.1: Input should be a valid string"),
    Case("null-item", post("/classify", {"model": C, "texts": [None]}), 400, "texts.0: Input should be a valid string"),
    Case("missing-field", post("/classify", {"texts": ["Who?"]}), 400, "model: this field is required"),
    Case("unknown-field", post("/classify", {"model": C, "texts": ["Who?"], "colour": "red"}), 400, "colour: unknown field"),
    Case("empty-list", post("/classify", {"model": C, "texts": []}), 400, "texts is empty: send at least one text"),
    Case("empty-string", post("/classify", {"model": C, "texts": ["Who?", "  "]}), 400, "texts[1] is empty or only whitespace"),
    Case("non-utf8", post("/classify", data=b'{"model": "kim-cnn-trec6", "texts": ["caf\xe9"]}'), 400, "the body is not valid JSON"),
    Case("lone-surrogate", post("/classify", data=b'{"model": "kim-cnn-trec6", "texts": ["Who\\ud800 ?"]}'), 400,
         "texts[0] holds a lone surrogate \\ud800 at character 3, which is no Unicode character"),
    Case("control-characters", post("/classify", {"model": C, "texts": ["Who\x00 wrote\x07 Hamlet\x1b ?"]}), 200, '"label":'),
    Case("text-of-1-mb", post("/classify", {"model": C, "texts": ["a" * 1_000_000]}), 413,
         "texts[0] has 1000000 characters; the limit is 2000 (TEXTSERVE_MAX_TEXT_CHARS)"),
    Case("100000-texts", post("/classify", {"model": C, "texts": ["Who?"] * 100_000}), 413,
         "100000 texts in one request; the limit is 256 (TEXTSERVE_MAX_TEXTS_PER_REQUEST)"),
    Case("body-of-50-mb", post("/classify", data=b"x" * 50_000_000), 413,
         "the request body has 50000000 bytes; the limit is 4194304 bytes (TEXTSERVE_MAX_BODY_BYTES)"),
    Case("chunked-body-over-the-limit", chunked_body(50_000_000), 413, "passed the limit of 4194304 bytes (TEXTSERVE_MAX_BODY_BYTES)"),
    Case("deeply-nested-json", post("/classify", data=b'{"texts":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400, "the body is not valid JSON"),
    Case("unknown-model", post("/classify", {"model": "kim-cnn-imdb", "texts": ["Who?"]}), 404, "unknown model 'kim-cnn-imdb'; loaded models:"),
    Case("unknown-model-says-how-to-add-it", post("/classify", {"model": "kim-cnn-imdb", "texts": ["Who?"]}), 404,
         "put its bundle folder kim-cnn-imdb/ in the zoo folder (TEXTSERVE_ZOO) (python -m training export --bundle ZOO/kim-cnn-imdb) "
         "and restart the server, or run the server with TEXTSERVE_MODEL_CONTROL=explicit and "
         "POST /v2/repository/models/kim-cnn-imdb/load"),
    Case("path-like-model-name", post("/classify", {"model": "../../etc/passwd", "texts": ["Who?"]}), 404, "unknown model '../../etc/passwd'"),
    Case("path-like-model-name-is-never-a-path", post("/classify", {"model": "../../etc/passwd", "texts": ["Who?"]}), 404,
         "A model's name is its bundle folder's: letters, digits, '.', '_' and '-', never a path"),
    Case("path-like-model-in-url", get("/v2/models/..%2F..%2Fetc%2Fpasswd/ready"), 404, "no such endpoint"),
    Case("wrong-kind-of-model", post("/lm/score", {"model": C, "texts": ["Who?"]}), 400,
         "model 'kim-cnn-trec6' is a classifier; this endpoint needs a language model"),
    Case("unknown-endpoint", get("/predict"), 404, "no such endpoint: GET /predict"),
    Case("wrong-method", get("/classify"), 405, "GET is not allowed on /classify"),
    Case("top-k-out-of-range", post("/classify", {"model": C, "texts": ["Who?"], "top_k": 10**12}), 400,
         "top_k must be between 1 and 6 (the model's label count), got 1000000000000"),
    Case("v2-wrong-datatype", post(f"/v2/models/{C}/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}),
         400, "input 'text' must have datatype BYTES"),
    Case("v2-wrong-shape", post(f"/v2/models/{C}/infer", {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["Who?"]}]}),
         400, "'data' has 1 element(s) but shape [2] requires 2"),
    Case("v2-wrong-input-name", post(f"/v2/models/{C}/infer", {"inputs": [{"name": "sentence", "shape": [1], "datatype": "BYTES", "data": ["Who?"]}]}),
         400, "one BYTES input named 'text'"),
    Case("v2-unknown-model", post("/v2/models/kim-cnn-imdb/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Who?"]}]}),
         404, "unknown model 'kim-cnn-imdb'"),
    Case("generate-negative-words", post("/lm/generate", {"model": L, "prefix": "the", "max_words": -1}), 400,
         "max_words must be between 1 and 200 (TEXTSERVE_MAX_GENERATE_WORDS), got -1"),
    Case("generate-huge-words", post("/lm/generate", {"model": L, "prefix": "the", "max_words": 10**9}), 400,
         "max_words must be between 1 and 200 (TEXTSERVE_MAX_GENERATE_WORDS), got 1000000000"),
    Case("generate-nan-temperature", post("/lm/generate", data=b'{"model": "char-lm-small-ptb", "prefix": "the", "max_words": 3, "temperature": NaN}'),
         400, "temperature must be a number from 0 (greedy) to 10, got nan"),
    Case("generate-infinite-temperature", post("/lm/generate", data=b'{"model": "char-lm-small-ptb", "prefix": "the", "max_words": 3, "temperature": 1e999}'),
         400, "temperature must be a number from 0 (greedy) to 10, got inf"),
    Case("image-not-base64", post("/classify-image", {"model": "digits-cnn", "images": ["%%%"]}), 400,
         "images[0] is a string but not base64"),
    Case("image-not-an-image", post("/classify-image", {"model": "digits-cnn", "images": ["bm90IGFuIGltYWdl"]}), 400,
         "images[0]: not a readable image: send PNG, JPEG, GIF, BMP or WebP bytes"),
    Case("image-blank", post("/classify-image", {"model": "digits-cnn", "images": [[[0] * 8] * 8]}), 400, "images[0] has no ink: it is blank"),
    Case("image-ragged-array", post("/classify-image", {"model": "digits-cnn", "images": [[[1, 2, 3], [4, 5]]]}), 400,
         "images[0]: rows have different lengths"),
    Case("image-too-many-pixels", post("/classify-image", {"model": "digits-cnn", "images": [HUGE_PICTURE]}), 413,
         "the limit is 4194304 (TEXTSERVE_MAX_IMAGE_PIXELS)"),
    Case("too-many-images", post("/classify-image", {"model": "digits-cnn", "images": [[[1] * 8] * 8] * 65}), 413,
         "65 images in one request; the limit is 64 (TEXTSERVE_MAX_IMAGES_PER_REQUEST)"),
    Case("v2-image-wrong-shape", post("/v2/models/digits-cnn/infer", {"inputs": [{"name": "images", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": [0.5] * 16}]}),
         400, "input 'images' must have shape [N, 1, 16, 16], got [1, 1, 4, 4]"),
    Case("header-of-20-kb", header_lines([b"X-Big: " + b"a" * 20_000 + b"\r\n"]), 431,
         "the request line and headers pass 16384 bytes (TEXTSERVE_MAX_HEADER_BYTES)"),
    Case("150-headers", header_lines([b"X-H%d: v\r\n" % index for index in range(150)]), 431,
         "more than 100 header lines (TEXTSERVE_MAX_HEADERS)"),
    Case("gzip-bomb", gzip_bomb, 413, "the decompressed request body passes the limit of 4194304 bytes (TEXTSERVE_MAX_BODY_BYTES)"),
    Case("slowloris-headers", slowloris, 408, f"the request headers did not arrive within {HEADER_TIMEOUT_S} s (TEXTSERVE_HEADER_TIMEOUT_S)"),
    Case("silent-connection", silent_connection, 408, "(TEXTSERVE_HEADER_TIMEOUT_S)"),
    Case("slow-body", slow_body, 504, f"no answer within {REQUEST_TIMEOUT_S} s (TEXTSERVE_REQUEST_TIMEOUT_S)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("bentoml_home"), ZOO, http_workers="2", models=f"{C},{L},digits-cnn",
                        header_timeout_s=str(HEADER_TIMEOUT_S), request_timeout_s=str(REQUEST_TIMEOUT_S)) as url:
        yield url


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_its_status_and_a_message_that_says_what_was_wrong(server, case):
    answer = case.send(server)
    assert answer.status == case.status, answer.body[:500]
    if case.status == 200:
        assert case.says in answer.body
        return
    error = json.loads(answer.body)["error"]
    assert case.says in error, error


def test_the_server_still_answers_from_every_worker_after_the_table(server):
    for case in CASES:
        if case.id in ("body-of-50-mb", "100000-texts", "chunked-body-over-the-limit"):
            case.send(server)  # the heaviest ones again, back to back
    for _ in range(10):  # several connections: both workers
        answer = requests.post(f"{server}/classify", json={"model": C, "texts": ["Who wrote Hamlet ?"]},
                               headers={"connection": "close"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["results"][0]["label"] == "HUM"


def test_docs_errors_md_has_one_row_per_case_with_its_status():
    first_table = ERRORS_DOC.read_text().partition("## Model management, keys and gRPC")[0]  # the rest: test_model_control.py
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|.*\| (\d{3}) \|", first_table, re.M)
    assert dict(rows) == {case.id: str(case.status) for case in CASES}
    assert len(rows) == len(CASES)


def explain_samples(url: str) -> dict[str, float]:
    """requests_total on /explain by status, summed over the workers."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "textserve_requests_total" and sample.labels.get("endpoint") == "/explain":
                counts[sample.labels["status"]] = counts.get(sample.labels["status"], 0) + sample.value
    return counts


def test_a_timeout_an_oversize_body_and_a_client_that_left_are_counted_as_what_they_were(server):
    # /explain is answered by the FastAPI app: the pipeline gives the 504, the 413 and the 499 around it.
    time.sleep(1)  # the table's last requests are counted
    before = explain_samples(server)
    body = json.dumps({"model": C, "texts": ["Who wrote Hamlet ?"]}).encode()
    head = f"POST /explain HTTP/1.1\r\nHost: textserve\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    timed_out = raw(server, head.encode(), lambda sock: trickle(sock, [bytes([byte]) for byte in body]))
    assert timed_out.status == 504
    oversize = requests.post(f"{server}/explain", data=(b"x" * 1_000_000 for _ in range(6)),
                             headers={"content-type": "application/json"}, timeout=60)
    assert oversize.status_code == 413
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body[:10])  # a client that leaves half-way through its body
    expected = {"504": 1, "413": 1, "499": 1}
    deadline = time.monotonic() + 15  # until the server has seen the client go and every worker has counted
    while True:
        after = explain_samples(server)
        delta = {status: n for status in set(after) | set(before) if (n := after.get(status, 0) - before.get(status, 0))}
        if delta == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(0.5)  # and nothing more is counted after it
    after = explain_samples(server)
    assert {status: n for status in set(after) | set(before) if (n := after.get(status, 0) - before.get(status, 0))} == expected


def test_an_unknown_models_message_names_a_few_close_ones_not_the_whole_zoo():
    from services.errors import some_names

    zoo = sorted(folder.name for folder in ZOO.iterdir() if (folder / "manifest.json").exists())
    message = some_names(zoo, "kim-cnn-imdb")
    assert len(zoo) > 20 and len(message) < 200  # the whole zoo made a 1,000-character line
    assert "'kim-cnn-mr'" in message and "'kim-cnn-trec6'" in message
    assert message.endswith(f"and {len(zoo) - 6} more (GET /models lists every one)")
    assert some_names(["b", "a"], "c") == "['a', 'b']"  # a few: every one of them
