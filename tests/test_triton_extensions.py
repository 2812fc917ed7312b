"""Triton's model configuration and statistics extensions (services/api/model_config.py,
model_statistics.py), read by the real clients (tritonclient.http and tritonclient.grpc) from
`bentoml serve` in shared-runner mode with two HTTP workers: a request is counted in the HTTP
worker that answered it and its batch in the runner process, so every figure checked here is a
sum over processes. The counts are differences around requests this test sends, checked by hand."""

from __future__ import annotations

import concurrent.futures
import shutil
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.conftest import ZOO
from tests.serving import free_port, running_server

CLASSIFIER, IMAGES = "kim-cnn-trec6", "digits-cnn"
QUESTIONS = ["What is the capital of France ?", "Who wrote Hamlet ?", "How many legs does a spider have ?",
             "When did the Berlin Wall fall ?", "Why is the sky blue ?"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_lm_bundle):
    zoo = tmp_path_factory.mktemp("zoo")
    for name in (CLASSIFIER, IMAGES):
        shutil.copytree(ZOO / name, zoo / name)
    shutil.copytree(tiny_lm_bundle, zoo / tiny_lm_bundle.name)
    grpc_port = str(free_port())
    with running_server(tmp_path_factory.mktemp("extensions"), zoo, http_workers="2", inference="runner",
                        grpc_port=grpc_port) as url:
        yield {"url": url, "grpc": f"127.0.0.1:{grpc_port}", "lm": tiny_lm_bundle.name}


@pytest.fixture(scope="module")
def http(server):
    return triton_http.InferenceServerClient(server["url"].removeprefix("http://"), network_timeout=120)


@pytest.fixture(scope="module")
def grpc_client(server):
    return triton_grpc.InferenceServerClient(server["grpc"])


def test_the_server_names_both_extensions(http, grpc_client):
    assert {"model_configuration", "statistics"} <= set(http.get_server_metadata()["extensions"])
    assert {"model_configuration", "statistics"} <= set(grpc_client.get_server_metadata(as_json=True)["extensions"])


def tensors(config: dict, kind: str) -> dict:
    """name -> (data type, dims, reshape) of the config's inputs or outputs, dims as ints (gRPC's
    JSON writes int64 as strings)."""
    return {t["name"]: (t["data_type"], [int(d) for d in t["dims"]], [int(d) for d in t.get("reshape", {}).get("shape", [])])
            for t in config[kind]}


def test_each_model_configuration_says_what_it_takes_over_http_and_grpc(server, http, grpc_client):
    expected = {
        CLASSIFIER: (256, {"text": ("TYPE_STRING", [1], [])},
                     {"probabilities": ("TYPE_FP32", [6], []), "label": ("TYPE_STRING", [1], [])}),
        IMAGES: (64, {"images": ("TYPE_FP32", [1, 16, 16], [])},
                 {"probabilities": ("TYPE_FP32", [10], []), "label": ("TYPE_STRING", [1], [])}),
        server["lm"]: (256, {"text": ("TYPE_STRING", [1], [])},
                       {"log_prob": ("TYPE_FP32", [1], []), "token_count": ("TYPE_INT64", [1], []),
                        "perplexity": ("TYPE_FP32", [1], []), "token_log_probs": ("TYPE_FP32", [-1], [])}),
    }
    for model, (max_batch_size, inputs, outputs) in expected.items():
        over_http = http.get_model_config(model)
        over_grpc = grpc_client.get_model_config(model, as_json=True)["config"]
        for config in (over_http, over_grpc):
            assert config["name"] == model and config["platform"] == "onnxruntime_onnx"
            assert int(config["max_batch_size"]) == max_batch_size
            assert tensors(config, "input") == inputs and tensors(config, "output") == outputs
            assert config["instance_group"][0]["kind"] == "KIND_CPU" and int(config["instance_group"][0]["count"]) >= 1
            policy = config["dynamic_batching"]["default_queue_policy"]
            # REJECT is the enum's zero, which protobuf's JSON (gRPC's as_json) leaves out
            assert policy.get("timeout_action", "REJECT") == "REJECT" and int(policy["default_timeout_microseconds"]) == 1_000_000
            assert config["parameters"]["inference_mode"]["string_value"] == "runner"
        assert not any("reshape" in tensor for tensor in over_http["input"])  # texts go as [N, 1]
        for tensor in over_http["output"]:  # a value per row, answered as [N]: dims [1] reshaped to []
            assert ("reshape" in tensor) == (tensor["dims"] == [1])
            if "reshape" in tensor:
                assert tensor["reshape"] == {"shape": []}


