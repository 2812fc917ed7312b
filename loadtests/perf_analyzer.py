"""Triton's perf_analyzer against the service, unmodified, over HTTP and gRPC, beside wrk.

    python -m loadtests.perf_analyzer [--concurrency 1,16] [--seconds 5] [--models ...]
    python -m loadtests.perf_analyzer --install        # only fetch the tool (make perf-analyzer-tool)

perf_analyzer is the load tool Triton users point at any OIP v2 server (model_analyzer and
genai-perf are built on it). It reads the model's metadata and configuration (Triton's model
configuration extension) to shape its requests and the server's statistics (the statistics
extension) around each measurement, so it only runs against a server that has both
(services/api/model_config.py, model_statistics.py).

The tool: the PyPI wheel `perf-analyzer` (2.60.0) holds one binary built for glibc 2.38. On an
older system (Debian 12 has 2.36) it runs under Debian 13's dynamic loader and libraries
(libc6, libstdc++6, libgcc-s1), unpacked with `dpkg -x` into .perf-analyzer/root and named on
the loader's command line: nothing is installed system-wide. `--install` fetches both (the
wheel from PyPI, the packages from deb.debian.org, each checked against the sha256 its index
gives) and is a build step, like make bench's virtualenvs; the measurement itself downloads
nothing.

What it measures: the service as `make serve` runs it, with kim-cnn-trec6 (texts), the
language model's scoring (char-lm-small-ptb) and digits-cnn (images, perf_analyzer's own random
FP32 data); for each, perf_analyzer at each concurrency over HTTP and over gRPC (one input per
request, real questions for the text models), and wrk at the same concurrency with the same
call over HTTP (OIP v2 JSON), so that the two tools' figures sit side by side. Prints a table
and writes loadtests/results/perf-analyzer.md and .json.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from loadtests.bench import REPOSITORY_ROOT, Server, free_port, markdown_table, running, text_table, wait_until_idle
from loadtests.wrk import run_wrk

TOOL = REPOSITORY_ROOT / ".perf-analyzer"
WHEEL = "perf-analyzer==2.60.0"
WHEEL_PLATFORM = "manylinux_2_38_x86_64"
GLIBC_NEEDED = (2, 38)
DEBIAN = "http://deb.debian.org/debian"
DEBIAN_SUITE = "trixie"  # Debian 13: glibc 2.41, libstdc++ from GCC 14
DEBIAN_PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")
RESULTS = REPOSITORY_ROOT / "loadtests" / "results"
MODELS = {"kim-cnn-trec6": "texts", "char-lm-small-ptb": "texts", "digits-cnn": "images"}
QUESTIONS = ["How far is it from Denver to Aspen ?", "Who wrote Hamlet ?", "What is the capital of France ?",
             "When did the Berlin Wall fall ?"]


class ToolMissing(RuntimeError):
    pass


# ------------------------------------------------------------------------------- the tool


def glibc_version() -> tuple[int, int]:
    name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def binary() -> Path:
    return TOOL / "bin" / "perf_analyzer"


def library_folder() -> Path:
    return TOOL / "root" / "usr" / "lib" / "x86_64-linux-gnu"


def command() -> list[str]:
    """How to start perf_analyzer here: the binary, under Debian 13's loader when this
    system's glibc is older than the binary's."""
    if not binary().exists():
        raise ToolMissing(f"perf_analyzer is not installed in {TOOL}: python -m loadtests.perf_analyzer --install "
                          "(make perf-analyzer-tool)")
    if glibc_version() >= GLIBC_NEEDED:
        return [str(binary())]
    loader = library_folder() / "ld-linux-x86-64.so.2"
    if not loader.exists():
        raise ToolMissing(f"this system's glibc is older than {GLIBC_NEEDED} and Debian's loader is not in {TOOL}: "
                          "python -m loadtests.perf_analyzer --install")
    return [str(loader), "--library-path", f"{library_folder()}:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu", str(binary())]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def debian_packages(names: tuple[str, ...], suite: str = DEBIAN_SUITE) -> dict[str, dict[str, str]]:
    """Each package's Version, Filename and SHA256 from the suite's package index."""
    index = lzma.decompress(fetch(f"{DEBIAN}/dists/{suite}/main/binary-amd64/Packages.xz")).decode()
    found = {}
    for stanza in index.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        if fields.get("Package") in names and fields.get("Architecture") == "amd64":
            found[fields["Package"]] = {key: fields[key] for key in ("Version", "Filename", "SHA256")}
    missing = set(names) - set(found)
    if missing:
        raise RuntimeError(f"Debian {suite}'s index has no {sorted(missing)}")
    return found


def fetch_debian_package(package: dict[str, str], folder: Path) -> Path:
    """Download one package of `debian_packages` into `folder`, refused unless its sha256 is the index's."""
    data = fetch(f"{DEBIAN}/{package['Filename']}")
    if hashlib.sha256(data).hexdigest() != package["SHA256"]:
        raise RuntimeError(f"{package['Filename']}: its sha256 is not the one Debian's index gives")
    deb = folder / Path(package["Filename"]).name
    deb.write_bytes(data)
    return deb


