"""The README's own-model example, run as written: train on the committed TREC sample, export
without --data (float16 chosen by the rounding check), and serve the new bundle without a
restart, picked up from the zoo folder by TEXTSERVE_MODEL_CONTROL=poll; then the folder is
removed and the model unloaded, with a 404 that says how to add it back.

The lines run in a scratch folder laid out as a clone (training/, services/, .venv and models/
with an empty zoo of its own), so that checkpoints/ and models/zoo/my-trec6 are written there,
not into this checkout. `make serve` is the one line not run: the test starts the same server
with the same setting (tests/serving.py), and the curl lines get its port instead of 3000."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from services.backends.inference import read_bundle
from tests.conftest import REPOSITORY, ZOO
from tests.serving import running_server

README = REPOSITORY / "README.md"
POLL_INTERVAL_S = 1


def example_lines() -> list[str]:
    block = re.search(r"<!-- example: own-model -->\n```sh\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md lost its own-model example"
    return [line for line in block.group(1).splitlines() if line.strip()]


def without_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line)


def clone_like(folder: Path) -> Path:
    """A folder where the README's relative paths mean what they mean in a clone."""
    folder.mkdir()
    for name in ("training", "services", ".venv"):
        (folder / name).symlink_to(REPOSITORY / name)
    (folder / "models" / "zoo").mkdir(parents=True)
    for entry in (REPOSITORY / "models").iterdir():
        if entry.name != "zoo":
            (folder / "models" / entry.name).symlink_to(entry)
    shutil.copytree(ZOO / "kim-cnn-trec6", folder / "models" / "zoo" / "kim-cnn-trec6")  # a server starts with a model
    return folder


def run(line: str, cwd: Path, port: int) -> str:
    command = without_comment(line).replace("localhost:3000", f"127.0.0.1:{port}")
    done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def wait_for_status(url: str, model: str, status: int, timeout_s: float) -> requests.Response:
    """/classify of `model` until it answers `status` (a Response of 4xx is falsy: compared by status)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = classify(url, model, "Who wrote Hamlet ?")
        if answer.status_code == status:
            return answer
        assert time.monotonic() < deadline, f"{model} not {status} within {timeout_s} s: {answer.status_code} {answer.text[:300]}"
        time.sleep(0.2)


def classify(url: str, model: str, text: str) -> requests.Response:
    return requests.post(f"{url}/classify", json={"model": model, "texts": [text]}, timeout=30)


def test_the_readme_own_model_example_trains_exports_and_is_served_without_a_restart(tmp_path):
    lines = example_lines()
    serve, steps = lines[0], lines[1:]
    assert without_comment(serve) == "TEXTSERVE_MODEL_CONTROL=poll make serve"
    train, export, load, ask = steps
    assert train.startswith(".venv/bin/python -m training train") and export.startswith(".venv/bin/python -m training export")
    work = clone_like(tmp_path / "clone")
    with running_server(tmp_path / "home", work / "models" / "zoo", model_control="poll",
                        model_poll_interval_s=str(POLL_INTERVAL_S)) as url:
        port = int(url.rsplit(":", 1)[1])
        missing = classify(url, "my-trec6", "Who wrote Hamlet ?")
        assert missing.status_code == 404 and "it is loaded within 1 s (TEXTSERVE_MODEL_CONTROL=poll)" in missing.json()["error"]

        trained = json.loads(run(train, work, port).splitlines()[-1])
        assert trained["train_examples"] == 1350 and trained["dev_accuracy"] > 0.5  # 6 classes: chance is about 0.2
        exported = json.loads(run(export, work, port).splitlines()[-1])
        assert exported["weight_storage"] == "float16", exported  # the rounding changed no prediction of 512
        assert exported["parity_max_abs_logit_delta"] <= 1e-4
        bundle = read_bundle(work / "models" / "zoo" / "my-trec6")

        # Nobody has called load: the poller serves it within a scan or two.
        served = wait_for_status(url, "my-trec6", 200, 10 * POLL_INTERVAL_S + 30)
        assert served.json()["model"] == "my-trec6"
        loaded = json.loads(run(load, work, port))  # the README's load call: the poller has loaded it already
        assert loaded == {"name": "my-trec6", "version": bundle.version, "state": "READY"}
        answer = json.loads(run(ask, work, port))
        assert answer["model"] == "my-trec6" and answer["results"][0]["label"] in json.loads(
            (work / "models" / "zoo" / "my-trec6" / "labels.json").read_text())
        index = {entry["name"]: entry for entry in requests.post(f"{url}/v2/repository/index", json={}, timeout=10).json()}
        assert index["my-trec6"] == {"name": "my-trec6", "version": bundle.version, "state": "READY"}

        # Re-exported (float32 this time): the poller swaps the new version in.
        run(without_comment(export) + " --storage float32", work, port)
        float32 = read_bundle(work / "models" / "zoo" / "my-trec6")
        assert float32.sha256 != bundle.sha256 and float32.metrics["weight_storage"] == "float32"
        deadline = time.monotonic() + 10 * POLL_INTERVAL_S + 30
        while requests.post(f"{url}/v2/repository/index", json={}, timeout=10).json() != [
                {"name": "kim-cnn-trec6", "version": read_bundle(ZOO / "kim-cnn-trec6").version, "state": "READY"},
                {"name": "my-trec6", "version": float32.version, "state": "READY"}]:
            assert time.monotonic() < deadline, "the re-exported my-trec6 was not swapped in"
            time.sleep(0.2)
        assert classify(url, "my-trec6", "Who wrote Hamlet ?").status_code == 200

        # The folder leaves the zoo: unloaded after two scans, and the 404 says how to add it back.
        shutil.rmtree(work / "models" / "zoo" / "my-trec6")
        gone = wait_for_status(url, "my-trec6", 404, 10 * POLL_INTERVAL_S + 30)
        assert gone.json()["error"].endswith("To add it: put its bundle folder my-trec6/ in the zoo folder (TEXTSERVE_ZOO); "
                                             "it is loaded within 1 s (TEXTSERVE_MODEL_CONTROL=poll)"), gone.json()
        assert str(work) not in gone.text  # no path of the server's in an answer
        assert classify(url, "kim-cnn-trec6", "Who wrote Hamlet ?").json()["results"][0]["label"] == "HUM"
