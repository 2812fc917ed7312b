"""A closed-loop HTTP load from wrk (Debian's package: C, epoll, one thread): N connections,
each sending its next request as soon as the last is answered, for a fixed time.

wrk costs far less CPU per request than a Python load generator, which matters when the
client and the server share one machine; its own CPU time is measured and reported beside
the figures so that a reader can see how much of the machine the client took.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPT = Path(__file__).with_name("wrk_post.lua")
MARKER = "WRK_JSON "


class LoadGeneratorMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class LoadResult:
    connections: int
    seconds: float
    requests: int  # answered, whatever the status
    ok: int  # 2xx
    refused: int  # 429 and 503: explicit refusals
    other_statuses: dict[str, int]
    socket_errors: dict[str, int]  # connect/read/write errors and timeouts: nothing answered
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    loadgen_cpu_s: float  # user + system CPU time of wrk
    # Means of the server's own x-queue-time / x-inference-time / x-total-time headers (ms);
    # None for a server that sends none (the hand-rolled baseline).
    server_queue_ms: float | None = None
    server_inference_ms: float | None = None
    server_total_ms: float | None = None

    @property
    def ok_per_s(self) -> float:
        return self.ok / self.seconds

    def as_dict(self) -> dict:
        return {**asdict(self), "ok_per_s": self.ok_per_s}


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise LoadGeneratorMissing("wrk is not installed: `apt-get install wrk` (make bench does it)")
    return found


def run_wrk(url: str, path: str, bodies: list[str], connections: int, seconds: float, timeout_s: float = 10.0) -> LoadResult:
    """POST `bodies` (JSON strings, in turn) to url+path from `connections` connections for `seconds`."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as file:
        file.write("\n".join(bodies) + "\n")
        bodies_path = file.name
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        completed = subprocess.run(
            [wrk_binary(), "-t1", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout_s:g}s", "-s", str(SCRIPT), url],
            env={"WRK_BODIES": bodies_path, "WRK_PATH": path, "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, check=True,
        )
    finally:
        Path(bodies_path).unlink(missing_ok=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((l for l in completed.stdout.splitlines() if l.startswith(MARKER)), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{completed.stdout}\n{completed.stderr}")
    raw = json.loads(line[len(MARKER):])
    statuses = {status: int(n) for status, n in raw["statuses"].items()}
    ok = sum(n for status, n in statuses.items() if status.startswith("2"))
    refused = statuses.get("429", 0) + statuses.get("503", 0)
    latency = raw["latency_us"]
    return LoadResult(
        connections=connections,
        seconds=raw["duration_us"] / 1e6,
        requests=raw["requests"],
        ok=ok,
        refused=refused,
        other_statuses={s: n for s, n in statuses.items() if not s.startswith("2") and s not in ("429", "503")},
        socket_errors=raw["errors"],
        p50_ms=latency["p50"] / 1000, p90_ms=latency["p90"] / 1000, p99_ms=latency["p99"] / 1000, max_ms=latency["max"] / 1000,
        loadgen_cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        **server_means(raw["server_ms"]),
    )


def server_means(sums: dict) -> dict:
    answers = sums["answers"]
    if not answers:
        return {}
    return {f"server_{name}_ms": sums[name] / answers for name in ("queue", "inference", "total")}
