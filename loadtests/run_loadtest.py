"""`make loadtest`: the Locust scenarios of loadtests/locustfile.py, headless, against the
service (started here unless --host names a running one), with the SLO gate deciding the exit
code. Writes under --out: Locust's CSV files (with the full history), its HTML report, and
loadtest.png (users, requests/s, failures/s and latency percentiles over time).

    python -m loadtests.run_loadtest [--users 32] [--spawn-rate 8] [--time 60s] [--shape step|spike]
                                     [--scenario ClassifierUser] [--slo-p99-ms 1000] [--host URL]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import subprocess
import sys
from pathlib import Path

from loadtests.bench import free_port, running, servers
from services.config import REPOSITORY_ROOT


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
    parser.add_argument("--slo-p99-ms", type=float, default=1000.0)
    parser.add_argument("--slo-failure-ratio", type=float, default=0.01)
    parser.add_argument("--slo-refusal-ratio", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=REPOSITORY_ROOT / "loadtests" / "results" / "loadtest")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    if args.shape:
        env.update(TEXTSERVE_LOAD_SHAPE=args.shape, TEXTSERVE_LOAD_MAX_USERS=str(args.users))
    locust = str(Path(sys.executable).with_name("locust"))
    with contextlib.ExitStack() as stack:
        host = args.host
        if host is None:
            service = next(s for s in servers(args.models.split(",")) if s.label == "service")
            port = free_port()
            stack.enter_context(running(service, port, args.out))
            host = f"http://127.0.0.1:{port}"
        command = [locust, "-f", "loadtests/locustfile.py", "--host", host, "--headless", "--only-summary",
                   "--csv", str(args.out / "locust"), "--csv-full-history", "--html", str(args.out / "report.html"),
                   "--slo-p99-ms", str(args.slo_p99_ms), "--slo-failure-ratio", str(args.slo_failure_ratio),
                   "--slo-refusal-ratio", str(args.slo_refusal_ratio), *args.scenario]
        if not args.shape:
            command += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.time]
        print(" ".join(command), flush=True)
        exit_code = subprocess.run(command, cwd=REPOSITORY_ROOT, env=env).returncode
    plot_history(args.out / "locust_stats_history.csv", args.out / "loadtest.png")
    print(f"wrote {args.out}/locust_*.csv, report.html, loadtest.png; Locust (SLO gate) exit code {exit_code}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