def install() -> dict:
    """Fetch the wheel's binary and, where glibc is too old, Debian 13's loader and libraries."""
    TOOL.mkdir(exist_ok=True)
    record: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "--platform", WHEEL_PLATFORM,
                        "--only-binary=:all:", "--dest", scratch], check=True)
        [wheel] = Path(scratch).glob("perf_analyzer-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            binary().parent.mkdir(exist_ok=True)
            binary().write_bytes(archive.read("perf_analyzer/bin/perf_analyzer"))
        binary().chmod(binary().stat().st_mode | stat.S_IEXEC)
        record["wheel"] = {"file": wheel.name, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
        if glibc_version() < GLIBC_NEEDED:
            shutil.rmtree(TOOL / "root", ignore_errors=True)
            for name, package in debian_packages(DEBIAN_PACKAGES).items():
                deb = fetch_debian_package(package, Path(scratch))
                subprocess.run(["dpkg", "-x", str(deb), str(TOOL / "root")], check=True)
                record[name] = package
    (TOOL / "installed.json").write_text(json.dumps(record, indent=2) + "\n")
    version = subprocess.run([*command(), "--version"], capture_output=True, text=True)
    print(f"perf_analyzer installed in {TOOL} ({(version.stdout or version.stderr).strip()[:80]})")
    return record


# ------------------------------------------------------------------------------- measuring


def input_data(folder: Path) -> Path:
    """perf_analyzer's --input-data for the text models: real questions, one per request, as
    the configuration shapes them ([1] per request row)."""
    path = folder / "texts.json"
    path.write_text(json.dumps({"data": [{"text": {"content": [question], "shape": [1]}} for question in QUESTIONS]}))
    return path


def run_perf_analyzer(model: str, address: str, protocol: str, concurrency: int, seconds: float, texts: Path | None,
                      folder: Path, stability_percent: int = 30) -> dict:
    """One perf_analyzer measurement: client throughput and latency percentiles, and the
    server's own split of a request's time from its statistics. perf_analyzer reports once three
    windows in a row agree within `stability_percent` (this machine's drift needs 30, not its 10)."""
    report = folder / f"{model}-{protocol}-{concurrency}.csv"
    arguments = [*command(), "-m", model, "-u", address, "-i", protocol, "--concurrency-range", str(concurrency),
                 "--measurement-interval", str(int(seconds * 1000)), "--stability-percentage", str(stability_percent), "--max-trials", "8",
                 "-f", str(report)]
    if texts is not None:
        arguments += ["--input-data", str(texts)]
    finished = subprocess.run(arguments, capture_output=True, text=True, timeout=seconds * 10 + 120)
    if finished.returncode != 0 or not report.exists():
        raise RuntimeError(f"perf_analyzer failed on {model} over {protocol} ({finished.returncode}): "
                           f"{(finished.stdout + finished.stderr)[-800:]}")
    with open(report) as handle:
        [row] = list(csv.DictReader(handle))
    return {"tool": "perf_analyzer", "model": model, "protocol": protocol, "concurrency": concurrency,
            "per_s": float(row["Inferences/Second"]), "p50_ms": int(row["p50 latency"]) / 1000,
            "p99_ms": int(row["p99 latency"]) / 1000, "server_queue_ms": int(row["Server Queue"]) / 1000,
            "server_compute_ms": int(row["Server Compute Infer"]) / 1000}


def wrk_body(model: str) -> str:
    """The same call as perf_analyzer's over HTTP: one question, or one blank 16 x 16 image."""
    if MODELS[model] == "images":
        return json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 16, 16], "data": [0.0] * 256}]})
    return json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [QUESTIONS[0]]}]})


