"""Model management while serving, API keys and OIP v2 over gRPC, end to end with the real
clients (tritonclient.http and tritonclient.grpc) against `bentoml serve` with two HTTP
workers: a bundle exported during the test is loaded, served by both workers, reloaded with
other weights while requests keep arriving (none lost, each answered by the version it says),
refused when broken with the old version still serving, and unloaded; keys give 401 and 403
over HTTP and gRPC; gRPC answers as HTTP does and its errors carry the right status."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.backends.inference import TextClassifier, read_bundle, sha256_file
from services.backends.model_agreement import state_folder
from services.config import ServiceSettings
from training.data.datasets import read_trec, split_dev
from training.bundles.export_classifier import export_bundle
from training.jobs.classifier import train_classifier
from tests.conftest import REPOSITORY, ZOO
from tests.serving import free_port, running_server

OWN = "own-trec6"
API_KEYS, ADMIN_KEY = ("reader-key-1", "reader-key-2"), "admin-key-1"
QUESTIONS = ["What is the capital of France ?", "Who wrote Hamlet ?", "How many legs does a spider have ?",
             "When did the Berlin Wall fall ?"]
MAX_PENDING_TEXTS = 64  # small, so that one gRPC request can pass it: RESOURCE_EXHAUSTED


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def grpc_auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}  # gRPC metadata keys are lower-case


def export_own(zoo: Path, work: Path, trec_path: Path, seed: int, epochs: int) -> Path:
    """Train a small Kim CNN on the committed TREC sample and export it as zoo/own-trec6 (a
    different seed or epoch count gives different weights)."""
    train, dev = split_dev(read_trec(trec_path)[:600], dev_fraction=0.25, seed=2)
    checkpoint = train_classifier(train, dev, epochs=epochs, seed=seed, show_progress=False)
    staged = work / f"{OWN}-{seed}-{epochs}"
    export_bundle(checkpoint, staged, OWN, [e.text for e in dev])
    shutil.rmtree(zoo / OWN, ignore_errors=True)
    shutil.copytree(staged, zoo / OWN)
    return staged


def server_pid(url: str) -> int:
    """The `bentoml serve` process (BentoML's arbiter, whose pid names the model-state folder)."""
    found = subprocess.run(["pgrep", "-f", f"bentoml serve .*--port {url.rsplit(':', 1)[1]}"], capture_output=True, text=True)
    return int(found.stdout.split()[0])


def expected(bundle_dir: Path, texts: list[str]) -> np.ndarray:
    return TextClassifier(read_bundle(bundle_dir)).probabilities(texts)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_lm_bundle):
    folder = tmp_path_factory.mktemp("zoo")
    for name in ("kim-cnn-trec6", "digits-cnn"):
        shutil.copytree(ZOO / name, folder / name)
    shutil.copytree(tiny_lm_bundle, folder / tiny_lm_bundle.name)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, zoo):
    home = tmp_path_factory.mktemp("control")
    key_file = home / "api-keys"
    key_file.write_text("\n".join(API_KEYS) + "\n")
    grpc_port = str(free_port())
    with running_server(home, zoo, http_workers="2", model_control="explicit", api_keys=f"@{key_file}",
                        admin_keys=ADMIN_KEY, max_pending_texts=str(MAX_PENDING_TEXTS), grpc_port=grpc_port) as url:
        yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}", "home": home}


@pytest.fixture(scope="module")
def http(server):
    return triton_http.InferenceServerClient(server["url"].removeprefix("http://"), connection_timeout=60, network_timeout=120)


@pytest.fixture(scope="module")
def grpc_client(server):
    return triton_grpc.InferenceServerClient(server["grpc"])


def http_infer(url: str, model: str, texts: list[str], key: str = API_KEYS[0]) -> tuple[int, dict]:
    """OIP v2 infer in JSON over a fresh connection (so that requests spread over the workers)."""
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    response = requests.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60,
                             headers={**auth(key), "Connection": "close"})
    return response.status_code, response.json()


