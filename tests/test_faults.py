"""Faults while serving: onnxruntime failing on some texts (a 500 that names the model and the
reason, for that request only, never a hang), and a crashed HTTP worker (replaced; the service
keeps answering meanwhile). Bad bundles at load are in tests/test_model_store.py."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import time
import csv
import re
import sys
from pathlib import Path

import onnx
import pytest
from prometheus_client.parser import text_string_to_metric_families
import requests
from onnx import TensorProto, helper, numpy_helper

import numpy as np

from models.text_encoding import WordVocab, encoder_from_config
from services.backends.inference import sha256_file
from services.backends.runner import WARM_UP_TEXTS
from tests.conftest import REPOSITORY, ZOO
from tests.serving import running_server

FRAGILE = "kim-cnn-fragile"
MAX_PENDING_TEXTS = 40  # above the 32 texts a Locust request may carry: any refusal is overload (429), not 413
GOOD_TEXT = "What is the capital of France ?"
BAD_TEXT = " ".join([GOOD_TEXT] * 12)  # 84 words: longer than the fragile graph's position table
POSITIONS = 40  # word positions (edge padding included) the fragile graph has rows for


def fragile_bundle(folder: Path) -> Path:
    """kim-cnn-trec6's bundle with a graph that works for texts up to POSITIONS word positions
    (edge padding included) and fails inside onnxruntime for longer ones, as a graph with a
    learnt position table does: the table's first T rows are added to the T word rows, and past
    POSITIONS the shapes no longer broadcast. logits (B, 6) = max over positions."""
    source = ZOO / "kim-cnn-trec6"
    bundle = folder / FRAGILE
    shutil.copytree(source, bundle)
    config = json.loads((source / "config.json").read_text())
    encoder = encoder_from_config(config["encoding"], WordVocab.load(source / "vocab.json"))
    assert encoder.encode_batch([*WARM_UP_TEXTS, GOOD_TEXT])[0].shape[1] < POSITIONS < encoder.encode_batch([BAD_TEXT])[0].shape[1]
    rng = np.random.default_rng(0)
    words = numpy_helper.from_array(rng.normal(size=(len(encoder.vocab), 6)).astype(np.float32), "words")
    positions = numpy_helper.from_array(rng.normal(size=(POSITIONS, 6)).astype(np.float32), "positions")
    constants = [numpy_helper.from_array(np.array(value, dtype=np.int64), name) for name, value in (("zero", [0]), ("time_axis", [1]))]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["words", "token_ids"], ["word_rows"], axis=0),             # (B, T, 6)
         helper.make_node("Shape", ["token_ids"], ["shape"]),
         helper.make_node("Gather", ["shape", "time_axis"], ["time"], axis=0),                  # [T]
         helper.make_node("Slice", ["positions", "zero", "time", "zero"], ["position_rows"]),   # (min(T, POSITIONS), 6)
         helper.make_node("Add", ["word_rows", "position_rows"], ["scores"]),                   # fails when T > POSITIONS
         helper.make_node("ReduceMax", ["scores"], ["logits"], axes=[1], keepdims=0)],          # (B, 6)
        "fragile",
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["batch", "time"]),
         helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6])],
        initializer=[words, positions, *constants],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), bundle / "model.onnx")
    config["name"] = FRAGILE
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = {name: sha256_file(bundle / name) for name in manifest["files"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return bundle


def classify(url: str, model: str, text: str) -> requests.Response:
    return requests.post(f"{url}/classify", json={"model": model, "texts": [text]}, timeout=30)


@pytest.fixture(scope="module")
def fragile_server(tmp_path_factory):
    """kim-cnn-trec6 and its fragile copy, two workers, a small pending-text limit (overload is
    easy to reach)."""
    zoo = tmp_path_factory.mktemp("zoo")
    fragile_bundle(zoo)
    shutil.copytree(ZOO / "kim-cnn-trec6", zoo / "kim-cnn-trec6")
    with running_server(tmp_path_factory.mktemp("home"), zoo, http_workers="2", max_pending_texts=str(MAX_PENDING_TEXTS)) as url:
        yield url


def test_an_onnxruntime_failure_is_a_500_for_that_request_only(fragile_server):
    url = fragile_server
    assert classify(url, FRAGILE, GOOD_TEXT).status_code == 200
    started = time.monotonic()
    failed = classify(url, FRAGILE, BAD_TEXT)
    assert time.monotonic() - started < 5  # answered, not hung
    assert failed.status_code == 500
    message = failed.json()["error"]
    assert f"inference failed for model '{FRAGILE}'" in message and "broadcast" in message, message
    # Concurrent requests share batches: the bad ones must not take the good ones down.
    texts = [BAD_TEXT if i % 4 == 0 else GOOD_TEXT for i in range(48)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda text: classify(url, FRAGILE, text).status_code, texts))
    assert statuses == [500 if text == BAD_TEXT else 200 for text in texts]
    assert classify(url, "kim-cnn-trec6", BAD_TEXT).status_code == 200  # the real graph has every id
    assert requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200


def requests_counted(url: str) -> float:
    """Every request the server counted but its /metrics scrapes (this one among them)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "textserve_requests_total" and sample.labels["endpoint"] != "/metrics")


