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
from tests.serving import kill_server, start_server, wait_until_requests_are_read

REQUESTS = 4
TEXTS_PER_REQUEST = 256  # TEXTSERVE_MAX_TEXTS_PER_REQUEST
# About 2.5 s of LSTM time per request on a 2-core machine (0.6 s for 64 texts, measured), so
# even the first request, which a worker runs at once, is still running when the signal comes
# about 0.3 s later; four of them keep both workers busy for several seconds after it.
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
            wait_until_requests_are_read(url, REQUESTS)  # every request sent and being worked on
            finished = [future.exception() or future.result() for future in futures if future.done()]
            assert not finished, f"requests finished before the signal: nothing to drain: {finished}"
            workers = subprocess.run(["pgrep", "-P", str(process.pid), "-f", "_bentoml_impl.worker.service"],
                                     capture_output=True, text=True).stdout.split()
            assert len(workers) == 2
            signalled_at = time.monotonic()
            os.kill(process.pid, signal.SIGTERM)
            outcomes = [future.result() for future in futures]
        exit_code = process.wait(timeout=EXIT_SECONDS)
    except BaseException:
        kill_server(process)
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