def probabilities_of(answer: dict) -> np.ndarray:
    output = next(o for o in answer["outputs"] if o["name"] == "probabilities")
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def index_of(http_client) -> dict[str, dict]:
    return {entry["name"]: entry for entry in http_client.get_model_repository_index(headers=auth(API_KEYS[0]))}


def test_index_lists_every_bundle_with_its_state(http, zoo):
    index = index_of(http)
    assert {name: entry["state"] for name, entry in index.items()} == {
        "kim-cnn-trec6": "READY", "digits-cnn": "READY", "char-lm-tiny": "READY"}
    assert index["kim-cnn-trec6"]["version"] == read_bundle(zoo / "kim-cnn-trec6").version


def test_a_bundle_exported_while_serving_is_loaded_and_served_by_both_workers(server, http, zoo, tmp_path_factory, trec_path):
    staged = export_own(zoo, tmp_path_factory.mktemp("own"), trec_path, seed=1, epochs=2)
    assert index_of(http)[OWN] == {"name": OWN, "state": "UNAVAILABLE", "reason": "not loaded"}
    started = time.monotonic()
    http.load_model(OWN, headers=auth(ADMIN_KEY))
    print(f"load took {time.monotonic() - started:.2f} s")
    assert index_of(http)[OWN]["state"] == "READY"
    want = expected(staged, QUESTIONS)
    # 24 requests on fresh connections: the two workers take them in turn; each must answer it
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: http_infer(server["url"], OWN, QUESTIONS), range(24)))
    assert [status for status, _ in answers] == [200] * 24
    for _, answer in answers:
        assert answer["model_version"] == read_bundle(staged).version
        np.testing.assert_allclose(probabilities_of(answer), want, atol=1e-5)
    # Both workers applied the change before the load was answered: their acks in the server's folder
    folder = state_folder(ServiceSettings(), parent_pid=server_pid(server["url"]))
    desired = json.loads((folder / "desired.json").read_text())
    acks = {path.stem: json.loads(path.read_text()) for path in (folder / "acks").glob("*.json")}
    assert desired["models"][OWN] == f"{OWN}:{read_bundle(staged).sha256[:16]}"
    assert {name for name, ack in acks.items() if ack["generation"] >= desired["generation"]} == {"http-1", "http-2"}
    metadata = http.get_model_metadata(OWN, headers=auth(API_KEYS[1]))
    assert metadata["versions"] == [read_bundle(staged).version]
    listed = requests.get(f"{server['url']}/models", headers=auth(API_KEYS[0]), timeout=30).json()["models"]
    assert OWN in {model["name"] for model in listed}
    document = requests.get(f"{server['url']}/openapi.json", headers=auth(API_KEYS[0]), timeout=30).json()
    body = document["paths"]["/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert OWN in body["properties"]["model"]["enum"]
    anonymous = requests.get(f"{server['url']}/openapi.json", timeout=30).json()  # open, but it names no model
    assert "enum" not in anonymous["paths"]["/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["model"]


def test_a_reload_with_new_weights_loses_no_request_in_flight(server, http, zoo, tmp_path_factory, trec_path):
    old_version = index_of(http)[OWN]["version"]
    old_staged = next(p for p in tmp_path_factory.getbasetemp().glob("own*/own-trec6-1-2"))
    new_staged = export_own(zoo, tmp_path_factory.mktemp("own2"), trec_path, seed=7, epochs=3)
    new_version = read_bundle(new_staged).version
    assert new_version != old_version
    by_version = {old_version: expected(old_staged, QUESTIONS), new_version: expected(new_staged, QUESTIONS)}
    assert not np.allclose(by_version[old_version], by_version[new_version], atol=1e-3)  # the weights differ

    # (when the request was sent, status, answer): a request takes its model's version when it
    # starts, so one sent before the load returned may be answered, correctly, by the old version
    # after it has returned; only those sent after it must name the new one.
    answers: list[tuple[float, int, dict]] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            sent_at = time.monotonic()
            answers.append((sent_at, *http_infer(server["url"], OWN, QUESTIONS)))

    def sent_since(moment: float) -> int:
        return sum(sent_at > moment for sent_at, _, _ in list(answers))

    def wait_for_answers(since: float, count: int) -> None:
        deadline = time.monotonic() + 60
        while sent_since(since) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    askers = [threading.Thread(target=keep_asking) for _ in range(3)]
    asking_from = time.monotonic()
    for asker in askers:
        asker.start()
    wait_for_answers(asking_from, 6)
    http.load_model(OWN, headers=auth(ADMIN_KEY))
    loaded_at = time.monotonic()
    wait_for_answers(loaded_at, 6)
    stop.set()
    for asker in askers:
        asker.join()
    answers.sort(key=lambda answer: answer[0])
    sent_before = [answer for sent_at, _, answer in answers if sent_at < loaded_at]
    sent_after = [answer for sent_at, _, answer in answers if sent_at > loaded_at]
    assert len(sent_before) >= 6 and len(sent_after) >= 6
    assert [status for _, status, _ in answers] == [200] * len(answers), [a for a in answers if a[1] != 200][:3]
    for _, _, answer in answers:  # each answered by the version it names
        np.testing.assert_allclose(probabilities_of(answer), by_version[answer["model_version"]], atol=1e-5)
    assert {answer["model_version"] for answer in sent_before} <= {old_version, new_version}
    assert sent_before[0]["model_version"] == old_version  # the first one sent: served before the switch
    assert {answer["model_version"] for answer in sent_after} == {new_version}
    assert index_of(http)[OWN]["version"] == new_version
    with pytest.raises(InferenceServerException, match="not loaded") as refused:
        http.get_model_metadata(OWN, model_version=old_version, headers=auth(API_KEYS[0]))
    assert refused.value.status() == "404"


def test_a_broken_bundle_is_refused_and_the_old_version_keeps_serving(server, http, zoo):
    serving = index_of(http)[OWN]["version"]
    before = http_infer(server["url"], OWN, QUESTIONS)[1]
    # A file changed behind the manifest's back: its sha256 check refuses it
    onnx_path = zoo / OWN / "model.onnx"
    original = onnx_path.read_bytes()
    onnx_path.write_bytes(original[:-10] + b"0123456789")
    with pytest.raises(InferenceServerException, match="sha256") as tampered:
        http.load_model(OWN, headers=auth(ADMIN_KEY))
    assert tampered.value.status() == "400"
    # A graph onnxruntime cannot read, with a manifest that agrees: every worker's session fails
    onnx_path.write_bytes(b"not an onnx graph")
    manifest = json.loads((zoo / OWN / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(onnx_path)
    (zoo / OWN / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InferenceServerException, match=f"version {serving} keeps serving") as broken:
        http.load_model(OWN, headers=auth(ADMIN_KEY))
    assert broken.value.status() == "400"
    assert "http-1" in broken.value.message() and "http-2" in broken.value.message()
    assert index_of(http)[OWN] == {"name": OWN, "version": serving, "state": "READY"}
    for _ in range(6):
        status, answer = http_infer(server["url"], OWN, QUESTIONS)
        assert status == 200 and answer["model_version"] == serving
        np.testing.assert_allclose(probabilities_of(answer), probabilities_of(before), atol=1e-6)


def test_unload_stops_the_model_everywhere(server, http, grpc_client):
    http.unload_model(OWN, headers=auth(ADMIN_KEY))
    assert index_of(http)[OWN] == {"name": OWN, "state": "UNAVAILABLE", "reason": "unloaded"}
    for _ in range(6):  # both workers
        status, answer = http_infer(server["url"], OWN, QUESTIONS)
        assert status == 404 and "unloaded" in answer["error"] and "/load" in answer["error"]
    with pytest.raises(InferenceServerException) as refused:
        grpc_client.infer(OWN, [text_input(QUESTIONS)], headers=grpc_auth(API_KEYS[0]))
    assert refused.value.status() == "StatusCode.NOT_FOUND"
    loaded = {sample.labels["model"]: sample.value
              for family in text_string_to_metric_families(requests.get(f"{server['url']}/metrics", timeout=30).text)
              for sample in family.samples if sample.name == "textserve_model_loaded"}
    assert loaded[OWN] == 0 and loaded["kim-cnn-trec6"] == 1
    assert requests.get(f"{server['url']}/v2/health/ready", timeout=30).status_code == 200
    with pytest.raises(InferenceServerException, match="no bundle named 'nope'") as unknown:
        http.load_model("nope", headers=auth(ADMIN_KEY))
    assert unknown.value.status() == "404"


# --------------------------------------------------------------------------- keys

def send(method: str, path: str, body=None, headers: dict | None = None):
    def sent(url: str) -> requests.Response:
        return requests.request(method, url + path, json=body, headers=headers or {}, timeout=60)
    return sent


CLASSIFY = {"model": "kim-cnn-trec6", "texts": QUESTIONS}
# (docs/errors.md id, request, status, a fragment of the "error" message)
HTTP_CASES = [
    ("no-key", send("POST", "/classify", CLASSIFY), 401, "this route needs an API key"),
    ("no-key-model-information", send("GET", "/v2/models/kim-cnn-trec6"), 401, "this route needs an API key"),
    ("malformed-authorization", send("GET", "/models", headers={"Authorization": "Basic eDp5"}), 401, "must be 'Bearer KEY'"),
    ("unknown-key", send("POST", "/v2/repository/index", headers=auth("wrong")), 401, "the API key is not valid"),
    ("api-key-on-load", send("POST", "/v2/repository/models/kim-cnn-trec6/load", headers=auth(API_KEYS[0])), 403,
     "may not load or unload models"),
    ("load-unknown-bundle", send("POST", "/v2/repository/models/kim-cnn-imdb/load", headers=auth(ADMIN_KEY)), 404,
     "no bundle named 'kim-cnn-imdb' to load"),
    ("load-with-config", send("POST", "/v2/repository/models/kim-cnn-trec6/load", {"parameters": {"config": "{}"}},
                              auth(ADMIN_KEY)), 400, "parameters ['config'] are not supported"),
    ("index-ready-not-boolean", send("POST", "/v2/repository/index", {"ready": "yes"}, auth(API_KEYS[0])), 400,
     "ready must be true or false"),
    ("version-not-loaded", send("GET", "/v2/models/kim-cnn-trec6/versions/0", headers=auth(API_KEYS[0])), 404,
     "version '0' is not loaded"),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[case[0] for case in HTTP_CASES])
def test_keys_and_repository_errors_say_what_was_wrong(server, case):
    _, request, status, message = case
    response = request(server["url"])
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


# Rows of docs/errors.md checked by the scenario tests above (and test_service_e2e.py's model control off).
SCENARIO_ROWS = {"tampered-bundle": "400", "unreadable-graph": "400", "unloaded-model": "404", "model-control-off": "403",
                 "grpc-overload": "RESOURCE_EXHAUSTED"}


def test_docs_errors_md_has_a_row_per_case_of_this_file():
    section = (REPOSITORY / "docs" / "errors.md").read_text().partition("## Model management, keys and gRPC")[2]
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)` \|.*\| ([0-9]{3}|[A-Z_]+) \|", section, re.M))
    assert rows == {**{case[0]: str(case[2]) for case in HTTP_CASES}, **{case[0]: case[2] for case in GRPC_CASES}, **SCENARIO_ROWS}


def test_keys_open_their_routes_and_probes_stay_open(server):
    url = server["url"]
    for key in (*API_KEYS, ADMIN_KEY):
        answer = requests.post(f"{url}/classify", json={"model": "kim-cnn-trec6", "texts": QUESTIONS}, headers=auth(key), timeout=30)
        assert answer.status_code == 200 and answer.json()["results"][0]["label"] == "LOC"
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/livez"):
        assert requests.get(url + path, timeout=30).status_code == 200, path


def test_an_api_key_may_not_load_or_unload(server, http):
    for call in (http.load_model, http.unload_model):
        with pytest.raises(InferenceServerException, match="TEXTSERVE_ADMIN_KEYS") as refused:
            call("kim-cnn-trec6", headers=auth(API_KEYS[0]))
        assert refused.value.status() == "403"
    assert index_of(http)["kim-cnn-trec6"]["state"] == "READY"


# --------------------------------------------------------------------------- gRPC

def text_input(texts: list[str]) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def test_grpc_answers_what_http_answers(server, grpc_client):
    key = grpc_auth(API_KEYS[0])
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()  # probes need no key
    assert grpc_client.is_model_ready("kim-cnn-trec6", headers=key)
    metadata = grpc_client.get_model_metadata("kim-cnn-trec6", headers=key, as_json=True)
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1", "1"]}]
    result = grpc_client.infer("kim-cnn-trec6", [text_input(QUESTIONS)], headers=key)
    status, over_http = http_infer(server["url"], "kim-cnn-trec6", QUESTIONS)
    assert status == 200
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities_of(over_http), atol=1e-6)
    http_labels = next(o for o in over_http["outputs"] if o["name"] == "label")["data"]
    assert [label.decode() for label in result.as_numpy("label").tolist()] == http_labels
    assert http_labels[:2] == ["LOC", "HUM"]
    assert result.get_response().model_version == over_http["model_version"]


def test_grpc_typed_contents_give_the_raw_contents_answer(server, grpc_client):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server["grpc"]))
    request = service_pb2.ModelInferRequest(model_name="kim-cnn-trec6", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[len(QUESTIONS)],
        contents=service_pb2.InferTensorContents(bytes_contents=[t.encode() for t in QUESTIONS]))])
    answer = stub.ModelInfer(request, metadata=[("authorization", f"Bearer {API_KEYS[1]}")], timeout=60)
    names = [output.name for output in answer.outputs]
    probabilities = np.frombuffer(answer.raw_output_contents[names.index("probabilities")], dtype="<f4").reshape(len(QUESTIONS), 6)
    raw = grpc_client.infer("kim-cnn-trec6", [text_input(QUESTIONS)], headers=grpc_auth(API_KEYS[0])).as_numpy("probabilities")
    np.testing.assert_allclose(probabilities, raw, atol=1e-6)


def test_grpc_scores_with_the_language_model_and_classifies_images(server, grpc_client):
    key = grpc_auth(API_KEYS[0])
    scored = grpc_client.infer("char-lm-tiny", [text_input(["the market fell", "a good film"])], headers=key)
    over_http = requests.post(f"{server['url']}/lm/score", json={"model": "char-lm-tiny", "texts": ["the market fell", "a good film"]},
                              headers=key, timeout=60).json()
    np.testing.assert_allclose(scored.as_numpy("log_prob"), [r["log_prob"] for r in over_http["results"]], rtol=1e-5)
    assert scored.as_numpy("token_count").tolist() == [len(r["tokens"]) for r in over_http["results"]]
    side = grpc_client.get_model_metadata("digits-cnn", headers=key, as_json=True)["inputs"][0]["shape"][-1]
    images = np.zeros((2, 1, int(side), int(side)), dtype=np.float32)
    images[1, 0, 1:-1, int(side) // 2] = 1.0  # a vertical stroke: a one
    tensor = triton_grpc.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    classified = grpc_client.infer("digits-cnn", [tensor], headers=key)
    http_result = triton_http.InferenceServerClient(server["url"].removeprefix("http://"))
    http_tensor = triton_http.InferInput("images", list(images.shape), "FP32")
    http_tensor.set_data_from_numpy(images)
    np.testing.assert_allclose(classified.as_numpy("probabilities"),
                               http_result.infer("digits-cnn", [http_tensor], headers=key).as_numpy("probabilities"), atol=1e-6)


def grpc_status(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status(), raised.value.message()


def wrong_datatype() -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("text", [2], "INT32")
    tensor.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
    return tensor


# (docs/errors.md id, call on a client, gRPC status, a fragment of the message)
GRPC_CASES = [
    ("grpc-no-key", lambda c: c.infer("kim-cnn-trec6", [text_input(QUESTIONS)]), "UNAUTHENTICATED", "needs an API key"),
    ("grpc-unknown-key", lambda c: c.infer("kim-cnn-trec6", [text_input(QUESTIONS)], headers=grpc_auth("wrong")),
     "UNAUTHENTICATED", "not valid"),
    ("grpc-api-key-on-load", lambda c: c.load_model("kim-cnn-trec6", headers=grpc_auth(API_KEYS[0])),
     "PERMISSION_DENIED", "TEXTSERVE_ADMIN_KEYS"),
    ("grpc-wrong-datatype", lambda c: c.infer("kim-cnn-trec6", [wrong_datatype()], headers=grpc_auth(API_KEYS[0])),
     "INVALID_ARGUMENT", "must have datatype BYTES"),
    ("grpc-empty-text", lambda c: c.infer("kim-cnn-trec6", [text_input([" "])], headers=grpc_auth(API_KEYS[0])),
     "INVALID_ARGUMENT", "texts[0] is empty"),
    ("grpc-unknown-model", lambda c: c.infer("nope", [text_input(QUESTIONS)], headers=grpc_auth(API_KEYS[0])),
     "NOT_FOUND", "unknown model 'nope'"),
    ("grpc-version-not-loaded", lambda c: c.infer("kim-cnn-trec6", [text_input(QUESTIONS)], model_version="0",
                                                  headers=grpc_auth(API_KEYS[0])), "NOT_FOUND", "version '0' is not loaded"),
    ("grpc-more-than-a-worker-holds", lambda c: c.infer("kim-cnn-trec6", [text_input(["why ?"] * (MAX_PENDING_TEXTS + 1))],
                                                        headers=grpc_auth(API_KEYS[0])), "INVALID_ARGUMENT", "send fewer"),
    ("grpc-unimplemented", lambda c: c.get_system_shared_memory_status(headers=grpc_auth(API_KEYS[0])),
     "UNIMPLEMENTED", "SystemSharedMemoryStatus is not served by textserve; its calls: ModelConfig, ModelInfer, ModelMetadata"),
]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[case[0] for case in GRPC_CASES])
def test_grpc_errors_carry_the_right_status_and_message(grpc_client, case):
    _, call, status, message = case
    got_status, got_message = grpc_status(lambda: call(grpc_client))
    assert got_status == f"StatusCode.{status}"
    assert message in got_message


ONE_TEXT = '"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["Who?"]}]'
# Inputs that Python's or numpy's own limits used to turn into a 500: each is the client's
# error, answered 400 with what was wrong. (what, body, extra headers, a fragment of the message)
IMPOSSIBLE_OIP_BODIES = [
    ("lone surrogate in a text", b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}', {},
     "BYTES element 0 is not valid Unicode"),
    ("lone surrogate in the id", ('{"id":"\\ud800",' + ONE_TEXT + "}").encode(), {}, "request.id is not valid Unicode"),
    ("integer of 5000 digits", ('{"x":' + "9" * 5000 + "," + ONE_TEXT + "}").encode(), {}, "not valid JSON"),
    ("zero beside a huge dimension", json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0, 2**70],
                                                             "data": []}]}).encode(), {}, "is not a shape a tensor can have"),
    ("65 dimensions", json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1] * 65, "data": ["Who?"]}]}).encode(),
     {}, "is not a shape a tensor can have"),
    ("header length of 5000 digits", ("{" + ONE_TEXT + "}").encode(), {"Inference-Header-Content-Length": "9" * 5000},
     "has 5000 digits"),
    ("200,000 empty gzip members", gzip.compress(b"") * 200_000, {"Content-Encoding": "gzip"}, "more than 64 concatenated gzip members"),
]


@pytest.mark.parametrize("case", IMPOSSIBLE_OIP_BODIES, ids=[case[0] for case in IMPOSSIBLE_OIP_BODIES])
def test_impossible_oip_inputs_get_a_400_that_says_why(server, case):
    _, body, headers, fragment = case
    started = time.monotonic()
    answer = requests.post(f"{server['url']}/v2/models/kim-cnn-trec6/infer", data=body, timeout=30,
                           headers={**auth(API_KEYS[0]), "Content-Type": "application/json", **headers})
    assert answer.status_code == 400 and fragment in answer.json()["error"], answer.text
    assert time.monotonic() - started < 5  # the gzip members are refused at the 64th, not inflated for seconds


@pytest.mark.parametrize("shape", [[0, 2**62], [1] * 65], ids=["zero-beside-huge", "65-dimensions"])
@pytest.mark.parametrize("raw", [True, False], ids=["raw-contents", "typed-contents"])
def test_grpc_impossible_shapes_are_invalid_argument(server, shape, raw):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server["grpc"]))
    elements = [b"Who?"] * (0 if 0 in shape else 1)
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=shape)
    if raw:
        request = service_pb2.ModelInferRequest(model_name="kim-cnn-trec6", inputs=[tensor],
                                                raw_input_contents=[b"".join(len(e).to_bytes(4, "little") + e for e in elements)])
    else:
        tensor.contents.bytes_contents.extend(elements)
        request = service_pb2.ModelInferRequest(model_name="kim-cnn-trec6", inputs=[tensor])
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, metadata=[("authorization", f"Bearer {API_KEYS[0]}")], timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a shape a tensor can have" in refused.value.details()


def grpc_request(outputs=(), shared_memory=False, both_contents=False) -> service_pb2.ModelInferRequest:
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"Who wrote Hamlet ?")
    if shared_memory:
        tensor.parameters["shared_memory_region"].string_param = "region0"
    request = service_pb2.ModelInferRequest(model_name="kim-cnn-trec6", inputs=[tensor], outputs=list(outputs))
    if both_contents:
        request.raw_input_contents.append((18).to_bytes(4, "little") + b"Who wrote Hamlet ?")
    return request


def requested(name: str, **parameters: int) -> service_pb2.ModelInferRequest.InferRequestedOutputTensor:
    output = service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=name)
    for key, value in parameters.items():
        output.parameters[key].int64_param = value
    return output


# What the HTTP codec refuses, gRPC refuses too, with the same words (oip.py).
GRPC_REFUSALS = [
    ("output-twice", grpc_request(outputs=[requested("label"), requested("label")]), "output 'label' is requested more than once"),
    ("class-count", grpc_request(outputs=[requested("probabilities", classification=3)]), "(class_count) is not supported"),
    ("shared-memory-output", grpc_request(outputs=[requested("label", shared_memory_byte_size=64)]),
     "shared-memory outputs are not supported"),
    ("shared-memory-input", grpc_request(shared_memory=True), "shared-memory inputs are not supported"),
    ("raw-and-typed-contents", grpc_request(both_contents=True), "has both contents and raw_input_contents"),
]


@pytest.mark.parametrize("case", GRPC_REFUSALS, ids=[case[0] for case in GRPC_REFUSALS])
def test_grpc_refuses_what_http_refuses_with_the_same_words(server, case):
    _, request, fragment = case
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server["grpc"]))
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, metadata=[("authorization", f"Bearer {API_KEYS[0]}")], timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in refused.value.details()


def test_grpc_overload_is_resource_exhausted_and_the_rest_are_answered(server):
    """Requests of 40 texts sent at once on one connection (one worker, whose limit is 64): the
    worker admits one at a time and refuses the others that arrive meanwhile at once."""
    client = triton_grpc.InferenceServerClient(server["grpc"])
    outcomes: list = []
    done = threading.Semaphore(0)

    def finished(result, error) -> None:
        outcomes.append(error if error is not None else result)
        done.release()

    for _ in range(16):
        client.async_infer("kim-cnn-trec6", [text_input(["Who wrote Hamlet ?"] * 40)], finished, headers=grpc_auth(API_KEYS[0]))
    for _ in range(16):
        assert done.acquire(timeout=60)
    refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
    answered = [o for o in outcomes if not isinstance(o, InferenceServerException)]
    assert refused and answered
    for error in refused:
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED" and "TEXTSERVE_MAX_PENDING_TEXTS" in error.message()
    for result in answered:
        assert result.as_numpy("label").tolist() == [b"HUM"] * 40


def test_grpc_loads_and_unloads_with_an_admin_key(server, grpc_client, http):
    admin = grpc_auth(ADMIN_KEY)
    grpc_client.unload_model("digits-cnn", headers=admin)
    assert {m["name"]: m["state"] for m in grpc_client.get_model_repository_index(headers=admin, as_json=True)["models"]}["digits-cnn"] == "UNAVAILABLE"
    grpc_client.load_model("digits-cnn", headers=admin)
    assert grpc_client.is_model_ready("digits-cnn", headers=admin)
    assert index_of(http)["digits-cnn"]["state"] == "READY"


# --------------------------------------------------------------------------- with the shared runner

@pytest.fixture(scope="module")
def runner_zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runner_zoo")
    shutil.copytree(ZOO / "kim-cnn-trec6", folder / "kim-cnn-trec6")
    return folder


def test_the_shared_runner_follows_loads_reloads_and_unloads(tmp_path_factory, runner_zoo, trec_path):
    """TEXTSERVE_INFERENCE=runner: the runner process owns the sessions; the HTTP workers switch
    to a new version only once it has it, and it frees the old one once they have switched."""
    work = tmp_path_factory.mktemp("runner_own")
    with running_server(tmp_path_factory.mktemp("runner_control"), runner_zoo, inference="runner", http_workers="2",
                        model_control="explicit") as url:
        client = triton_http.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
        first = export_own(runner_zoo, work, trec_path, seed=1, epochs=2)
        client.load_model(OWN)
        answers = [http_infer(url, OWN, QUESTIONS) for _ in range(8)]
        assert [status for status, _ in answers] == [200] * 8
        for _, answer in answers:
            np.testing.assert_allclose(probabilities_of(answer), expected(first, QUESTIONS), atol=1e-5)

        second = export_own(runner_zoo, work, trec_path, seed=7, epochs=3)
        versions = {read_bundle(first).version: expected(first, QUESTIONS), read_bundle(second).version: expected(second, QUESTIONS)}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            during = [pool.submit(lambda: [http_infer(url, OWN, QUESTIONS) for _ in range(15)]) for _ in range(3)]
            time.sleep(0.3)
            client.load_model(OWN)
            answered = [answer for future in during for answer in future.result()]
        assert [status for status, _ in answered] == [200] * len(answered)
        for _, answer in answered:
            np.testing.assert_allclose(probabilities_of(answer), versions[answer["model_version"]], atol=1e-5)
        for _ in range(6):
            status, answer = http_infer(url, OWN, QUESTIONS)
            assert status == 200 and answer["model_version"] == read_bundle(second).version

        (runner_zoo / OWN / "model.onnx").write_bytes(b"not an onnx graph")
        manifest = json.loads((runner_zoo / OWN / "manifest.json").read_text())
        manifest["files"]["model.onnx"] = sha256_file(runner_zoo / OWN / "model.onnx")
        (runner_zoo / OWN / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(InferenceServerException, match="runner-1") as broken:
            client.load_model(OWN)
        assert broken.value.status() == "400"
        assert http_infer(url, OWN, QUESTIONS)[1]["model_version"] == read_bundle(second).version

        client.unload_model(OWN)
        assert all(http_infer(url, OWN, QUESTIONS)[0] == 404 for _ in range(4))
        assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200


def test_the_pages_stay_open_and_bentomls_client_calls_with_its_token(server):
    import bentoml
    from bentoml.exceptions import BentoMLException

    url = server["url"]
    for page in ("/", "/playground", "/schema.json"):
        assert requests.get(f"{url}{page}", timeout=10).status_code == 200, page  # no data in them; their calls need the key
    with bentoml.SyncHTTPClient(url, token=API_KEYS[1]) as client:
        assert client.classify(model="kim-cnn-trec6", texts=["Who wrote Hamlet ?"])["results"][0]["label"] == "HUM"
    with bentoml.SyncHTTPClient(url) as client, pytest.raises(BentoMLException, match="Authorization: Bearer"):
        client.classify(model="kim-cnn-trec6", texts=["Who wrote Hamlet ?"])
