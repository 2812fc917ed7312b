"""Which bundles the service loads: a bad bundle is refused with the file named, and the other
models still load; a bundle the store already holds is not hashed twice."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.conftest import REPOSITORY, ZOO

LOAD = """
import json
from services.config import ServiceSettings
from services.backends.model_store import load_served
bundles, failures = load_served(ServiceSettings.from_environment())
print(json.dumps({"loaded": sorted(b.name for b in bundles), "failures": failures}))
"""


def load_served_in(home, zoo) -> dict:
    """load_served in a fresh process with its own BentoML store (BENTOML_HOME)."""
    env = {**os.environ, "BENTOML_HOME": str(home), "TEXTSERVE_ZOO": str(zoo), "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("TEXTSERVE_MODELS", None)
    result = subprocess.run([sys.executable, "-c", LOAD], cwd=REPOSITORY, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_tampered_or_incomplete_bundle_is_named_and_the_others_still_load(tmp_path):
    zoo = tmp_path / "zoo"
    for name in ("kim-cnn-trec6", "lstm-mr", "gru-mr"):
        shutil.copytree(ZOO / name, zoo / name)
    with open(zoo / "lstm-mr" / "vocab.json", "a") as vocab:
        vocab.write(" ")  # one byte more: its sha256 no longer matches the manifest
    (zoo / "gru-mr" / "labels.json").unlink()
    answer = load_served_in(tmp_path / "home", zoo)
    assert answer["loaded"] == ["kim-cnn-trec6"]
    assert set(answer["failures"]) == {"lstm-mr", "gru-mr"}
    assert "vocab.json has sha256" in answer["failures"]["lstm-mr"]
    assert "labels.json is listed in the manifest but missing" in answer["failures"]["gru-mr"]


def test_a_copy_altered_inside_the_store_is_refused_at_load(tmp_path):
    """The store's copy is checked file by file each time it is loaded, not only at import."""
    zoo = tmp_path / "zoo"
    shutil.copytree(ZOO / "kim-cnn-trec6", zoo / "kim-cnn-trec6")
    home = tmp_path / "home"
    assert load_served_in(home, zoo)["loaded"] == ["kim-cnn-trec6"]
    (stored,) = (home / "models" / "kim-cnn-trec6").glob("*/model.onnx")
    stored.write_bytes(stored.read_bytes()[:-10])  # truncated
    answer = load_served_in(home, zoo)
    assert answer["loaded"] == [] and "model.onnx has sha256" in answer["failures"]["kim-cnn-trec6"]


def test_the_service_serves_the_good_models_and_reports_the_bad_one(tmp_path):
    """What TextserveModelFailedToLoad watches: textserve_model_loaded is 0 for the bad model,
    which answers 503 with the reason, while the server is ready and serves the others."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    from tests.serving import running_server

    zoo = tmp_path / "zoo"
    for name in ("kim-cnn-trec6", "lstm-mr"):
        shutil.copytree(ZOO / name, zoo / name)
    with open(zoo / "lstm-mr" / "model.onnx", "ab") as graph:
        graph.write(b"\0")
    # Straight to `bentoml serve`: `python -m services.backends.model_store` (make serve's first step)
    # would stop at the bad bundle, as it should before a build.
    with running_server(tmp_path / "home", zoo, import_zoo=False, http_workers="1") as url:
        ready = requests.get(f"{url}/v2/health/ready", timeout=5)
        assert ready.status_code == 200 and "model.onnx has sha256" in ready.json()["failed_to_load"]["lstm-mr"]
        model_ready = requests.get(f"{url}/v2/models/lstm-mr/ready", timeout=5)
        assert model_ready.status_code == 503 and "failed to load" in model_ready.json()["error"]
        good = requests.post(f"{url}/classify", json={"model": "kim-cnn-trec6", "texts": ["Who wrote Hamlet ?"]}, timeout=10)
        assert good.status_code == 200 and good.json()["results"][0]["label"] == "HUM"
        bad = requests.post(f"{url}/classify", json={"model": "lstm-mr", "texts": ["a fine film"]}, timeout=10)
        assert bad.status_code == 503
        assert "lstm-mr" in bad.json()["error"] and "model.onnx has sha256" in bad.json()["error"]
        loaded = {sample.labels["model"]: sample.value
                  for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text)
                  for sample in family.samples if sample.name == "textserve_model_loaded"}
        assert loaded == {"kim-cnn-trec6": 1.0, "lstm-mr": 0.0}
