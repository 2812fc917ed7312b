"""Schemathesis over the service's OpenAPI document, against a real server: a few hundred
generated requests (valid, invalid, undeclared methods) with no 5xx, every error a JSON message,
every status and body as documented. `make fuzz` runs the same with at least 1,000 cases.

Property tests (hypothesis) of the torch-free encoders are in tests/test_encoder_properties.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPOSITORY, ZOO
from tests.serving import running_server

# What must hold for every generated request. Left out: positive_data_acceptance (a
# schema-valid body can still break a rule JSON Schema cannot say, such as a shape that must
# match its data's length, and is rightly answered 400), and the stateful phase's link checks.
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance,unsupported_method,error_has_a_message")
# make test: 20 per operation and phase (several hundred requests); make fuzz sets 100 (over a thousand).
EXAMPLES_PER_OPERATION = int(os.environ.get("TEXTSERVE_FUZZ_EXAMPLES", "20"))


def run_schemathesis(url: str, examples: int, report: Path, seed: int = 1) -> subprocess.CompletedProcess:
    """The schemathesis CLI with our checks (tests/fuzz_checks.py); a JSON report at `report`."""
    schemathesis = str(Path(sys.executable).parent / "schemathesis")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_checks", "PYTHONPATH": str(REPOSITORY)}
    return subprocess.run(
        [schemathesis, "run", f"{url}/openapi.json", "--checks", CHECKS, "--max-examples", str(examples),
         "--seed", str(seed), "--phases", "examples,coverage,fuzzing", "--request-timeout", "30",
         "--report", "json", "--report-json-path", str(report), "--no-color"],
        cwd=REPOSITORY, env=env, capture_output=True, text=True)


def cases_and_failures(report: Path) -> tuple[int, list]:
    """Requests generated and failures found, from schemathesis' JSON report."""
    summary = json.loads(report.read_text())
    return summary["test_cases"]["generated"], summary["failures"] + summary["errors"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Model control on, so that the repository routes are fuzzed for real (loads, unloads and
    # their refusals); a model the fuzzer unloads answers 404, which every route documents.
    with running_server(tmp_path_factory.mktemp("bentoml_home"), ZOO, http_workers="2", model_control="explicit",
                        models="kim-cnn-trec6,char-lm-small-ptb,lstm-mr,digits-cnn") as url:
        yield url


def test_schemathesis_finds_no_5xx_and_every_error_has_a_message(server, tmp_path):
    report = tmp_path / "schemathesis.json"
    result = run_schemathesis(server, EXAMPLES_PER_OPERATION, report)
    cases, failures = cases_and_failures(report)
    print(f"schemathesis: {cases} requests, {len(failures)} failures")  # make fuzz shows it
    assert result.returncode == 0 and not failures, result.stdout[-6000:]
    assert cases >= 10 * EXAMPLES_PER_OPERATION, f"only {cases} requests were generated:\n{result.stdout[-3000:]}"
