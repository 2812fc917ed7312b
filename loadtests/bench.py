"""`make bench`: one run, side by side, for a classifier and the language model:

    in process   onnxruntime session.run at batch 1 and at its best batch (the floor), the same
                 with the text encoding (what a server must do too), and torch eager on the
                 same weights
    over HTTP    the service (`bentoml serve`, adaptive batching) and a hand-rolled FastAPI +
                 uvicorn + onnxruntime service without batching (loadtests/handrolled_service.py),
                 each at 1/8/32/64/128 concurrent clients from wrk (closed loop), after a warm-up
                 that is not counted (BentoML's batcher fits its cost model on the first batches)

    python -m loadtests.bench [--classifier kim-cnn-trec6] [--lm char-lm-small-ptb]
                              [--clients 1,8,32,64,128] [--seconds 10] [--out loadtests/results]

Prints a table with the ratios the performance targets name, and writes bench.json and
bench.png (throughput, p50 and p99 against clients) under --out. Client and server share this
machine: wrk's own CPU time and the servers' are reported for every load level.
One request carries `--texts-per-request` texts (default 1, the interactive case).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import requests

from loadtests.wrk import run_wrk
from services.config import REPOSITORY_ROOT
from services.inference import TextClassifier, read_bundle
from services.language_model import CharLanguageModel

ZOO = REPOSITORY_ROOT / "models" / "zoo"
SAMPLE_QUESTIONS = REPOSITORY_ROOT / "training" / "sample_data" / "trec.txt"
NEWS_SENTENCES = [  # PTB-style text for the language model: lower case, numbers as N
    "the company said it would buy the shares",
    "stock prices fell sharply in early trading",
    "the federal reserve is expected to cut interest rates next month",
    "analysts said the results were better than expected",
    "the dollar rose against the yen in new york",
    "sales increased N N to $ N million in the third quarter",
    "the bank will pay N cents a share",
    "mr. smith was named chief executive officer",
]
BATCH_SIZES = (1, 8, 16, 32, 64, 128)
READY_TIMEOUT_S = 180


# --------------------------------------------------------------------------- in process

def median_seconds(call: Callable[[int], object], min_calls: int = 20, min_seconds: float = 1.0) -> float:
    """Median wall time of call(i) for i = 0, 1, ...; at least `min_calls` calls and `min_seconds`."""
    for i in range(3):  # warm-up: first runs allocate
        call(i)
    times: list[float] = []
    started = time.perf_counter()
    i = 0
    while len(times) < min_calls or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


def batch_profile(run_batch: Callable[[list[str]], object], texts: list[str]) -> dict:
    """ms per call at batch 1 (cycling through the texts) and texts/s at each batch size."""
    single_s = median_seconds(lambda i: run_batch([texts[i % len(texts)]]))
    throughput = {}
    for size in BATCH_SIZES:
        batch = [texts[j % len(texts)] for j in range(size)]
        throughput[size] = size / median_seconds(lambda i: run_batch(batch), min_calls=10)
    best = max(throughput, key=throughput.get)
    return {"batch1_ms": single_s * 1000, "texts_per_s": throughput, "best_batch": best, "best_texts_per_s": throughput[best]}


def classifier_in_process(name: str, texts: list[str]) -> dict:
    classifier = TextClassifier(read_bundle(ZOO / name))
    results = {"onnxruntime session.run": batch_profile_pre_encoded(classifier, texts),
               "onnxruntime + encoding": batch_profile(classifier.probabilities, texts)}
    results["torch eager"] = torch_classifier_profile(name, classifier, texts)
    return results


def batch_profile_pre_encoded(classifier: TextClassifier, texts: list[str]) -> dict:
    """Like batch_profile, but the inputs are encoded before the clock starts: the model alone."""
    def feeds_for(batch: list[str]) -> dict:
        token_ids, lengths = classifier.encoder.encode_batch(batch)
        feeds = {"token_ids": token_ids, "lengths": lengths}
        return {n: feeds[n] for n in classifier.input_names}

    singles = [feeds_for([text]) for text in texts]
    single_s = median_seconds(lambda i: classifier.session.run([classifier.output_name], singles[i % len(singles)]))
    throughput = {}
    for size in BATCH_SIZES:
        feeds = feeds_for([texts[j % len(texts)] for j in range(size)])
        throughput[size] = size / median_seconds(lambda i: classifier.session.run([classifier.output_name], feeds), min_calls=10)
    best = max(throughput, key=throughput.get)
    return {"batch1_ms": single_s * 1000, "texts_per_s": throughput, "best_batch": best, "best_texts_per_s": throughput[best]}


def torch_classifier_profile(name: str, classifier: TextClassifier, texts: list[str]) -> dict:
    """torch eager on the bundle's own weights (the exporter named ONNX initializers after the
    state dict), so no checkpoint is needed; a bundle whose names do not match is skipped."""
    import onnx
    import torch
    from onnx import numpy_helper

    from models.registry import build_model

    bundle = classifier.bundle
    model = build_model(bundle.architecture, bundle.config["model"]).eval()
    wanted = model.state_dict()
    weights = {}
    for initializer in onnx.load(str(bundle.path / "model.onnx")).graph.initializer:
        key = initializer.name.removeprefix("model.").removesuffix("_float16")
        if key in wanted:
            weights[key] = torch.from_numpy(numpy_helper.to_array(initializer).astype(np.float32))
    if set(weights) != set(wanted):
        return {"skipped": f"{name}: the ONNX initializers do not name every weight of the torch model"}
    model.load_state_dict(weights)

    def run(batch: list[str]):
        token_ids, lengths = classifier.encoder.encode_batch(batch)
        with torch.inference_mode():
            return model(torch.from_numpy(token_ids), torch.from_numpy(lengths))

    return batch_profile(run, texts)


def language_model_in_process(name: str, sentences: list[str]) -> dict:
    language_model = CharLanguageModel(read_bundle(ZOO / name))
    results = {"onnxruntime + encoding": batch_profile(language_model.score, sentences)}
    checkpoint_path = REPOSITORY_ROOT / "checkpoints" / f"{name}.pt"
    if not checkpoint_path.exists():
        results["torch eager"] = {"skipped": f"no checkpoint at {checkpoint_path.relative_to(REPOSITORY_ROOT)} "
                                             "(the LM's recurrent weights cannot be read back from its ONNX graph by name)"}
        return results
    import torch

    from models.text_encoding import EOS_TOKEN
    from training.train_lm import load_language_model

    model = load_language_model(torch.load(checkpoint_path, map_location="cpu", weights_only=True))

    def score(batch: list[str]):
        tokenized = [language_model.tokenize(text) + [EOS_TOKEN] for text in batch]
        longest = max(len(tokens) for tokens in tokenized)
        char_ids = np.zeros((len(batch), longest, language_model.chars.word_width), np.int64)
        for row, tokens in enumerate(tokenized):
            char_ids[row, : len(tokens)] = language_model.chars.encode_words([EOS_TOKEN, *tokens[:-1]])
        h, c = (torch.from_numpy(x) for x in language_model.initial_state(len(batch)))
        with torch.inference_mode():
            logits, _ = model(torch.from_numpy(char_ids), (h, c))
            return torch.log_softmax(logits, dim=-1)

    results["torch eager"] = batch_profile(score, sentences)
    return results


# --------------------------------------------------------------------------- over HTTP

@dataclass(frozen=True)
class Server:
    label: str
    description: str
    command: list[str]
    env: dict[str, str]
    ready_path: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(server: Server, port: int, log_dir: Path) -> Iterator[psutil.Process]:
    """Start `server` on `port`, wait until `ready_path` answers 200, stop it (and its children)
    after; its output goes to log_dir/LABEL.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{server.label}.log", "w")
    process = subprocess.Popen([part.format(port=port) for part in server.command], cwd=REPOSITORY_ROOT,
                               env={**os.environ, **server.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{server.label} exited with {process.returncode}; see {log.name}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}{server.ready_path}", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.label} not ready after {READY_TIMEOUT_S} s; see {log.name}")
            time.sleep(0.5)
        yield psutil.Process(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
        log.close()


def tree_cpu_seconds(root: psutil.Process) -> float:
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def wait_until_idle(root: psutil.Process, cpu_share: float = 0.1, timeout_s: float = 15.0) -> None:
    """Wait until the server has finished the previous level's queued work. The HTTP workers
    share one listening socket and a worker still busy when the next level's connections arrive
    accepts fewer of them, and a keep-alive connection stays where it landed for ~100 requests
    (services/keep_alive.py)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(root)
        time.sleep(0.5)
        if (tree_cpu_seconds(root) - before) / 0.5 / os.cpu_count() < cpu_share:
            return


def connections_per_worker(root: psutil.Process, port: int) -> list[int]:
    """Established client connections held by each process listening on `port`, most first.
    A keep-alive connection stays with the worker that accepted it until it is recycled."""
    counts = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            counts[process.pid] = sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in connections)
    if len(counts) > 1:
        counts.pop(root.pid, None)  # a supervisor (BentoML's arbiter) holds the socket only to hand it out
    return sorted(counts.values(), reverse=True)


def load_levels(url: str, path: str, bodies: list[str], clients: list[int], seconds: float, warm_up_s: float,
                root: psutil.Process, texts_per_request: int) -> list[dict]:
    run_wrk(url, path, bodies, connections=max(clients), seconds=warm_up_s)  # not counted
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    levels = []
    for connections in clients:
        wait_until_idle(root)
        cpu_before = tree_cpu_seconds(root)
        split: list[int] = []
        # Sampled once every connection is open (wrk opens them at its start).
        sampler = threading.Timer(min(1.0, seconds / 2), lambda: split.extend(connections_per_worker(root, port)))
        sampler.start()
        result = run_wrk(url, path, bodies, connections=connections, seconds=seconds)
        sampler.join()
        server_cpu = tree_cpu_seconds(root) - cpu_before
        levels.append({**result.as_dict(), "texts_per_s": result.ok_per_s * texts_per_request,
                       "server_cpu_share": server_cpu / result.seconds / os.cpu_count(),
                       "loadgen_cpu_share": result.loadgen_cpu_s / result.seconds / os.cpu_count(),
                       "connections_per_worker": split})
        print(f"    {connections:>4} clients: {levels[-1]['texts_per_s']:8.1f} texts/s, p50 {result.p50_ms:7.2f} ms, "
              f"p99 {result.p99_ms:7.2f} ms, refused {result.refused}, other {result.other_statuses}, "
              f"socket errors {sum(result.socket_errors.values())}, connections per worker {'/'.join(map(str, split))}",
              flush=True)
    return levels


def servers(models: list[str]) -> list[Server]:
    """The systems compared over HTTP: the service as it ships (one HTTP worker per core), with one
    HTTP worker (onnxruntime then gets every core: the lowest latency at few clients), with a
    separate runner process, and the hand-rolled baseline."""
    python = sys.executable
    bentoml = [str(Path(python).with_name("bentoml")), "serve", "services.service:TextService", "--host", "127.0.0.1", "--port", "{port}"]
    service_env = {"TEXTSERVE_MODELS": ",".join(models), "BENTOML_DO_NOT_TRACK": "True"}
    return [
        Server("service", "BentoML, inference in the HTTP worker (TEXTSERVE_INFERENCE=inline)",
               bentoml, {**service_env, "TEXTSERVE_INFERENCE": "inline"}, "/v2/health/ready"),
        Server("service-1worker", "the same with TEXTSERVE_HTTP_WORKERS=1",
               bentoml, {**service_env, "TEXTSERVE_INFERENCE": "inline", "TEXTSERVE_HTTP_WORKERS": "1"}, "/v2/health/ready"),
        Server("service-runner", "BentoML, a separate runner process (TEXTSERVE_INFERENCE=runner)",
               bentoml, {**service_env, "TEXTSERVE_INFERENCE": "runner"}, "/v2/health/ready"),
        Server("hand-rolled", "FastAPI + uvicorn + onnxruntime, no batching (loadtests/handrolled_service.py)",
               [python, "-m", "uvicorn", "loadtests.handrolled_service:app", "--host", "127.0.0.1", "--port", "{port}", "--no-access-log"],
               {"HANDROLLED_MODELS": ",".join(models)}, "/docs"),
    ]


# --------------------------------------------------------------------------- the run

@dataclass(frozen=True)
class Workload:
    kind: str  # "classifier" or "language model"
    model: str
    path: str  # the endpoint, the same on both servers
    texts: list[str]


def request_bodies(workload: Workload, texts_per_request: int) -> list[str]:
    texts = workload.texts
    return [json.dumps({"model": workload.model, "texts": [texts[(i + j) % len(texts)] for j in range(texts_per_request)]})
            for i in range(len(texts))]


def sample_questions(limit: int = 200) -> list[str]:
    """TREC questions from the committed sample (label, then the question, per line)."""
    lines = SAMPLE_QUESTIONS.read_text(encoding="latin-1").splitlines()
    return [line.split(" ", 1)[1] for line in lines if " " in line][:limit]


def ratios(in_process: dict, levels: dict[str, list[dict]], compare_at: int) -> dict:
    """The figures the targets name (docs/performance.md), from one run's numbers, for the
    service in its default mode."""
    floor = in_process.get("onnxruntime session.run") or in_process["onnxruntime + encoding"]
    if "service" not in levels:
        return {}
    service = {level["connections"]: level for level in levels["service"]}
    handrolled = {level["connections"]: level for level in levels.get("hand-rolled", [])}
    saturation = max(service.values(), key=lambda level: level["texts_per_s"])
    return {
        "service_saturation_texts_per_s": saturation["texts_per_s"],
        "raw_best_batch_texts_per_s": floor["best_texts_per_s"],
        "saturation_over_raw_best": saturation["texts_per_s"] / floor["best_texts_per_s"],
        "p50_one_client_minus_raw_batch1_ms": service[1]["p50_ms"] - floor["batch1_ms"] if 1 in service else None,
        "p50_one_client_minus_raw_batch1_ms_1worker": next(
            (level["p50_ms"] - floor["batch1_ms"] for level in levels.get("service-1worker", []) if level["connections"] == 1), None),
        "refusals_below_saturation": sum(level["refused"] for c, level in service.items() if c <= saturation["connections"]),
        f"service_over_handrolled_at_{compare_at}": (service[compare_at]["texts_per_s"] / handrolled[compare_at]["texts_per_s"]
                                                     if compare_at in service and compare_at in handrolled else None),
    }


def print_report(report: dict) -> None:
    print(f"\n{report['machine']}\n")
    for workload in report["workloads"]:
        print(f"## {workload['model']} ({workload['kind']}), {report['texts_per_request']} text(s) per request")
        print(f"{'in process':<28}{'batch-1 ms':>11}{'best batch':>11}{'texts/s there':>14}")
        for label, profile in workload["in_process"].items():
            if "skipped" in profile:
                print(f"{label:<28}  skipped: {profile['skipped']}")
            else:
                print(f"{label:<28}{profile['batch1_ms']:>11.3f}{profile['best_batch']:>11}{profile['best_texts_per_s']:>14.0f}")
        print(f"\n{'over HTTP':<16}{'clients':>8}{'texts/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'refused':>8}{'other':>7}"
              f"{'lost':>6}{'server CPU':>11}{'wrk CPU':>8}   server-side means, ms: queue / inference / total")
        for system, levels in workload["http"].items():
            for level in levels:
                print(f"{system:<16}{level['connections']:>8}{level['texts_per_s']:>9.0f}{level['p50_ms']:>8.2f}"
                      f"{level['p99_ms']:>8.2f}{level['refused']:>8}{sum(level['other_statuses'].values()):>7}"
                      f"{sum(level['socket_errors'].values()):>6}{level['server_cpu_share']:>10.0%}{level['loadgen_cpu_share']:>8.0%}"
                      + (f"   {level['server_queue_ms']:.2f} / {level['server_inference_ms']:.2f} / {level['server_total_ms']:.2f}"
                         if level.get("server_total_ms") is not None else ""))
        print()
        for name, value in workload["ratios"].items():
            print(f"  {name:<42} {value if value is None or isinstance(value, int) else round(value, 3)}")
        print()


def markdown_report(report: dict) -> str:
    """The same tables as print_report, as markdown (docs/performance.md quotes them)."""
    lines = [f"`{report['command']}` on {report['machine']}; {report['seconds_per_level']:g} s per level, "
             f"{report['texts_per_request']} text(s) per request.", ""]
    for workload in report["workloads"]:
        lines += [f"**{workload['model']}** ({workload['kind']}), in process:", "",
                  "| | batch-1 ms | best batch | texts/s there |", "|---|---|---|---|"]
        for label, profile in workload["in_process"].items():
            if "skipped" not in profile:
                lines.append(f"| {label} | {profile['batch1_ms']:.3f} | {profile['best_batch']} | {profile['best_texts_per_s']:,.0f} |")
        lines += ["", f"**{workload['model']}** over HTTP (wrk, closed loop):", "",
                  "| system | clients | texts/s | p50 ms | p99 ms | refused | other | lost | server CPU | wrk CPU | server queue / inference / total ms (means) | connections per worker |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for system, levels in workload["http"].items():
            for level in levels:
                server_side = (f"{level['server_queue_ms']:.2f} / {level['server_inference_ms']:.2f} / {level['server_total_ms']:.2f}"
                               if level.get("server_total_ms") is not None else "")
                lines.append(f"| {system} | {level['connections']} | {level['texts_per_s']:,.0f} | {level['p50_ms']:.2f} | "
                             f"{level['p99_ms']:.2f} | {level['refused']} | {sum(level['other_statuses'].values())} | "
                             f"{sum(level['socket_errors'].values())} | {level['server_cpu_share']:.0%} | "
                             f"{level['loadgen_cpu_share']:.0%} | {server_side} | "
                             f"{'/'.join(map(str, level.get('connections_per_worker', [])))} |")
        lines += ["", "| ratio | value |", "|---|---|"]
        for name, value in workload["ratios"].items():
            lines.append(f"| {name} | {value if value is None or isinstance(value, int) else round(value, 3)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["workloads"]
    figure, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 8), squeeze=False)
    for column, workload in enumerate(workloads):
        for system, levels in workload["http"].items():
            clients = [level["connections"] for level in levels]
            axes[0][column].plot(clients, [level["texts_per_s"] for level in levels], marker="o", label=system)
            axes[1][column].plot(clients, [level["p50_ms"] for level in levels], marker="o", label=f"{system} p50")
            axes[1][column].plot(clients, [level["p99_ms"] for level in levels], marker="x", linestyle="--", label=f"{system} p99")
        floor = workload["in_process"].get("onnxruntime session.run") or workload["in_process"]["onnxruntime + encoding"]
        axes[0][column].axhline(floor["best_texts_per_s"], color="grey", linestyle=":", label="onnxruntime in process, best batch")
        axes[0][column].set(title=f"{workload['model']}: throughput", xscale="log", xlabel="concurrent clients", ylabel="texts/s")
        axes[1][column].set(title=f"{workload['model']}: latency", xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms")
        for axis in axes[:, column]:
            axis.legend(fontsize=7)
            axis.grid(alpha=0.3)
    figure.suptitle(report["machine"], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def machine() -> str:
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores; onnxruntime {onnxruntime.__version__}; {platform.python_implementation()} {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", default="kim-cnn-trec6")
    parser.add_argument("--lm", default="char-lm-small-ptb", help="a language-model bundle, or '' for none")
    parser.add_argument("--clients", default="1,8,32,64,128", help="comma-separated concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="per load level")
    parser.add_argument("--warm-up", type=float, default=5.0, help="seconds of load at the highest level first, not counted")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--compare-at", type=int, default=64, help="clients at which the service is compared with the hand-rolled one")
    parser.add_argument("--systems", default="service,service-1worker,service-runner,hand-rolled", help="which servers to load, comma-separated")
    parser.add_argument("--out", type=Path, default=REPOSITORY_ROOT / "loadtests" / "results")
    args = parser.parse_args(argv)
    clients = sorted({int(c) for c in args.clients.split(",")} | {args.compare_at})
    args.out.mkdir(parents=True, exist_ok=True)

    workloads = [Workload("classifier", args.classifier, "/classify", sample_questions())] if args.classifier else []
    if args.lm:
        workloads.append(Workload("language model", args.lm, "/lm/score", NEWS_SENTENCES))
    report = {"machine": machine(), "texts_per_request": args.texts_per_request, "clients": clients,
              "seconds_per_level": args.seconds, "command": " ".join(["python -m loadtests.bench", *(argv or sys.argv[1:])]),
              "systems": {}, "workloads": []}
    for workload in workloads:
        print(f"in process: {workload.model}", flush=True)
        measure = classifier_in_process if workload.kind == "classifier" else language_model_in_process
        report["workloads"].append({"kind": workload.kind, "model": workload.model, "in_process": measure(workload.model, workload.texts),
                                    "http": {}})
    chosen = args.systems.split(",")
    for server in [s for s in servers([w.model for w in workloads]) if s.label in chosen]:
        port = free_port()
        print(f"{server.label} ({server.description}) on port {port}", flush=True)
        report["systems"][server.label] = server.description
        with running(server, port, args.out) as root:
            for workload, entry in zip(workloads, report["workloads"]):
                print(f"  {workload.model} {workload.path}", flush=True)
                entry["http"][server.label] = load_levels(
                    f"http://127.0.0.1:{port}", workload.path, request_bodies(workload, args.texts_per_request),
                    clients, args.seconds, args.warm_up, root, args.texts_per_request)
    for entry in report["workloads"]:
        entry["ratios"] = ratios(entry["in_process"], entry["http"], args.compare_at)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench.md").write_text(markdown_report(report))
    plot(report, args.out / "bench.png")
    print_report(report)
    print(f"wrote {args.out / 'bench.json'}, bench.md (the tables as markdown) and bench.png")


if __name__ == "__main__":
    main()