def test_under_overload_and_faults_every_request_sent_is_answered_and_counted(fragile_server, tmp_path):
    """Locust's classifier users against the fragile model (their long texts make it fail), with
    more clients than the pending limit admits: each request is answered 200, refused (429/503
    with Retry-After) or failed explicitly (500 naming the model); none goes unanswered, and the
    server counted exactly as many requests as Locust sent."""
    url = fragile_server
    time.sleep(1)  # earlier tests' last requests are counted
    before = requests_counted(url)
    locust = str(Path(sys.executable).parent / "locust")
    result = subprocess.run(
        [locust, "-f", "loadtests/locustfile.py", "--host", url, "--headless", "-u", "48", "-r", "48", "-t", "8s",
         "--stop-timeout", "30",  # at the end, users finish the request they have in flight (and record it)
         "--only-summary", "--csv", str(tmp_path / "run"), "--slo-failure-ratio", "1", "--slo-refusal-ratio", "1",
         "--slo-p99-ms", "100000", "ClassifierUser"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=180,
        env={**os.environ, "TEXTSERVE_LOAD_MODEL": FRAGILE})
    output = result.stdout[-3000:] + result.stderr[-3000:]
    gate = re.search(r"SLO gate: sent (\d+), succeeded (\d+), refused (\d+), failed (\d+), lost (\d+)", output)
    assert gate, output
    sent, succeeded, refused, failed, lost = map(int, gate.groups())
    assert lost == 0 and sent == succeeded + refused + failed, output
    assert succeeded > 0 and refused > 0 and failed > 0, f"overload and faults both happened: {gate.group(0)}"
    failures = list(csv.DictReader((tmp_path / "run_failures.csv").open()))
    for row in failures:  # every failure is an explicit answer with its reason (Locust wraps it: CatchResponseError('...'))
        error = row["Error"]
        assert "refused 429" in error or "refused 503" in error or "500: " in error, row
        if "500: " in error:
            assert "inference failed for model" in error and FRAGILE in error, row
    time.sleep(1)  # the last responses' metrics
    assert requests_counted(url) - before == sent


def worker_pids(server_pid: int) -> list[int]:
    listed = subprocess.run(["pgrep", "-P", str(server_pid), "-f", "_bentoml_impl.worker.service"], capture_output=True, text=True)
    return sorted(int(pid) for pid in listed.stdout.split())


def test_a_killed_worker_is_replaced_and_the_service_answers_meanwhile(tmp_path):
    with running_server(tmp_path / "home", ZOO, http_workers="2", models="kim-cnn-trec6") as url:
        server_pid = int(subprocess.run(["pgrep", "-f", f"bentoml serve .*--port {url.rsplit(':', 1)[1]}"],
                                        capture_output=True, text=True).stdout.split()[0])
        before = worker_pids(server_pid)
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        statuses, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            # A new connection per request: the surviving worker takes them while the other restarts.
            response = requests.post(f"{url}/classify", json={"model": "kim-cnn-trec6", "texts": [GOOD_TEXT]},
                                     headers={"connection": "close"}, timeout=30)
            statuses.append(response.status_code)
            now = worker_pids(server_pid)
            if len(now) == 2 and before[0] not in now and requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                break
            time.sleep(0.2)
        after = worker_pids(server_pid)
        assert len(after) == 2 and before[0] not in after and before[1] in after, (before, after)
        assert statuses and set(statuses) == {200}, statuses
        for _ in range(20):  # both workers answer: the replacement too
            assert requests.post(f"{url}/classify", json={"model": "kim-cnn-trec6", "texts": [GOOD_TEXT]},
                                 headers={"connection": "close"}, timeout=30).status_code == 200
