"""The gRPC benchmark's own path (loadtests/bench_grpc.py), briefly: a real server, a gRPC frame
that the server answers, h2load's count checked against the server's count of calls answered 200."""

from __future__ import annotations

import shutil

import pytest

from loadtests.bench_grpc import measure, report


@pytest.mark.skipif(shutil.which("h2load") is None or shutil.which("wrk") is None,
                    reason="h2load or wrk is not installed (apt-get install nghttp2-client wrk; .ci/run installs them)")
def test_the_grpc_benchmark_measures_calls_that_the_server_answered(tmp_path):
    results = measure("kim-cnn-trec6", [1, 4], seconds=2, rounds=1, log_dir=tmp_path)
    grpc = {r["clients"]: r for r in results if r["protocol"] == "gRPC"}
    for clients, level in grpc.items():  # the calls h2load resets at its end: at most one per connection
        assert level["grpc_cancelled"] <= clients
    http = {r["clients"]: r for r in results if r["protocol"] == "HTTP"}
    assert set(grpc) == set(http) == {1, 4}
    for level in grpc.values():
        assert level["calls"] > 50 and level["http_200"] == level["calls"] == level["logged"]
        # every call h2load sent in the measured window was answered 200 by the service (its metrics)
        assert level["grpc_errors"] == 0 and level["grpc_ok"] >= level["calls"]
        assert 0 < level["p50_ms"] <= level["p99_ms"]
    assert all(level["errors"] == 0 and level["per_s"] > 50 for level in http.values())
    headers, rows = report(results, "kim-cnn-trec6", 2)
    assert [row[:2] for row in rows] == [["1", "gRPC"], ["1", "HTTP"], ["4", "gRPC"], ["4", "HTTP"]]


@pytest.mark.skipif(shutil.which("h2load") is None or shutil.which("wrk") is None or shutil.which("taskset") is None,
                    reason="h2load, wrk or taskset is not installed (apt-get install nghttp2-client wrk; .ci/run installs them)")
def test_the_protocol_floor_counts_calls_each_bare_server_answered():
    # loadtests/grpc_floor.py: a bare grpc.aio server and a bare uvicorn app, each loaded briefly;
    # every figure comes from calls answered 200 and the server process's own counters.
    from loadtests.grpc_floor import measure

    for protocol in ("gRPC", "HTTP"):
        result = measure(protocol, clients=4, seconds=1.0)
        assert result["protocol"] == protocol
        assert result["calls_per_s"] > 100
        assert 0 < result["cpu_us_per_call"] < 100_000
        assert result["writes_per_call"] >= 1  # at least the answer's own write, per call