def measure(models: list[str], concurrencies: list[int], seconds: float, log_dir: Path) -> list[dict]:
    grpc_port = free_port()
    server = Server("service", "the service as it ships (make serve), gRPC beside HTTP",
                    [str(Path(sys.executable).with_name("bentoml")), "serve", "services.service:TextService",
                     "--host", "127.0.0.1", "--port", "{port}"],
                    {"TEXTSERVE_MODELS": ",".join(models), "BENTOML_DO_NOT_TRACK": "True", "TEXTSERVE_GRPC_HOST": "127.0.0.1",
                     "TEXTSERVE_GRPC_PORT": str(grpc_port)}, ("/v2/health/ready",))
    port = free_port()
    results = []
    with tempfile.TemporaryDirectory() as scratch, running(server, port, log_dir, "perf-analyzer") as root:
        texts = input_data(Path(scratch))
        for model in models:
            model_texts = texts if MODELS[model] == "texts" else None
            for concurrency in concurrencies:
                for protocol, address in (("http", f"127.0.0.1:{port}"), ("grpc", f"127.0.0.1:{grpc_port}")):
                    wait_until_idle(root)
                    results.append(run_perf_analyzer(model, address, protocol, concurrency, seconds, model_texts, Path(scratch)))
                    print(f"  {model} {protocol} @{concurrency}: {results[-1]['per_s']:,.0f}/s, p50 {results[-1]['p50_ms']:.2f} ms",
                          flush=True)
                wait_until_idle(root)
                load = run_wrk(f"http://127.0.0.1:{port}", f"/v2/models/{model}/infer", [wrk_body(model)],
                               connections=concurrency, seconds=seconds)
                if load.ok != load.requests or load.requests == 0:
                    raise RuntimeError(f"wrk: {load.requests - load.ok} of {load.requests} requests to {model} failed")
                results.append({"tool": "wrk", "model": model, "protocol": "http", "concurrency": concurrency,
                                "per_s": load.ok_per_s, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms,
                                "server_queue_ms": load.server_queue_ms, "server_compute_ms": load.server_inference_ms})
                print(f"  {model} wrk @{concurrency}: {load.ok_per_s:,.0f}/s, p50 {load.p50_ms:.2f} ms", flush=True)
    return results


def report_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "concurrency", "tool, protocol", "requests/s", "p50 ms", "p99 ms", "server: queue / compute ms"]
    rows = []
    for result in results:
        server = (f"{result['server_queue_ms']:.2f} / {result['server_compute_ms']:.2f}"
                  if result["server_queue_ms"] is not None else "")
        rows.append([result["model"], str(result["concurrency"]), f"{result['tool']}, {result['protocol']}",
                     f"{result['per_s']:,.0f}", f"{result['p50_ms']:.2f}", f"{result['p99_ms']:.2f}", server])
    return headers, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", action="store_true", help="fetch perf_analyzer (and Debian 13's loader where needed), then stop")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--concurrency", default="1,16", help="comma-separated concurrencies")
    parser.add_argument("--seconds", type=float, default=5.0, help="perf_analyzer's measurement window and wrk's run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.install:
        install()
        return
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"--models: {sorted(unknown)} unknown; known: {', '.join(MODELS)}")
    try:
        command()
    except ToolMissing as missing:
        raise SystemExit(str(missing)) from None
    args.out.mkdir(parents=True, exist_ok=True)
    results = measure(models, [int(c) for c in args.concurrency.split(",")], args.seconds, args.out)
    headers, rows = report_rows(results)
    title = (f"`python -m loadtests.perf_analyzer --concurrency {args.concurrency} --seconds {args.seconds:g}`: "
             "perf_analyzer 2.60.0 (HTTP and gRPC) and wrk (HTTP, OIP v2 JSON), one input per request")
    print(title)
    print("\n".join(text_table(headers, rows, {0, 2})))
    (args.out / "perf-analyzer.md").write_text(title + "\n\n" + "\n".join(markdown_table(headers, rows)) + "\n")
    (args.out / "perf-analyzer.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
