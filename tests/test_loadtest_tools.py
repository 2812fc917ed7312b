"""The pieces of `make loadtest` that decide what its run says (loadtests/run_loadtest.py,
loadtests/locustfile.py), checked by hand: the users' think time and the machine's CPU shares
it reports, so that a failed gate beside other busy processes says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.run_loadtest import OTHERS_BUSY, cpu_shares
from tests.conftest import REPOSITORY


def test_the_cpu_shares_of_a_run_are_the_servers_locusts_and_the_rest():
    # 10 s on 2 cores: 20 CPU seconds; the machine was busy 15, the server 10, Locust 2
    shares = cpu_shares(10.0, busy_s=15.0, server_s=10.0, locust_s=2.0)
    assert shares["server"] == pytest.approx(0.50) and shares["locust"] == pytest.approx(0.10)
    assert shares["other"] == pytest.approx(0.15)
    assert shares["line"].endswith("the server 50%, Locust 10%, other processes 15%")
    assert shares["other"] >= OTHERS_BUSY  # worth the word the run prints beside a failed gate
    quiet = cpu_shares(10.0, busy_s=12.5, server_s=11.0, locust_s=1.5)
    assert quiet["other"] == pytest.approx(0.0)


@pytest.mark.parametrize("bad", ["fast", "0.3-0.1", "-1"])
def test_a_bad_think_time_stops_locust_with_its_name(bad):
    # (the locustfile is run by Locust, not imported here: importing locust into pytest patches the process)
    result = subprocess.run([str(Path(sys.executable).with_name("locust")), "-f", "loadtests/locustfile.py", "--headless", "-u", "1",
                             "-t", "1s", "--host", "http://127.0.0.1:9"], cwd=REPOSITORY, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "TEXTSERVE_LOAD_THINK_S": bad})
    assert result.returncode != 0 and f"TEXTSERVE_LOAD_THINK_S={bad!r}" in result.stderr, result.stderr[-1000:]


def test_make_loadtests_run_passes_its_gate_and_reports_the_machines_cpu(tmp_path):
    # `make loadtest` as shipped (its own server, 32 users at their think time), 10 s instead of 60:
    # the gate's 1 s p99 holds with a wide margin on a 2-core machine (p99 about 0.3 s in 60 s runs).
    result = subprocess.run([sys.executable, "-m", "loadtests.run_loadtest", "--time", "10s", "--out", str(tmp_path)],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output
    assert re.search(r"SLO gate: sent \d+, succeeded \d+, refused 0, failed 0, lost 0; p99 \d+ ms: passed", output), output
    assert re.search(r"CPU of the machine while it ran \(\d+ cores, \d+ s\): the server \d+%, Locust \d+%, other processes \d+%",
                     output), output
