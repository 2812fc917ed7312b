"""SIGTERM under load drains: what the kubelet does to a pod (after its preStop sleep) must not
lose an accepted request. The signal goes to the `bentoml serve` process, PID 1 of the image
(its entrypoint execs it)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time

import pytest
import requests

from tests.conftest import ZOO
from tests.serving import start_server

REQUESTS = 6
TEXTS_PER_REQUEST = 64
# About 1 s of LSTM time per request on a 2-core machine: six of them keep both workers busy
# for a few seconds after the signal.
LONG_REVIEW = ("the film is a quiet , patient study of grief and the people who carry it " * 30)[:1990]
EXIT_SECONDS = 60  # the pod's terminationGracePeriodSeconds


def test_sigterm_under_load_answers_every_accepted_request_then_exits(tmp_path):
    process, url = start_server(tmp_path, ZOO, http_workers="2", models="lstm-mr",
                                max_latency_ms="60000")  # queued batches wait rather than get 503

    def classify(_: int) -> tuple[int, int, float]:
        answer = requests.post(f"{url}/classify", json={"model": "lstm-mr", "texts": [LONG_REVIEW] * TEXTS_PER_REQUEST}, timeout=EXIT_SECONDS)
        results = len(answer.json()["results"]) if answer.status_code == 200 else 0
        return answer.status_code, results, time.monotonic()

    try:
        with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
            futures = [pool.submit(classify, i) for i in range(REQUESTS)]
            time.sleep(0.5)  # every request sent and being worked on
            assert not any(future.done() for future in futures), "the load finished before the signal: nothing to drain"
            workers = subprocess.run(["pgrep", "-P", str(process.pid), "-f", "_bentoml_impl.worker.service"],
                                     capture_output=True, text=True).stdout.split()
            assert len(workers) == 2
            signalled_at = time.monotonic()
            os.kill(process.pid, signal.SIGTERM)
            outcomes = [future.result() for future in futures]
        exit_code = process.wait(timeout=EXIT_SECONDS)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    log = (tmp_path / "serve.log").read_text()
    assert [(status, results) for status, results, _ in outcomes] == [(200, TEXTS_PER_REQUEST)] * REQUESTS, log[-3000:]
    answered_after_signal = sum(finished > signalled_at for _, _, finished in outcomes)
    assert answered_after_signal == REQUESTS, "every request was still in flight at the signal, and each was answered"
    assert exit_code == 0, log[-3000:]
    # Nothing of the server is left behind: its workers exited with it.
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
