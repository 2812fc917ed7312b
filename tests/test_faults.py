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
from pathlib import Path

import onnx
import requests
from onnx import TensorProto, helper, numpy_helper

import numpy as np

from models.text_encoding import WordVocab, encoder_from_config
from services.inference import sha256_file
from services.runner import WARM_UP_TEXTS
from tests.conftest import ZOO
from tests.serving import running_server

FRAGILE = "kim-cnn-fragile"
GOOD_TEXT = "What is the capital of France ?"
RAREST_WORD = WordVocab.load(ZOO / "kim-cnn-trec6" / "vocab.json").tokens[-1]
BAD_TEXT = f"What is {RAREST_WORD} ?"  # the vocabulary's last word: an id past the fragile graph's table


def fragile_bundle(folder: Path) -> Path:
    """kim-cnn-trec6's bundle with a graph that works for common words and fails inside
    onnxruntime (Gather: index out of bounds) for a text with a rare word. The graph maps each
    word id to a row of a table only as long as the ids the warm-up and GOOD_TEXT use, then
    takes the maximum over the text: logits (B, 6)."""
    source = ZOO / "kim-cnn-trec6"
    bundle = folder / FRAGILE
    shutil.copytree(source, bundle)
    config = json.loads((source / "config.json").read_text())
    vocab = WordVocab.load(source / "vocab.json")
    encoder = encoder_from_config(config["encoding"], vocab)
    ids, _ = encoder.encode_batch([*WARM_UP_TEXTS, GOOD_TEXT])
    rows = int(ids.max()) + 1
    assert encoder.encode_batch([BAD_TEXT])[0].max() >= rows, "BAD_TEXT must use a rarer word than the others"
    table = numpy_helper.from_array(np.random.default_rng(0).normal(size=(rows, 6)).astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "token_ids"], ["rows"], axis=0),
         helper.make_node("ReduceMax", ["rows"], ["logits"], axes=[1], keepdims=0)],
        "fragile",
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["batch", "time"]),
         helper.make_tensor_value_info("lengths", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6])],
        initializer=[table],
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


def test_an_onnxruntime_failure_is_a_500_for_that_request_only(tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    fragile_bundle(zoo)
    shutil.copytree(ZOO / "kim-cnn-trec6", zoo / "kim-cnn-trec6")
    with running_server(tmp_path / "home", zoo, http_workers="1") as url:
        assert classify(url, FRAGILE, GOOD_TEXT).status_code == 200
        started = time.monotonic()
        failed = classify(url, FRAGILE, BAD_TEXT)
        assert time.monotonic() - started < 5  # answered, not hung
        assert failed.status_code == 500
        message = failed.json()["error"]
        assert f"inference failed for model '{FRAGILE}'" in message and "Gather" in message, message
        # Concurrent requests share batches: the bad ones must not take the good ones down.
        texts = [BAD_TEXT if i % 4 == 0 else GOOD_TEXT for i in range(64)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda text: classify(url, FRAGILE, text).status_code, texts))
        assert statuses == [500 if text == BAD_TEXT else 200 for text in texts]
        assert classify(url, "kim-cnn-trec6", BAD_TEXT).status_code == 200  # the real graph has every id
        assert requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200


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
