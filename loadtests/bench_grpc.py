"""OIP v2 over gRPC beside HTTP, on one server: ModelInfer (gRPC) and POST /v2/models/{name}/infer
(HTTP, JSON) with one text per call, at 1 and 64 concurrent clients, two rounds. `make bench`
runs it after the side-by-side run (loadtests/bench.py).

    python -m loadtests.bench_grpc [--seconds 10] [--rounds 2] [--model kim-cnn-trec6] [--clients 1,64]

The load generators are C programs, so that the client's CPU stays small beside the server's on
this 2-core machine:
- gRPC: h2load (nghttp2's HTTP/2 benchmark, Debian's nghttp2-client). A gRPC call is an HTTP/2
  POST to /inference.GRPCInferenceService/ModelInfer with `content-type: application/grpc`
  and a body that is one length-prefixed ModelInferRequest (the text as raw_input_contents,
  as tritonclient.grpc sends it); each of N clients has one connection with one call in
  flight at a time (`-c N -m 1`). h2load reads only the HTTP status, not gRPC's status in
  the trailers, so the server's own count of answered calls by status
  (textserve_requests_total) says how many succeeded (the calls h2load resets when its time is
  up count as 499, cancelled, not as errors), and a tritonclient.grpc probe compares
  an answer with onnxruntime in process before the load.
- HTTP: wrk with the same text (loadtests/wrk.py), the OIP v2 JSON body.

Latency percentiles come from h2load's per-request log (--log-file) and from wrk's own.
Writes loadtests/results/bench-grpc.md and .json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from prometheus_client.parser import text_string_to_metric_families

from loadtests.bench import REPOSITORY_ROOT, ZOO, Server, free_port, machine, markdown_table, running, text_table, wait_until_idle
from loadtests.wrk import run_wrk

TEXT = "How far is it from Denver to Aspen ?"
CALL_PATH = "/inference.GRPCInferenceService/ModelInfer"
RESULTS = REPOSITORY_ROOT / "loadtests" / "results"


class H2loadMissing(RuntimeError):
    pass


def grpc_frame(model: str, text: str) -> bytes:
    """One gRPC message: a 0 (not compressed) byte, the length (4 bytes, big-endian), a
    ModelInferRequest with the text as a BYTES tensor [1] in raw_input_contents."""
    from tritonclient.grpc import service_pb2

    encoded = text.encode()
    request = service_pb2.ModelInferRequest(
        model_name=model,
        inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])],
        raw_input_contents=[struct.pack("<I", len(encoded)) + encoded])
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def grpc_calls_by_status(url: str) -> dict[str, float]:
    """textserve_requests_total for ModelInfer, by status, summed over the workers."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "textserve_requests_total" and sample.labels.get("endpoint") == CALL_PATH:
                counts[sample.labels["status"]] = counts.get(sample.labels["status"], 0) + sample.value
    return counts


def run_h2load(address: str, body_path: Path, clients: int, seconds: float, log_path: Path) -> dict:
    """h2load at `clients` connections, one call in flight each, for `seconds`: calls per second
    and latency percentiles from its per-request log."""
    h2load = shutil.which("h2load")
    if h2load is None:
        raise H2loadMissing("h2load is not installed: `apt-get install nghttp2-client` (make bench does it)")
    command = [h2load, f"http://{address}{CALL_PATH}", "-c", str(clients), "-m", "1", "-t", "1", "-D", f"{round(seconds * 1000)}ms",
               "--warm-up-time", "1", "-d", str(body_path), "-H", "content-type: application/grpc", "-H", "te: trailers",
               "--log-file", str(log_path)]
    started = time.monotonic()
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    elapsed = time.monotonic() - started
    if output.returncode != 0:
        raise RuntimeError(f"h2load failed ({output.returncode}): {output.stderr[-500:]}")
    finished = re.search(r"finished in [^,]+, ([\d.]+) req/s", output.stdout)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", output.stdout)
    if finished is None or done is None:
        raise RuntimeError(f"h2load's summary was not found in: {output.stdout[-800:]}")
    rows = [line.split("\t") for line in log_path.read_text().splitlines() if line.strip()]  # the measured calls
    latencies_ms = np.array([int(row[2]) / 1000 for row in rows], dtype=np.float64)
    return {"calls": int(done.group(1)), "http_200": int(done.group(2)), "logged": len(rows), "per_s": float(finished.group(1)),
            "p50_ms": float(np.percentile(latencies_ms, 50)) if len(rows) else float("nan"),
            "p99_ms": float(np.percentile(latencies_ms, 99)) if len(rows) else float("nan"), "wall_s": elapsed}


def probe(grpc_address: str, model: str) -> float:
    """The largest difference between a tritonclient.grpc answer and onnxruntime in process."""
    import tritonclient.grpc as triton_grpc

    from services.backends.inference import TextClassifier, read_bundle

    client = triton_grpc.InferenceServerClient(grpc_address)
    tensor = triton_grpc.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([TEXT.encode()], dtype=object))
    served = client.infer(model, [tensor]).as_numpy("probabilities")
    expected = TextClassifier(read_bundle(ZOO / model)).probabilities([TEXT])
    return float(np.abs(served - expected).max())


