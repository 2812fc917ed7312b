"""Where a request's CPU goes: py-spy on one HTTP worker of the service under wrk (or h2load).

    python -m loadtests.profile_service [--model kim-cnn-trec6] [--path /classify] [--protocol http|grpc]
                                        [--connections 64] [--seconds 20] [--texts-per-request 1]
                                        [--env TEXTSERVE_X=Y ...] [--out loadtests/results/profile]

Starts `bentoml serve services.service:TextService` (as `make serve` does: one HTTP worker per
core), loads it with wrk for a warm-up and then for `--seconds`, and meanwhile samples one HTTP
worker with `py-spy record --gil --format raw` (the thread holding the GIL, 200 times a second).
Each sample is charged to one layer: the layer of its innermost frame that a rule in LAYERS
names (a sample whose innermost frame is in prometheus_client is "metrics", whatever called
it). Samples ÷ rate ÷ the requests that worker answered (the answered requests in proportion
to its share of the HTTP workers' CPU) give microseconds of GIL-held CPU per request.

--protocol grpc loads OIP v2 ModelInfer over gRPC instead (one text per call, h2load, as
loadtests/bench_grpc.py sends it; --path and --texts-per-request do not apply); the calls
answered are the server's own count of ModelInfer calls with status 200.

Prints the table and writes profile.md, profile.json and the raw stacks (stacks.txt) under --out.
py-spy comes from PyPI (`pip install py-spy`, in the bench extra); it needs ptrace, i.e. root or
CAP_SYS_PTRACE.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from loadtests import bench_grpc
from loadtests.bench import READY_TIMEOUT_S, free_port, sample_questions, tree_cpu_seconds
from loadtests.bench_grpc import grpc_frame
from loadtests.wrk import LoadResult, run_wrk
from services.config import REPOSITORY_ROOT

# (layer, substrings of a frame's "function (file:line)" that put a sample there), innermost
# match wins. Order matters only between rules that could match the same frame.
ROUTING_LAYER = "routing and dependency solving (Starlette, FastAPI)"
# Files of services/ by name, so that a profile taken before the layout of issue 17 (one flat
# folder) is charged as one taken now (services/http, api, backends).
FRONT_AND_MIDDLEWARES = ("request_timing", "admission", "body_limit", "keep_alive", "bentoml_timeout", "errors", "slow_clients",
                         "fast_front", "front", "pipeline", "routes", "body", "deadline", "connection_limits", "bentoml_hook")
ROUTES = ("http_api", "lm_api", "image_api", "open_inference", "oip", "service")
BACKENDS = ("runner", "in_process", "shared_runner", "inference", "language_model", "explain")


def in_services(*names: str) -> tuple[str, ...]:
    return tuple(f"{name}.py" for name in names)  # matched as "/<name>.py" below


LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("onnxruntime", ("onnxruntime/capi",)),
    ("encoding (models/text_encoding.py)", ("models/text_encoding.py",)),
    ("metrics (prometheus-client)", ("prometheus_client/",)),
    ("parsing and validation (pydantic, json.loads, orjson)", ("pydantic/", "pydantic_core", "json/decoder.py", "json/__init__.py:loads",
                                                                "loads (json", "parse_body", "model_validate_json")),
    ("serialising (json.dumps, response building)", ("json/encoder.py", "dumps (json", "top_k_results", "json_response", "json_bytes",
                                                      "starlette/responses.py", "encode_response")),
    ("batching (services/backends/batching.py, thread hop)", ("services/batching.py", "services/backends/batching.py", "anyio/",
                                                              "concurrent/futures", "threading.py", "queue.py")),
    ("inference glue (runner, in-process)", (*(f"services/{n}" for n in in_services(*BACKENDS)),
                                             *(f"services/backends/{n}" for n in in_services(*BACKENDS)), "numpy/")),
    ("our pipeline (services/http; before issue 31: middlewares and front)", (*(f"services/{n}" for n in in_services(*FRONT_AND_MIDDLEWARES)), "services/http/")),
    ("our routes (services/api, service.py)", (*(f"services/{n}" for n in in_services(*ROUTES)), "services/api/")),
    ("BentoML's middlewares (traffic metrics, tracing, context)", ("bentoml/_internal/server/http/", "opentelemetry/",
                                                                    "_bentoml_impl/server/app.py", "bentoml/_internal/context.py",
                                                                    "bentoml/_internal/utils/")),
    (ROUTING_LAYER, ("starlette/routing.py", "fastapi/routing.py", "fastapi/dependencies", "starlette/middleware/",
                     "starlette/_exception_handler.py", "starlette/applications.py", "fastapi/applications.py",
                     "starlette/requests.py", "starlette/datastructures.py", "fastapi/")),
    ("uvicorn (HTTP parsing and writing)", ("uvicorn/",)),
    ("gRPC (grpc.aio, protobuf)", ("grpc/", "google/protobuf/")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop/", "contextvars")),
]
OTHER = "other"
SAMPLE_RATE = 200
# Only the thread holding the GIL is sampled (--gil): that is the CPU the event loop and its
# Python cost, the part a leaner front can cut. py-spy's idle detection does not work in this
# machine's sandbox (threads waiting on a queue were sampled as busy), and the GIL is released
# while a thread waits (epoll, a queue) and while onnxruntime runs, so --gil leaves out idle
# time and the model's own time; onnxruntime's time per request is read from the service's
# x-inference-time header instead. --nonblocking: the worker is not paused for each sample.
SPY_OPTIONS = ("--gil", "--nonblocking")


ROUTING = ROUTING_LAYER


def layer_of(stack: list[str]) -> str:
    """The layer of a sample: its innermost frame that a rule matches; but a sample inside
    FastAPI's hand-over of a sync dependency (bentoml.get_current_service) to a thread is
    routing, whatever the hand-over calls (anyio, threading)."""
    if any("run_in_threadpool" in frame for frame in stack):
        return ROUTING
    for frame in reversed(stack):
        for layer, needles in LAYERS:
            if any(needle in frame for needle in needles):
                return layer
    return OTHER


def read_raw_stacks(path: Path) -> collections.Counter:
    """py-spy's raw format: one line per distinct stack, "frame;frame;...;frame COUNT",
    outermost first (its first frame is the thread)."""
    stacks: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def workers_of(root: psutil.Process, service_name: str) -> list[psutil.Process]:
    """The worker processes of one BentoML service: textserve (HTTP) or model_runner."""
    return [p for p in root.children(recursive=True)
            if "_bentoml_impl.worker.service" in (command := " ".join(p.cmdline())) and f"--service-name {service_name} " in command]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="kim-cnn-trec6")
    parser.add_argument("--path", default="/classify")
    parser.add_argument("--protocol", default="http", choices=["http", "grpc"],
                        help="http: wrk on --path; grpc: h2load, OIP v2 ModelInfer with one text per call")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warm-up", type=float, default=5.0)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service, repeatable")
    parser.add_argument("--process", default="textserve", choices=["textserve", "model_runner"],
                        help="which service's worker to sample: an HTTP worker, or the shared runner (TEXTSERVE_INFERENCE=runner)")
    parser.add_argument("--label", default="", help="a name for this profile in the report (e.g. before, after)")
    parser.add_argument("--out", type=Path, default=REPOSITORY_ROOT / "loadtests" / "results" / "profile")
    parser.add_argument("--reclassify", action="store_true",
                        help="no run: charge the samples of --out's stacks.txt to the layers again (after a change to LAYERS)")
    args = parser.parse_args(argv)
    if args.reclassify:
        return reclassify(args.out)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")
    args.out.mkdir(parents=True, exist_ok=True)

    questions = sample_questions()
    bodies = [request_body(args.path, args.model, [questions[(i + j) % len(questions)] for j in range(args.texts_per_request)])
              for i in range(len(questions))]
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "TEXTSERVE_MODELS": args.model, "BENTOML_DO_NOT_TRACK": "True",
           "TEXTSERVE_GRPC_HOST": "127.0.0.1", "TEXTSERVE_GRPC_PORT": str(grpc_port),
           **dict(item.split("=", 1) for item in args.env)}
    log = open(args.out / "serve.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("bentoml")), "serve", "services.service:TextService",
                               "--host", "127.0.0.1", "--port", str(port)],
                              cwd=REPOSITORY_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    grpc_call = args.out / "grpc-call.bin"
    grpc_call.write_bytes(grpc_frame(args.model, bench_grpc.TEXT))

    def load(seconds: float) -> LoadResult:
        if args.protocol == "http":
            return run_wrk(url, args.path, bodies, connections=args.connections, seconds=seconds)
        return grpc_load(url, f"127.0.0.1:{grpc_port}", grpc_call, args.connections, seconds, args.out / "h2load.log")

    try:
        import requests

        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not start; see {args.out / 'serve.log'}")
            time.sleep(0.5)
        root = psutil.Process(server.pid)
        load(args.warm_up)
        workers = workers_of(root, args.process)
        worker = workers[0]
        raw = args.out / "stacks.txt"
        spy = subprocess.Popen([py_spy, "record", "--pid", str(worker.pid), "--format", "raw", "--rate", str(SAMPLE_RATE),
                                "--duration", str(int(args.seconds)), "--output", str(raw), *SPY_OPTIONS],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu_before = tree_cpu_seconds(root)
        switches_before = writes_and_switches(root)
        batches_before = batch_texts(url)
        worker_before = sum(worker.cpu_times()[:2])
        workers_before = sum(sum(w.cpu_times()[:2]) for w in workers)
        result_holder: dict = {}
        loading = threading.Thread(target=lambda: result_holder.update(result=load(args.seconds)))
        loading.start()
        loading.join()
        server_cpu = tree_cpu_seconds(root) - cpu_before
        switches_after = writes_and_switches(root)
        batches_after = batch_texts(url)
        worker_cpu = sum(worker.cpu_times()[:2]) - worker_before
        workers_cpu = sum(sum(w.cpu_times()[:2]) for w in workers) - workers_before
        spy.wait(timeout=60)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
    result = result_holder["result"]
    stacks = read_raw_stacks(raw)
    by_layer: collections.Counter = collections.Counter()
    for stack, count in stacks.items():
        by_layer[layer_of(stack.split(";"))] += count
    samples = sum(by_layer.values())
    cpu_per_request_us = server_cpu / max(1, result.ok) * 1e6
    worker_requests = result.ok * worker_cpu / max(1e-9, workers_cpu)
    rows = [{"layer": layer, "share": count / samples, "us_per_request": count / SAMPLE_RATE / max(1.0, worker_requests) * 1e6}
            for layer, count in by_layer.most_common()]
    report = {"label": args.label, "model": args.model, "protocol": args.protocol,
              "path": args.path if args.protocol == "http" else bench_grpc.CALL_PATH, "connections": args.connections,
              "texts_per_request": args.texts_per_request, "seconds": result.seconds, "requests_per_s": result.ok_per_s,
              "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "non_2xx": result.requests - result.ok,
              "server_cpu_share": server_cpu / result.seconds / os.cpu_count(), "profiled_worker_cpu_s": worker_cpu,
              "server_cpu_us_per_request": cpu_per_request_us,
              "writes_per_request": (switches_after[0] - switches_before[0]) / max(1, result.ok),
              "context_switches_per_request": (switches_after[1] - switches_before[1]) / max(1, result.ok),
              "texts_per_batch": (batches_after[0] - batches_before[0]) / max(1, batches_after[1] - batches_before[1]), "samples": samples, "env": args.env, "layers": rows,
              "command": " ".join(["python -m loadtests.profile_service", *(argv if argv is not None else sys.argv[1:])])}
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"`{report['command']}`: {result.ok_per_s:,.0f} requests/s at {args.connections} connections, "
             f"p50 {result.p50_ms:.2f} ms, {report['non_2xx']} non-2xx; server CPU {report['server_cpu_share']:.0%} of the machine, "
             f"{cpu_per_request_us:.0f} µs of CPU per request (all processes, onnxruntime included), "
             f"{report['writes_per_request']:.2f} write system calls and {report['context_switches_per_request']:.2f} context switches "
             f"per request (all processes), {report['texts_per_batch']:.1f} texts per batch; server-side means: "
             f"queue {result.server_queue_ms or 0:.2f} ms, inference {result.server_inference_ms or 0:.2f} ms (a batch's), "
             f"total {result.server_total_ms or 0:.2f} ms; {samples:,} GIL samples of one of {len(workers)} {args.process} workers.", "",
             "| layer (GIL held) | share of the samples | µs per request |", "|---|---|---|"]
    lines += [f"| {row['layer']} | {row['share']:.1%} | {row['us_per_request']:.0f} |" for row in rows]
    (args.out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def writes_and_switches(root: psutil.Process) -> tuple[int, int]:
    """The server's write system calls and context switches so far, every process summed."""
    writes = switches = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            writes += process.io_counters().write_count
            counts = process.num_ctx_switches()
            switches += counts.voluntary + counts.involuntary
        except psutil.Error:  # a process that ended meanwhile
            continue
    return writes, switches


