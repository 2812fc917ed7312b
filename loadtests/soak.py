"""`make soak`: the mixed Locust workload (loadtests/locustfile.py) against a fresh service for
a long time (default 30 minutes), recording the server's memory (RSS of every process: BentoML's
supervisor and the HTTP workers), its open file descriptors and the latency over time.

It fails (exit code 1) if, after the warm-up, the server's RSS grows by more than
--max-rss-growth (5 %), if its open file descriptors keep growing, if any answer is a 5xx, or if
any request went unanswered; every request sent must be answered, successfully or refused
explicitly.

    python -m loadtests.soak [--minutes 30] [--users 8] [--warmup-fraction 0.2] [--out DIR]

Writes under --out: soak.csv (one row per sample: seconds, RSS MiB, open files, requests/s, p50,
p99), summary.json, Locust's CSV files and soak.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

from loadtests.bench import free_port, running, servers
from services.config import REPOSITORY_ROOT

SAMPLE_EVERY_S = 5.0
PRIME_ROUNDS = 3


def prime(url: str, models: list[str]) -> None:
    """Before the clock starts: the workload's largest batches at once (a classifier batch of
    TEXTSERVE_MAX_BATCH_TEXTS long texts, several at a time; language-model batches of the
    workload's sentences), so that the allocator reaches its high-water mark now. Without it,
    RSS climbs in steps for many minutes as rarer, larger batches turn up (the 30-minute soak was
    flat only after about 18 minutes), which a short soak would read as growth."""
    long_text = ("the film is a quiet , patient study of grief and the people who carry it . " * 25)[:1500]
    sentence = "the company said it expects to report a loss for the third quarter"
    kinds = {model["name"]: model["kind"] for model in requests.get(f"{url}/models", timeout=30).json()["models"]}
    jobs = [("/lm/score", {"model": name, "texts": [sentence] * 16}) if kinds[name] == "language model"
            else ("/classify", {"model": name, "texts": [long_text] * 64}) for name in models if name in kinds]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(PRIME_ROUNDS):
            list(pool.map(lambda job: requests.post(url + job[0], json=job[1], timeout=120), [job for job in jobs for _ in range(4)]))


def server_footprint(root: psutil.Process) -> tuple[float, int, int]:
    """(RSS in MiB, open file descriptors, processes) of the server and all its children."""
    rss, files, count = 0, 0, 0
    for process in [root, *root.children(recursive=True)]:
        try:
            rss += process.memory_info().rss
            files += process.num_fds()
            count += 1
        except psutil.NoSuchProcess:  # a worker that was just replaced
            continue
    return rss / 2**20, files, count


def sample_until(root: psutil.Process, stop: threading.Event, started: float, samples: list[dict]) -> None:
    while not stop.wait(SAMPLE_EVERY_S):
        rss, files, processes = server_footprint(root)
        samples.append({"seconds": round(time.monotonic() - started, 1), "rss_mib": round(rss, 1), "open_files": files,
                        "processes": processes})


def locust_history(history_csv: Path) -> dict[int, dict]:
    """Seconds since the start -> requests/s, p50 and p99 (ms) of Locust's aggregated history."""
    rows = [row for row in csv.DictReader(history_csv.open()) if row["Name"] == "Aggregated"]
    if not rows:
        return {}
    start = int(rows[0]["Timestamp"])

    def number(value: str) -> float | None:
        return None if value in ("", "N/A") else float(value)

    return {int(row["Timestamp"]) - start: {"requests_per_s": number(row["Requests/s"]), "p50_ms": number(row["50%"]),
                                             "p99_ms": number(row["99%"])} for row in rows}


def five_hundreds(failures_csv: Path) -> int:
    """Answers with a 5xx status, 503 refusals included, from Locust's failure table."""
    count = 0
    for row in csv.DictReader(failures_csv.open()):
        message = row["Error"]
        status = message.split(":")[0].removeprefix("refused ").strip()
        if status.isdigit() and 500 <= int(status) <= 599:
            count += int(row["Occurrences"])
    return count