def measure(model: str, clients: list[int], seconds: float, rounds: int, log_dir: Path) -> list[dict]:
    grpc_port = free_port()
    server = Server("service", "the service as it ships, gRPC beside HTTP",
                    [str(Path(sys.executable).with_name("bentoml")), "serve", "services.service:TextService",
                     "--host", "127.0.0.1", "--port", "{port}"],
                    {"TEXTSERVE_MODELS": model, "BENTOML_DO_NOT_TRACK": "True", "TEXTSERVE_GRPC_HOST": "127.0.0.1",
                     "TEXTSERVE_GRPC_PORT": str(grpc_port)}, ("/v2/health/ready",))
    port = free_port()
    url, grpc_address = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    http_body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]})
    results = []
    with tempfile.TemporaryDirectory() as scratch, running(server, port, log_dir, "grpc-bench") as root:
        body_path = Path(scratch) / "call.bin"
        body_path.write_bytes(grpc_frame(model, TEXT))
        difference = probe(grpc_address, model)
        print(f"  probe: tritonclient.grpc vs onnxruntime in process, max |difference| {difference:.1e}", flush=True)
        if difference > 1e-5:
            raise SystemExit(f"the gRPC answer differs from onnxruntime by {difference}")
        run_h2load(grpc_address, body_path, max(clients), 3, Path(scratch) / "warm.log")  # warm-up, not counted
        run_wrk(url, f"/v2/models/{model}/infer", [http_body], connections=max(clients), seconds=3)
        for round_number in range(1, rounds + 1):
            for count in clients:
                wait_until_idle(root)
                before = grpc_calls_by_status(url)
                grpc = run_h2load(grpc_address, body_path, count, seconds, Path(scratch) / f"r{round_number}-{count}.log")
                time.sleep(0.5)  # the last calls' metrics
                after = grpc_calls_by_status(url)
                answered = {status: after.get(status, 0) - before.get(status, 0) for status in after}
                grpc["grpc_ok"] = answered.get("200", 0)
                # h2load resets the calls still in flight when its time is up: counted 499 (cancelled), at most one per client
                grpc["grpc_cancelled"] = answered.get("499", 0)
                grpc["grpc_errors"] = sum(value for status, value in answered.items() if status not in ("200", "499"))
                wait_until_idle(root)
                http = run_wrk(url, f"/v2/models/{model}/infer", [http_body], connections=count, seconds=seconds)
                for protocol, level in (("gRPC", grpc), ("HTTP", {"per_s": http.ok_per_s, "p50_ms": http.p50_ms, "p99_ms": http.p99_ms,
                                                                 "errors": http.requests - http.ok + sum(http.socket_errors.values())})):
                    results.append({"round": round_number, "protocol": protocol, "clients": count, **level})
                print(f"  round {round_number} @{count}: gRPC {grpc['per_s']:.0f} calls/s (p50 {grpc['p50_ms']:.2f} ms, "
                      f"p99 {grpc['p99_ms']:.2f} ms, server-counted errors {grpc['grpc_errors']:.0f}); HTTP {http.ok_per_s:.0f} req/s "
                      f"(p50 {http.p50_ms:.2f} ms, p99 {http.p99_ms:.2f} ms)", flush=True)
    return results


def report(results: list[dict], model: str, seconds: float) -> tuple[list[str], list[list[str]]]:
    headers = ["clients", "protocol", "calls/s (round 1 / 2)", "p50 ms", "p99 ms", "gRPC / HTTP calls/s"]
    rows = []
    for count in sorted({r["clients"] for r in results}):
        by = {(r["protocol"], r["round"]): r for r in results if r["clients"] == count}
        rounds = sorted({r["round"] for r in results})
        for protocol in ("gRPC", "HTTP"):
            cells = [by[(protocol, n)] for n in rounds]
            ratio = " / ".join(f"{by[('gRPC', n)]['per_s'] / by[('HTTP', n)]['per_s']:.2f}" for n in rounds) if protocol == "gRPC" else ""
            rows.append([str(count), protocol, " / ".join(f"{c['per_s']:,.0f}" for c in cells),
                         " / ".join(f"{c['p50_ms']:.2f}" for c in cells), " / ".join(f"{c['p99_ms']:.2f}" for c in cells), ratio])
    return headers, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="kim-cnn-trec6")
    parser.add_argument("--clients", default="1,64", help="comma-separated concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    clients = sorted({int(c) for c in args.clients.split(",")})
    print(f"gRPC beside HTTP: {args.model}, 1 text per call, clients {clients}, {args.seconds:g} s per level, {args.rounds} rounds", flush=True)
    results = measure(args.model, clients, args.seconds, args.rounds, args.out)
    headers, rows = report(results, args.model, args.seconds)
    print("\n".join(text_table(headers, rows, {1})))
    command = "python -m loadtests.bench_grpc " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = [f"# OIP v2 over gRPC beside HTTP ({args.model}, 1 text per call)", "",
                f"`{command.strip()}` on {machine()}, {time.strftime('%Y-%m-%d')}; gRPC by h2load, HTTP (JSON) by wrk.", "",
                *markdown_table(headers, rows)]
    (args.out / "bench-grpc.md").write_text("\n".join(markdown) + "\n")
    (args.out / "bench-grpc.json").write_text(json.dumps({"model": args.model, "results": results, "machine": machine()}, indent=1))
    errors = sum(r.get("grpc_errors", 0) + r.get("errors", 0) for r in results)
    if errors:
        raise SystemExit(f"{errors:.0f} calls were not answered 200")


if __name__ == "__main__":
    main()