def batch_texts(url: str) -> tuple[float, float]:
    """textserve_batch_texts' sum and count so far (every process): texts and batches run."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"textserve_batch_texts_sum": 0.0, "textserve_batch_texts_count": 0.0}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals["textserve_batch_texts_sum"], totals["textserve_batch_texts_count"]


def request_body(path: str, model: str, texts: list[str]) -> str:
    """The JSON body of `path`: OIP v2's inference request under /v2/, else /classify's."""
    if path.startswith("/v2/"):
        return json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]})
    return json.dumps({"model": model, "texts": texts})


def grpc_load(url: str, grpc_address: str, call: Path, clients: int, seconds: float, log_path: Path) -> LoadResult:
    """h2load's ModelInfer calls as a LoadResult; `ok` is the server's own count of calls that
    answered status 200 (h2load sees only the HTTP status, not gRPC's)."""
    before = bench_grpc.grpc_calls_by_status(url)
    calls = bench_grpc.run_h2load(grpc_address, call, clients, seconds, log_path)
    answered = wait_for_counts(url, before, calls["calls"])
    ok = int(answered.get("200", 0))
    return LoadResult(connections=clients, seconds=seconds, requests=int(sum(answered.values())), ok=ok, refused=0,
                      other_statuses={status: int(n) for status, n in answered.items() if status != "200"}, socket_errors={},
                      p50_ms=calls["p50_ms"], p90_ms=float("nan"), p99_ms=calls["p99_ms"], max_ms=float("nan"), loadgen_cpu_s=0.0)


def wait_for_counts(url: str, before: dict[str, float], calls: int, timeout_s: float = 10.0) -> dict[str, float]:
    """The server's ModelInfer counts since `before`, once they reach the calls h2load finished
    (the last ones are counted as they end)."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = bench_grpc.grpc_calls_by_status(url)
        answered = {status: after.get(status, 0) - before.get(status, 0) for status in after}
        if sum(answered.values()) >= calls or time.monotonic() > deadline:
            return answered
        time.sleep(0.1)


def reclassify(folder: Path) -> None:
    """profile.json and profile.md of an earlier run, with its samples charged by today's LAYERS."""
    report = json.loads((folder / "profile.json").read_text())
    us_per_sample = sum(row["us_per_request"] for row in report["layers"]) / report["samples"]
    by_layer: collections.Counter = collections.Counter()
    for stack, count in read_raw_stacks(folder / "stacks.txt").items():
        by_layer[layer_of(stack.split(";"))] += count
    report["layers"] = [{"layer": layer, "share": count / report["samples"], "us_per_request": count * us_per_sample}
                        for layer, count in by_layer.most_common()]
    (folder / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = (folder / "profile.md").read_text().splitlines()[:4]
    lines += [f"| {row['layer']} | {row['share']:.1%} | {row['us_per_request']:.0f} |" for row in report["layers"]]
    (folder / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