def judge(samples: list[dict], warmup_fraction: float, max_rss_growth: float) -> dict:
    """RSS and open-file growth after the warm-up: the warm-up's last quarter against the last
    quarter of the run (medians, so one sample during a batch does not decide)."""
    after_warmup = [s for s in samples if s["seconds"] >= samples[-1]["seconds"] * warmup_fraction]
    quarter = max(1, len(after_warmup) // 4)
    baseline, final = after_warmup[:quarter], after_warmup[-quarter:]
    rss_start = statistics.median(s["rss_mib"] for s in baseline)
    rss_end = statistics.median(s["rss_mib"] for s in final)
    files_start = statistics.median(s["open_files"] for s in baseline)
    files_end = statistics.median(s["open_files"] for s in final)
    return {"rss_mib_after_warmup": rss_start, "rss_mib_at_end": rss_end, "rss_growth": (rss_end - rss_start) / rss_start,
            "open_files_after_warmup": files_start, "open_files_at_end": files_end,
            "rss_ok": (rss_end - rss_start) / rss_start <= max_rss_growth,
            "open_files_ok": files_end <= files_start + 8}  # a few connections come and go


def plot(rows: list[dict], out: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, latency) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    seconds = [row["seconds"] for row in rows]
    memory.plot(seconds, [row["rss_mib"] for row in rows], label="server RSS (MiB)")
    files = memory.twinx()
    files.plot(seconds, [row["open_files"] for row in rows], color="tab:orange", label="open files")
    memory.set(ylabel="MiB")
    files.set(ylabel="open files")
    for percentile in ("p50_ms", "p99_ms"):
        latency.plot(seconds, [row.get(percentile) for row in rows], label=percentile)
    latency.set(xlabel="seconds", ylabel="ms", yscale="log")
    memory.legend(loc="upper left", fontsize=8)
    files.legend(loc="upper right", fontsize=8)
    latency.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--users", type=int, default=8, help="below saturation: a soak looks for leaks, not limits")
    parser.add_argument("--models", default="kim-cnn-trec6,char-lm-small-ptb")
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=REPOSITORY_ROOT / "loadtests" / "results" / "soak")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    service = next(s for s in servers(args.models.split(",")) if s.label == "service")
    port = free_port()
    locust = str(Path(sys.executable).with_name("locust"))
    samples: list[dict] = []
    with running(service, port, args.out) as root:
        prime(f"http://127.0.0.1:{port}", args.models.split(","))
        stop = threading.Event()
        started = time.monotonic()
        sampler = threading.Thread(target=sample_until, args=(root, stop, started, samples), daemon=True)
        sampler.start()
        command = [locust, "-f", "loadtests/locustfile.py", "--host", f"http://127.0.0.1:{port}", "--headless",
                   "--only-summary", "-u", str(args.users), "-r", str(args.users), "-t", f"{int(args.minutes * 60)}s",
                   "--csv", str(args.out / "locust"), "--csv-full-history",
                   # The soak judges leaks and answers, not latency: a generous p99, no refusals allowed.
                   "--slo-p99-ms", "5000", "--slo-failure-ratio", "0", "--slo-refusal-ratio", "0"]
        print(" ".join(command), flush=True)
        locust_exit = subprocess.run(command, cwd=REPOSITORY_ROOT).returncode
        stop.set()
        sampler.join()
    history = locust_history(args.out / "locust_stats_history.csv")
    rows = []
    for sample in samples:
        nearest = min(history, key=lambda s: abs(s - sample["seconds"])) if history else None
        rows.append({**sample, **(history[nearest] if nearest is not None else {})})
    with (args.out / "soak.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["seconds", "rss_mib", "open_files", "processes", "requests_per_s", "p50_ms", "p99_ms"])
        writer.writeheader()
        writer.writerows(rows)
    verdict = judge(samples, args.warmup_fraction, args.max_rss_growth)
    errors = five_hundreds(args.out / "locust_failures.csv")
    stats = next(row for row in csv.DictReader((args.out / "locust_stats.csv").open()) if row["Name"] == "Aggregated")
    summary = {"minutes": args.minutes, "users": args.users, "requests": int(stats["Request Count"]),
               "failures": int(stats["Failure Count"]), "five_hundreds": errors, "p50_ms": float(stats["50%"]),
               "p99_ms": float(stats["99%"]), "locust_exit_code": locust_exit, **verdict}
    summary["passed"] = verdict["rss_ok"] and verdict["open_files_ok"] and errors == 0 and locust_exit == 0
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, args.out / "soak.png")
    print(f"soak: {summary['requests']} requests in {args.minutes:g} min, {errors} 5xx, failures {summary['failures']}; "
          f"RSS {verdict['rss_mib_after_warmup']:.0f} -> {verdict['rss_mib_at_end']:.0f} MiB ({verdict['rss_growth']:+.1%}); "
          f"open files {verdict['open_files_after_warmup']:.0f} -> {verdict['open_files_at_end']:.0f}; "
          f"p50 {summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms: {'passed' if summary['passed'] else 'FAILED'}", flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