def test_a_request_shaped_as_the_configuration_says_is_answered(http):
    # perf_analyzer shapes its tensors from the config: with max_batch_size > 0, [batch] + dims.
    config = http.get_model_config(CLASSIFIER)
    dims = config["input"][0]["dims"]
    text = triton_http.InferInput("text", [2, *dims], "BYTES")
    text.set_data_from_numpy(np.array([[q.encode()] for q in QUESTIONS[:2]], dtype=object))
    answer = http.infer(CLASSIFIER, [text])
    assert answer.as_numpy("probabilities").shape == (2, 6)
    np.testing.assert_allclose(answer.as_numpy("probabilities").sum(axis=1), 1.0, atol=1e-5)


def test_an_unknown_model_has_no_configuration_and_no_statistics(server, http, grpc_client):
    for call in (lambda: http.get_model_config("no-such-model"), lambda: http.get_inference_statistics("no-such-model"),
                 lambda: grpc_client.get_model_config("no-such-model"), lambda: grpc_client.get_inference_statistics("no-such-model")):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert "no-such-model" in str(refused.value)
    for path in ("/v2/models/no-such-model/config", "/v2/models/no-such-model/stats", f"/v2/models/{CLASSIFIER}/versions/0/config"):
        answer = requests.get(f"{server['url']}{path}", timeout=30)
        assert answer.status_code == 404 and "error" in answer.json()


def statistics_of(http, model: str) -> dict:
    [figures] = http.get_inference_statistics(model)["model_stats"]
    return figures


def counted(before: dict, after: dict, stat: str) -> tuple[int, int]:
    """The difference of one inference_stats entry: (count, ns)."""
    return (int(after["inference_stats"][stat]["count"]) - int(before["inference_stats"][stat]["count"]),
            int(after["inference_stats"][stat]["ns"]) - int(before["inference_stats"][stat]["ns"]))


def texts_run(figures: dict) -> int:
    return sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in figures.get("batch_stats", []))


def test_statistics_count_every_request_and_batch_summed_over_the_processes(server, http, grpc_client):
    url = server["url"]
    before = statistics_of(http, CLASSIFIER)
    started_ms = time.time() * 1000

    def one_text(index: int) -> int:  # a fresh connection each, so that both HTTP workers answer some
        response = requests.post(f"{url}/classify", json={"model": CLASSIFIER, "texts": [QUESTIONS[index % len(QUESTIONS)]]},
                                 headers={"Connection": "close"}, timeout=60)
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one_text, range(24)))
    assert statuses == [200] * 24
    text = triton_grpc.InferInput("text", [3], "BYTES")  # one gRPC call of three texts
    text.set_data_from_numpy(np.array([q.encode() for q in QUESTIONS[:3]], dtype=object))
    grpc_client.infer(CLASSIFIER, [text])
    bad = requests.post(f"{url}/v2/models/{CLASSIFIER}/infer", timeout=30,  # a failure: a number where texts go
                        json={"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
    assert bad.status_code == 400
    after = statistics_of(http, CLASSIFIER)

    success, success_ns = counted(before, after, "success")
    fail, _ = counted(before, after, "fail")
    assert (success, fail) == (25, 1)  # 24 HTTP requests and 1 gRPC call answered; 1 refused
    assert success_ns > 0
    texts = 24 + 3
    assert int(after["inference_count"]) - int(before["inference_count"]) == texts
    queued, _ = counted(before, after, "queue")
    assert queued == texts  # each text's wait for its batch
    runs, compute_ns = counted(before, after, "compute_infer")
    assert 1 <= runs <= 25 and compute_ns > 0
    assert counted(before, after, "compute_input") == counted(before, after, "compute_output") == (runs, 0)
    assert int(after["execution_count"]) - int(before["execution_count"]) == runs
    assert texts_run(after) - texts_run(before) == texts  # the batch sizes executed account for every text
    assert int(after["last_inference"]) >= started_ms
    # gRPC reads the same figures (nothing ran in between).
    over_grpc = grpc_client.get_inference_statistics(CLASSIFIER, as_json=True)["model_stats"][0]
    assert int(over_grpc["inference_count"]) == int(after["inference_count"])
    assert int(over_grpc["inference_stats"]["success"]["count"]) == int(after["inference_stats"]["success"]["count"])


def test_every_model_has_statistics_and_one_that_never_ran_reads_zero(server, http, grpc_client):
    everything = {figures["name"]: figures for figures in http.get_inference_statistics()["model_stats"]}
    assert set(everything) == {CLASSIFIER, IMAGES, server["lm"]}
    assert {f["name"] for f in grpc_client.get_inference_statistics(as_json=True)["model_stats"]} == set(everything)
    idle = everything[IMAGES]  # warm-up runs no request; nothing sent it an image in this module before this test
    assert int(idle["inference_stats"]["success"]["count"]) == 0 and int(idle["inference_stats"]["fail"]["count"]) == 0
