"""A two-minute soak (`make soak` runs 30 minutes): the mixed Locust workload against a fresh
service, with the server's memory, open files and latency recorded; no 5xx, no lost request, RSS
growth after the warm-up within 5 %."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPOSITORY

MINUTES = 2


def test_a_two_minute_soak_keeps_memory_flat_and_answers_everything(tmp_path):
    # The first minute is warm-up: the allocator settles at the largest batches it has seen.
    result = subprocess.run([sys.executable, "-m", "loadtests.soak", "--minutes", str(MINUTES), "--warmup-fraction", "0.5",
                             "--out", str(tmp_path)], cwd=REPOSITORY, capture_output=True, text=True, timeout=MINUTES * 60 + 240)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = (tmp_path / "soak.csv").read_text().splitlines()
    assert result.returncode == 0 and summary["passed"], result.stdout[-3000:] + result.stderr[-3000:]
    assert summary["five_hundreds"] == 0 and summary["failures"] == 0
    assert summary["requests"] > 1000
    assert summary["rss_growth"] <= 0.05
    assert len(rows) > MINUTES * 60 / 5 - 3  # a sample every 5 s
