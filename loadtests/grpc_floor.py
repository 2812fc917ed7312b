"""The floor of each protocol's server in Python, with no model and none of our code: what one
core answers per second over gRPC (grpc.aio, as the service serves it) and over HTTP/1.1
(uvicorn with uvloop and httptools, as BentoML's workers run it), for the same OIP v2 call.

    python -m loadtests.grpc_floor [--seconds 5] [--rounds 2] [--clients 32]

Each bare server answers a fixed reply (gRPC: ModelInfer parsed, a ModelInferResponse of one
FP32 [1, 6] tensor; HTTP: the body read, a JSON answer of the same size), pinned to core 0
(taskset); the load generator (h2load for gRPC, wrk for HTTP, as loadtests/bench_grpc.py drives
them) is pinned to core 1, so the server's figure is one core's. The server process's write
system calls and context switches per call come from /proc (psutil). Needs Linux, 2 cores or
more, taskset, h2load and wrk. It prints a table; docs/performance.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from loadtests.bench import free_port, markdown_table
from loadtests.bench_grpc import CALL_PATH, TEXT, grpc_frame

MODEL = "kim-cnn-trec6"
ANSWER = {"model_name": MODEL, "model_version": "1",
          "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 6], "data": [0.0] * 6}]}


def serve_grpc(port: int) -> None:
    import grpc
    import uvloop
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    class Fixed(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            return service_pb2.ModelInferResponse(
                model_name=request.model_name, model_version="1", id=request.id,
                outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32", shape=[1, 6])],
                raw_output_contents=[bytes(24)])

    async def main() -> None:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Fixed(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.install()
    asyncio.run(main())


def serve_http(port: int) -> None:
    import uvicorn

    body = json.dumps(ANSWER).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


def wait_for_port(port: int, server: subprocess.Popen, timeout_s: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the bare server exited ({server.returncode})")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"the bare server did not listen on {port} within {timeout_s:g} s")


def process_counts(process: psutil.Process) -> tuple[float, int, int]:
    """CPU seconds, write system calls and context switches of the server so far (its threads included)."""
    cpu = process.cpu_times()
    switches = process.num_ctx_switches()
    return cpu.user + cpu.system, process.io_counters().write_count, switches.voluntary + switches.involuntary


def load(protocol: str, port: int, clients: int, seconds: float, scratch: Path) -> int:
    """Calls answered 200 by the load generator on core 1."""
    if protocol == "gRPC":
        call = scratch / "call.bin"
        call.write_bytes(grpc_frame(MODEL, TEXT))
        output = subprocess.run(["taskset", "-c", "1", "h2load", f"http://127.0.0.1:{port}{CALL_PATH}", "-c", str(clients), "-m", "1",
                                 "-t", "1", "-D", f"{round(seconds * 1000)}ms", "-d", str(call),
                                 "-H", "content-type: application/grpc", "-H", "te: trailers"],
                                capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
        return int(re.search(r"status codes: (\d+) 2xx", output).group(1))
    script = scratch / "post.lua"
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]})
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\nwrk.headers["Content-Type"] = "application/json"\n')
    output = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "-s", str(script),
                             f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer"],
                            capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    answered = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return answered - (int(non_2xx.group(1)) if non_2xx else 0)


def measure(protocol: str, clients: int, seconds: float) -> dict:
    port = free_port()
    role = "grpc" if protocol == "gRPC" else "http"
    server = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "loadtests.grpc_floor", "--serve", role, str(port)])
    try:
        wait_for_port(port, server)
        process = psutil.Process(server.pid)
        with tempfile.TemporaryDirectory() as scratch:
            load(protocol, port, clients, 1.0, Path(scratch))  # warm-up, not counted
            before = process_counts(process)
            started = time.monotonic()
            answered = load(protocol, port, clients, seconds, Path(scratch))
            elapsed = time.monotonic() - started
            after = process_counts(process)
    finally:
        server.terminate()
        server.wait(timeout=30)
    cpu, writes, switches = (a - b for a, b in zip(after, before))
    return {"protocol": protocol, "calls_per_s": answered / elapsed, "cpu_us_per_call": cpu / answered * 1e6,
            "writes_per_call": writes / answered, "switches_per_call": switches / answered}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--serve", nargs=2, metavar=("grpc|http", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return (serve_grpc if args.serve[0] == "grpc" else serve_http)(int(args.serve[1]))
    missing = [tool for tool in ("taskset", "h2load", "wrk") if shutil.which(tool) is None]
    if missing or psutil.cpu_count() < 2:
        raise SystemExit(f"needs taskset, h2load and wrk and 2 cores (missing: {', '.join(missing) or 'a second core'})")
    results = [measure(protocol, args.clients, args.seconds) for _ in range(args.rounds) for protocol in ("gRPC", "HTTP")]
    headers = ["protocol", "calls/s on one core (each round)", "server CPU µs per call", "writes per call", "context switches per call"]
    rows = []
    for protocol in ("gRPC", "HTTP"):
        mine = [r for r in results if r["protocol"] == protocol]
        rows.append([protocol, " / ".join(f"{r['calls_per_s']:,.0f}" for r in mine), " / ".join(f"{r['cpu_us_per_call']:.0f}" for r in mine),
                     " / ".join(f"{r['writes_per_call']:.2f}" for r in mine), " / ".join(f"{r['switches_per_call']:.2f}" for r in mine)])
    print(f"python -m loadtests.grpc_floor --seconds {args.seconds:g} --rounds {args.rounds} --clients {args.clients}: "
          "bare servers, no model, server on core 0, load generator on core 1")
    print("\n".join(markdown_table(headers, rows)))


if __name__ == "__main__":
    main()
