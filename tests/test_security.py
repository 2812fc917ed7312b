"""Security basics: nothing unpickled on the load path, model names never used as paths (the
path-like rows of tests/test_errors.py), and request texts kept out of the logs, even with the
access log on. The dependency audit is `make audit` (pip-audit; it needs PyPI's vulnerability
service)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import requests

from tests.conftest import REPOSITORY, ZOO
from tests.serving import running_server

CANARY = "zebra-canary-7f3c"  # a word no log line has a reason to contain


def calls_in(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]


def called_name(call: ast.Call) -> str:
    return ast.unparse(call.func)


def test_bundles_hold_only_json_and_onnx_and_the_loaders_unpickle_nothing():
    for manifest in ZOO.glob("*/manifest.json"):
        files = json.loads(manifest.read_text())["files"]
        assert {Path(name).suffix for name in files} <= {".json", ".onnx"}, manifest
    for path in [*(REPOSITORY / "services").rglob("*.py"), REPOSITORY / "models" / "text_encoding.py"]:
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & {"pickle", "dill", "joblib", "torch", "marshal", "shelve"}, (path, imported)
        for call in calls_in(path):
            name = called_name(call)
            assert name not in ("eval", "exec", "pickle.load", "pickle.loads", "marshal.loads"), (path, name)
            if name in ("np.load", "numpy.load"):
                assert any(k.arg == "allow_pickle" and ast.unparse(k.value) == "False" for k in call.keywords), path
    for path in [*(REPOSITORY / "training").rglob("*.py"), *(REPOSITORY / "deploy").rglob("*.py")]:  # checkpoints: tensors only
        for call in calls_in(path):
            if called_name(call) == "torch.load":
                assert any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in call.keywords), (path, ast.unparse(call))


def test_request_texts_stay_out_of_the_log_even_with_the_access_log_on(tmp_path):
    home = tmp_path / "home"
    with running_server(home, ZOO, http_workers="1", models="kim-cnn-trec6", access_log="1") as url:
        answers = [
            requests.post(f"{url}/classify", json={"model": "kim-cnn-trec6", "texts": [f"Who is {CANARY} ?"]}, timeout=10),
            requests.post(f"{url}/classify", json={"model": "kim-cnn-trec6", "texts": [CANARY * 500]}, timeout=10),  # 413
            requests.post(f"{url}/classify", json={"model": "kim-cnn-trec6", "texts": [CANARY, 1]}, timeout=10),  # 400
            requests.post(f"{url}/lm/score", json={"model": "kim-cnn-trec6", "texts": [CANARY]}, timeout=10),  # wrong kind
            requests.post(f"{url}/v2/models/kim-cnn-trec6/infer", timeout=10,
                          json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [CANARY]}]}),
        ]
        assert [a.status_code for a in answers] == [200, 413, 400, 400, 200]
    log = (home / "serve.log").read_text()
    assert "method=POST,path=/classify" in log, "the access log is on: requests are logged"
    assert CANARY not in log
