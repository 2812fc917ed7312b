"""`make loadtest`: the Locust scenarios of loadtests/locustfile.py, headless, against the
service (started here unless --host names a running one), with the SLO gate deciding the exit
code. Writes under --out: Locust's CSV files (with the full history), its HTML report, and
loadtest.png (users, requests/s, failures/s and latency percentiles over time).

    python -m loadtests.run_loadtest [--users 32] [--spawn-rate 8] [--time 60s] [--shape step|spike]
                                     [--think 0.1-0.3] [--scenario ClassifierUser] [--slo-p99-ms 1000] [--host URL]

Each user waits 0.1-0.3 s (--think) between its requests: a steady load that a 2-core machine
serves within the gate (the service as released, an ensemble of 3 Kim CNNs behind /classify).
With no wait (--think 0-0.05, as before 2026-12-06) every user keeps a request in flight, which
is a saturation test: its p99 is the queue of a saturated machine (about users / throughput)
and grows with the model's cost, so 32 such users failed the 1 s gate once the ensemble made
each text three times dearer. The step and spike shapes go past the sustainable load on purpose.

The run also reports the machine's CPU while it ran: the server's share, Locust's own, and
everything else's. When the gate fails beside other busy processes, it says so: its figures
were measured on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil

from loadtests.bench import free_port, running, servers, tree_cpu_seconds
from services.config import REPOSITORY_ROOT


OTHERS_BUSY = 0.15  # a share of the machine's CPU taken by neither the server nor Locust that is worth a word


def busy_cpu_seconds() -> float:
    """CPU seconds every core of the machine has spent busy (not idle, not waiting on I/O)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (Locust, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_shares(seconds: float, busy_s: float, server_s: float | None, locust_s: float) -> dict:
    """The machine's CPU over the run, as shares of all its cores: the server's (when this run
    started it), Locust's and the rest's."""
    capacity = seconds * (psutil.cpu_count() or 1)
    server = (server_s or 0.0) / capacity
    locust = locust_s / capacity
    other = max(0.0, busy_s / capacity - server - locust) if server_s is not None else max(0.0, busy_s / capacity - locust)
    named = f"the server {server:.0%}, " if server_s is not None else "the server (not started here) and others "
    return {"server": server, "locust": locust, "other": other,
            "line": f"CPU of the machine while it ran ({psutil.cpu_count()} cores, {seconds:.0f} s): {named}"
                    f"Locust {locust:.0%}, other processes {other:.0%}"}


def plot_history(history_csv: Path, out: Path) -> None:
    """Users, throughput and latency over the run, from Locust's --csv-full-history file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in csv.DictReader(history_csv.open()) if row["Name"] == "Aggregated"]
    if not rows:
        return
    start = int(rows[0]["Timestamp"])
    seconds = [int(row["Timestamp"]) - start for row in rows]

    def column(name: str) -> list[float]:
        return [float(row[name]) if row[name] not in ("", "N/A") else float("nan") for row in rows]

    figure, (load, latency) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    load.plot(seconds, column("Requests/s"), label="requests/s")
    load.plot(seconds, column("Failures/s"), label="failures/s (refusals included)")
    load.plot(seconds, column("User Count"), label="users", linestyle="--")
    for percentile in ("50%", "95%", "99%"):
        latency.plot(seconds, column(percentile), label=f"p{percentile.rstrip('%')}")
    load.set(ylabel="per second / users")
    latency.set(xlabel="seconds", ylabel="ms (percentiles over the last 10 s)", yscale="log")
    for axis in (load, latency):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None, help="a running server; default: start the service on a free port")
    parser.add_argument("--models", default="kim-cnn-trec6,char-lm-small-ptb", help="bundles the started service serves")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--spawn-rate", type=float, default=8)
    parser.add_argument("--time", default="60s")
    parser.add_argument("--shape", choices=("step", "spike"), default=None, help="a load shape instead of --users/--time")
    parser.add_argument("--scenario", action="append", default=[], help="user class(es); default: the mixed workload")
    parser.add_argument("--think", default="0.1-0.3", help="MIN-MAX seconds each user waits between requests (0-0.05: saturate)")
    parser.add_argument("--slo-p99-ms", type=float, default=1000.0)
    parser.add_argument("--slo-failure-ratio", type=float, default=0.01)
    parser.add_argument("--slo-refusal-ratio", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=REPOSITORY_ROOT / "loadtests" / "results" / "loadtest")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    env = {**os.environ, "TEXTSERVE_LOAD_THINK_S": args.think}
    if args.shape:
        env.update(TEXTSERVE_LOAD_SHAPE=args.shape, TEXTSERVE_LOAD_MAX_USERS=str(args.users))
    locust = str(Path(sys.executable).with_name("locust"))
    with contextlib.ExitStack() as stack:
        host = args.host
        server_root = None
        if host is None:
            service = next(s for s in servers(args.models.split(",")) if s.label == "service")
            port = free_port()
            server_root = stack.enter_context(running(service, port, args.out))
            host = f"http://127.0.0.1:{port}"
        command = [locust, "-f", "loadtests/locustfile.py", "--host", host, "--headless", "--only-summary",
                   "--csv", str(args.out / "locust"), "--csv-full-history", "--html", str(args.out / "report.html"),
                   "--slo-p99-ms", str(args.slo_p99_ms), "--slo-failure-ratio", str(args.slo_failure_ratio),
                   "--slo-refusal-ratio", str(args.slo_refusal_ratio), *args.scenario]
        if not args.shape:
            command += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.time]
        print(" ".join(command), flush=True)
        machine_before, server_before = busy_cpu_seconds(), tree_cpu_seconds(server_root) if server_root else 0.0
        locust_before = children_cpu_seconds()
        started = time.monotonic()
        exit_code = subprocess.run(command, cwd=REPOSITORY_ROOT, env=env).returncode
        shares = cpu_shares(time.monotonic() - started, busy_cpu_seconds() - machine_before,
                            (tree_cpu_seconds(server_root) - server_before) if server_root else None,
                            children_cpu_seconds() - locust_before)
        print(shares["line"], flush=True)
        if exit_code != 0 and shares["other"] > OTHERS_BUSY:
            print(f"the gate failed while other processes took {shares['other']:.0%} of the machine's CPU: its figures were "
                  "measured on a shared machine; run it on a quiet one", flush=True)
    plot_history(args.out / "locust_stats_history.csv", args.out / "loadtest.png")
    print(f"wrote {args.out}/locust_*.csv, report.html, loadtest.png; Locust (SLO gate) exit code {exit_code}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
