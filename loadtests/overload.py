"""Overload, measured: how fast the service says no, and what the requests it accepts pay.

    python -m loadtests.overload [--clients 256] [--seconds 10] [--texts-per-request 16]
                                 [--max-pending-texts 128] [--model kim-cnn-trec6] [--ignore-retry-after]

Starts the service with a small admission limit (TEXTSERVE_MAX_PENDING_TEXTS per HTTP
worker), then keeps --clients concurrent closed-loop clients (asyncio + aiohttp, one
connection each) posting /classify for --seconds, after a short warm-up that is not counted.
A refused client waits the Retry-After it was given, as a well-behaved client does; with
--ignore-retry-after it posts again at once (a retry storm, in which refusing is itself the
load). Prints one row per answer status: count, p50, p99 and max latency in ms as the client
saw it and as the server's x-total-time header gives it, and the requests that got no answer
at all (the service must have none). The design's promise is that every
refusal is a fast 429/503 with Retry-After (p99 under 50 ms) while accepted requests keep a
latency bounded by the queue limit. Client and server share the machine: the client's time
is inside these latencies, so they are upper bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

from loadtests.bench import free_port, running, sample_questions, servers
from services.config import REPOSITORY_ROOT

WARM_UP_SECONDS = 3.0
REFUSAL_P99_TARGET_MS = 50.0


async def closed_loop_clients(url: str, clients: int, seconds: float, texts: list[str], model: str,
                              texts_per_request: int, honour_retry_after: bool):
    """Client latencies (s) by status, server x-total-time (ms) by status, failures without an
    answer by kind, Retry-After values seen by status."""
    latencies: dict[int, list[float]] = defaultdict(list)
    server_ms: dict[int, list[float]] = defaultdict(list)
    lost: dict[str, int] = defaultdict(int)
    retry_after: dict[int, set] = defaultdict(set)
    counting_from = time.monotonic() + WARM_UP_SECONDS
    stop_at = counting_from + seconds
    timeout = aiohttp.ClientTimeout(total=60)

    async def one_client(rng: random.Random) -> None:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=1)) as session:
            while (now := time.monotonic()) < stop_at:
                body = json.dumps({"model": model, "texts": rng.sample(texts, texts_per_request)})
                started = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                        await response.read()
                        status, header = response.status, response.headers.get("Retry-After")
                        server_total = response.headers.get("x-total-time")
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    if now >= counting_from:
                        lost[type(error).__name__] += 1
                    continue
                if now >= counting_from:
                    latencies[status].append(time.perf_counter() - started)
                    retry_after[status].add(header)
                    if server_total is not None:
                        server_ms[status].append(float(server_total))
                if header is not None and honour_retry_after:
                    await asyncio.sleep(float(header))

    await asyncio.gather(*(one_client(random.Random(seed)) for seed in range(clients)))
    return latencies, server_ms, lost, retry_after


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="kim-cnn-trec6")
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--texts-per-request", type=int, default=16)
    parser.add_argument("--max-pending-texts", type=int, default=128, help="the service's admission limit per HTTP worker")
    parser.add_argument("--ignore-retry-after", action="store_true", help="refused clients post again at once (a retry storm)")
    parser.add_argument("--inference", choices=["inline", "runner"], default=None,
                        help="TEXTSERVE_INFERENCE for the service (default: as it ships, auto)")
    parser.add_argument("--out", type=Path, default=REPOSITORY_ROOT / "loadtests" / "results" / "overload")
    args = parser.parse_args(argv)

    service = next(s for s in servers([args.model]) if s.label == "service")
    service.env["TEXTSERVE_MAX_PENDING_TEXTS"] = str(args.max_pending_texts)
    if args.inference:
        service.env["TEXTSERVE_INFERENCE"] = args.inference
    port = free_port()
    with running(service, port, args.out):
        cpu_before, wall_before = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        latencies, server_ms, lost, retry_after = asyncio.run(closed_loop_clients(
            f"http://127.0.0.1:{port}/classify", args.clients, args.seconds, sample_questions(), args.model,
            args.texts_per_request, honour_retry_after=not args.ignore_retry_after))
        cpu_after, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - wall_before
    # The clients' own share of the machine (warm-up included): their latencies include waiting for it.
    client_cpu_share = ((cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)) / wall / os.cpu_count()
    sent = sum(len(v) for v in latencies.values()) + sum(lost.values())
    print(f"{args.clients} clients x {args.texts_per_request} texts/request for {args.seconds:g} s; "
          f"TEXTSERVE_MAX_PENDING_TEXTS={args.max_pending_texts}; "
          f"{'retry storm (Retry-After ignored)' if args.ignore_retry_after else 'clients wait Retry-After'}; {sent} requests sent; "
          f"the clients used {client_cpu_share:.0%} of the machine's CPU")
    print("| status | requests | share | client p50 ms | client p99 ms | client max ms | server p50 ms | server p99 ms | Retry-After |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for status in sorted(latencies):
        values, server = latencies[status], server_ms[status]
        rows[status] = {"requests": len(values), "p50_ms": 1000 * statistics.median(values),
                        "p99_ms": 1000 * percentile(values, 0.99), "max_ms": 1000 * max(values),
                        "server_p50_ms": statistics.median(server) if server else None,
                        "server_p99_ms": percentile(server, 0.99) if server else None}
        server_cells = (f"{rows[status]['server_p50_ms']:.2f} | {rows[status]['server_p99_ms']:.2f}" if server else " | ")
        print(f"| {status} | {len(values)} | {len(values) / sent:.1%} | {rows[status]['p50_ms']:.1f} | "
              f"{rows[status]['p99_ms']:.1f} | {rows[status]['max_ms']:.1f} | {server_cells} | "
              f"{', '.join(sorted(map(str, retry_after[status])))} |")
    print(f"| no answer | {sum(lost.values())} | | | | | | | {dict(lost) or ''} |")
    refused = [rows[s]["p99_ms"] for s in (429, 503) if s in rows]
    verdict = ("no refusals at this load" if not refused else
               f"refusal p99 as the client saw it {max(refused):.1f} ms: "
               f"{'met' if max(refused) < REFUSAL_P99_TARGET_MS else 'NOT met'} (target < {REFUSAL_P99_TARGET_MS:g} ms)")
    print(verdict)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ("overload-storm.json" if args.ignore_retry_after else "overload.json")).write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "by_status": rows,
                                                        "lost": dict(lost), "sent": sent,
                                                        "client_cpu_share": client_cpu_share}, indent=2))
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
