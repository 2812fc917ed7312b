"""Triton's perf_analyzer drives the service unmodified (loadtests/perf_analyzer.py), over HTTP
and gRPC: it shapes its requests from the model's metadata and configuration and reads the
server's statistics around each measurement, so it stops with an error against a server without
either extension (or whose versions it cannot read as numbers). `make test` fetches the tool
(.perf-analyzer, by `python -m loadtests.perf_analyzer --install`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from loadtests import perf_analyzer
from tests.conftest import ZOO
from tests.serving import free_port, running_server

try:
    perf_analyzer.command()
    MISSING = ""
except perf_analyzer.ToolMissing as missing:
    MISSING = str(missing)

pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "perf_analyzer is installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    zoo = tmp_path_factory.mktemp("zoo")
    for name in ("kim-cnn-trec6", "digits-cnn"):
        shutil.copytree(ZOO / name, zoo / name)
    grpc_port = str(free_port())
    with running_server(tmp_path_factory.mktemp("perf-analyzer"), zoo, grpc_port=grpc_port) as url:
        yield {"http": url.removeprefix("http://"), "grpc": f"127.0.0.1:{grpc_port}"}


@pytest.mark.parametrize("model, protocol", [("kim-cnn-trec6", "http"), ("kim-cnn-trec6", "grpc"), ("digits-cnn", "grpc")])
def test_perf_analyzer_measures_the_service_with_its_server_statistics(server, model, protocol):
    with tempfile.TemporaryDirectory() as scratch:
        texts = perf_analyzer.input_data(Path(scratch)) if model == "kim-cnn-trec6" else None  # images: its own random FP32
        # stability 100 %: what is tested is that it drives the service and reads its statistics, not the machine's calm
        result = perf_analyzer.run_perf_analyzer(model, server[protocol], protocol, concurrency=2, seconds=1.5, texts=texts,
                                                 folder=Path(scratch), stability_percent=100)
    assert result["per_s"] > 20 and 0 < result["p50_ms"] <= result["p99_ms"]
    # the server's split of a request, from the statistics extension: the model ran, and took time
    assert result["server_compute_ms"] > 0 and result["server_queue_ms"] >= 0
