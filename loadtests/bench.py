"""`make bench`: one run, side by side, for a classifier and the language model:

    in process   onnxruntime session.run at batch 1 and at its best batch, the same with the
                 text encoding (what a server must do too: the floor the ratios use), and torch
                 eager on the same weights
    over HTTP    the service (`bentoml serve`, adaptive batching) in its modes; a hand-rolled
                 FastAPI + uvicorn + onnxruntime service without batching
                 (loadtests/handrolled_service.py); and real peer servers with dynamic batching,
                 mosec, LitServe and PyTriton (NVIDIA's tritonserver), in loadtests/peers/, each
                 in its own virtualenv, each in two worker x onnxruntime-thread splits of the
                 machine's cores (the report picks each peer's better one and lists the other)

Every server does the same work per request: parse a JSON list of texts, run the project's own
encoder and onnxruntime CPU session (services/backends/inference.py,
services/backends/language_model.py), answer each text's label and probabilities (the language
model: tokens, log-probabilities, perplexity) as JSON. Each speaks its own API (the service and the hand-rolled one: POST /classify and
/lm/score {"model", "texts"}; mosec: /inference; LitServe: /predict; Triton: Open Inference
Protocol v2 JSON to /v2/models/NAME/infer), so each builds its own request bodies and path.

Before a server is timed it must pass a correctness probe: its answers for a few texts, sent
together and one per request, against onnxruntime in this process (same labels, probabilities
within 1e-5, perplexities within a relative 1e-5). A server that fails the probe, or does not
start, is reported as failed, not timed.

The load (wrk, closed loop, loadtests/wrk.py), after a warm-up per workload that is not counted:

    classify, 1 text per request       at 1 and 64 connections
    classify, 16 texts per request     at 64 connections
    lm/score, 1 sentence per request   at 1 and 64 connections

in --rounds rounds (default 2): each round measures in process, then runs every system once
(round 2 in the reverse order, so that a drift of the shared machine does not always favour the
same systems). Ratios to the service as shipped are computed per round.

    python -m loadtests.bench [--systems all|LABEL|PEER,...] [--seconds 10] [--rounds 2]
                              [--classifier kim-cnn-trec6] [--lm char-lm-small-ptb]
                              [--workloads 'classify/1@1,64;classify/16@64;lm/1@1,64'] [--out loadtests/results]

--systems takes labels (service, service-1worker, service-runner, hand-rolled, mosec-1w2t, ...)
or a peer's name (mosec, litserve, pytriton: all its configurations). The older
--clients/--texts-per-request still work: they replace the workloads with both models at that
many texts per request at those connection counts. Prints the tables; writes bench.json,
bench.md (the tables as markdown) and bench.png under --out, with one server log per system and
round. Client and server share this machine: wrk's own CPU time and the servers' are reported
for every load level.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

from loadtests.wrk import run_wrk
from services.config import REPOSITORY_ROOT
from services.backends.inference import TextClassifier, read_bundle
from services.backends.language_model import CharLanguageModel

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
DEFAULT_WORKLOADS = "classify/1@1,64;classify/16@64;lm/1@1,64"
PROBABILITY_TOLERANCE = 1e-5  # max |difference| to onnxruntime in process, per probability
PERPLEXITY_TOLERANCE = 1e-5  # relative: Triton answers FP32, the JSON servers float64
SERVICE = "service"  # the system the ratios are relative to: the service as it ships


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
        return classifier.feeds(*classifier.encoder.encode_batch(batch))  # each input in its declared type

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
    from training.jobs.language_model import load_language_model

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


def floor_profile(in_process: dict) -> dict:
    """The in-process figure a server is held against: onnxruntime with the text encoding, the
    work every server here must do per text too (issue 17's targets are stated against it);
    session.run alone is in the in-process table beside it."""
    return in_process["onnxruntime + encoding"]


# --------------------------------------------------------------------------- what each server speaks

CLASSIFIER, LANGUAGE_MODEL = "classifier", "language model"


class TextsJsonApi:
    """{"model", "texts"} in, {"model", "results": [...]} out, per text {"label", "probabilities":
    {label: p}} or {"perplexity", ...}: the service's API, which the hand-rolled baseline, mosec and
    LitServe peers answer too, each at its own paths."""

    def __init__(self, classify_path: str = "/classify", score_path: str = "/lm/score") -> None:
        self.paths = {CLASSIFIER: classify_path, LANGUAGE_MODEL: score_path}

    def path(self, kind: str, model: str) -> str:
        return self.paths[kind]

    def body(self, model: str, texts: Sequence[str]) -> str:
        return json.dumps({"model": model, "texts": list(texts)})

    def classifications(self, answer: dict, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """(label per text, probabilities (N, K) in the bundle's label order)."""
        results = answer["results"]
        return ([result["label"] for result in results],
                np.array([[result["probabilities"][label] for label in labels] for result in results], np.float64))

    def perplexities(self, answer: dict) -> list[float]:
        return [result["perplexity"] for result in answer["results"]]


class OpenInferenceJsonApi:
    """Triton's HTTP API (Open Inference Protocol v2, JSON): a BYTES input "texts" [N, 1]; the
    outputs of loadtests/peers/pytriton_server.py ("probabilities" FP32 [N, K] and "label" BYTES,
    or "perplexity" FP32 [N, 1])."""

    def path(self, kind: str, model: str) -> str:
        return f"/v2/models/{model}/infer"

    def body(self, model: str, texts: Sequence[str]) -> str:
        return json.dumps({"inputs": [{"name": "texts", "shape": [len(texts), 1], "datatype": "BYTES", "data": list(texts)}]})

    @staticmethod
    def _outputs(answer: dict) -> dict[str, np.ndarray]:
        return {output["name"]: np.array(output["data"]).reshape(output["shape"]) for output in answer["outputs"]}

    def classifications(self, answer: dict, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
        outputs = self._outputs(answer)
        return [str(label) for label in outputs["label"][:, 0]], outputs["probabilities"].astype(np.float64)

    def perplexities(self, answer: dict) -> list[float]:
        return [float(value) for value in self._outputs(answer)["perplexity"][:, 0]]


# --------------------------------------------------------------------------- the servers

@dataclass(frozen=True)
class Server:
    label: str
    description: str
    command: list[str]
    env: dict[str, str]
    ready_paths: tuple[str, ...]  # each must answer GET with 200 before the server counts as up
    api: TextsJsonApi | OpenInferenceJsonApi = field(default_factory=TextsJsonApi)
    peer: str | None = None  # mosec, litserve, pytriton: the report keeps each peer's best configuration
    configuration: str = ""  # e.g. "1 worker x 2 onnxruntime threads"
    needs: Path | None = None  # a file that must exist (a peer's virtualenv): else the system fails at once


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerDidNotStart(RuntimeError):
    """The server exited, or did not answer its ready paths in time, before it was used."""


class ServerNotInstalled(ServerDidNotStart):
    """A peer's virtualenv is missing: no point in trying again."""


@contextlib.contextmanager
def running(server: Server, port: int, log_dir: Path, log_name: str | None = None) -> Iterator[psutil.Process]:
    """Start `server` on `port`, wait until each of its ready paths answers 200, stop it (and its
    children) after; its output goes to log_dir/LOG_NAME.log (default: its label)."""
    if server.needs is not None and not server.needs.exists():
        raise ServerNotInstalled(f"{server.label}: {server.needs.relative_to(REPOSITORY_ROOT)} is missing (`make bench-peers` installs it)")
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"{log_name or server.label}.log", "w")
    process = subprocess.Popen([part.format(port=port) for part in server.command], cwd=REPOSITORY_ROOT,
                               env={**os.environ, **server.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = list(server.ready_paths)
        while waiting:
            if process.poll() is not None:
                raise ServerDidNotStart(f"{server.label} exited with {process.returncode}; see {log.name}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}{waiting[0]}", timeout=2).status_code == 200:
                    waiting.pop(0)
                    continue
            if time.monotonic() > deadline:
                raise ServerDidNotStart(f"{server.label} not ready after {READY_TIMEOUT_S} s ({waiting[0]}); see {log.name}")
            time.sleep(0.5)
        yield psutil.Process(process.pid)
    finally:
        stop_process_group(process)
        log.close()


def stop_process_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the server's own process first, so that it stops its children and cleans up
    after them (PyTriton removes tritonserver's shared-memory regions from /dev/shm only then; a
    SIGTERM to the whole group at once leaves them behind), then SIGTERM to whatever is left in
    its process group, then SIGKILL: the next system must find the cores idle."""
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for signal_number, wait_s in ((15, 5.0), (9, 5.0)):
        try:
            os.killpg(process.pid, signal_number)
        except ProcessLookupError:
            break  # the whole group is gone
        deadline = time.monotonic() + wait_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait_s)
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(process.pid, 0)  # raises ProcessLookupError once the group has no process left
                time.sleep(0.2)


def tree_cpu_seconds(root: psutil.Process) -> float:
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def idle_cpu_share(root: psutil.Process, seconds: float = 1.0) -> float:
    """The share of the machine's cores the server takes with no request in flight: zero for most,
    not for a server whose workers poll their queues (LitServe's take a sixth of a core each)."""
    before = tree_cpu_seconds(root)
    time.sleep(seconds)
    return (tree_cpu_seconds(root) - before) / seconds / os.cpu_count()


def wait_until_idle(root: psutil.Process, cpu_share: float = 0.1, timeout_s: float = 15.0) -> None:
    """Wait until the server's CPU share is under `cpu_share` (its idle share + 0.1 from
    measure_system), i.e. it has finished the previous level's queued work. The HTTP workers
    share one listening socket and a worker still busy when the next level's connections arrive
    accepts fewer of them, and a keep-alive connection stays where it landed for ~100 requests
    (services/http/pipeline.py)."""
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


def peer_python(peer: str) -> Path:
    return REPOSITORY_ROOT / f".venv-bench-{peer}" / "bin" / "python"


def core_splits() -> list[tuple[int, int]]:
    """(processes or Triton instances, onnxruntime intra-op threads each) tried for every peer:
    all the cores in one, or one thread each in as many as there are cores."""
    cores = os.cpu_count() or 1
    return [(1, cores)] if cores == 1 else [(1, cores), (cores, 1)]


def peer_servers(models: list[str]) -> list[Server]:
    """mosec, LitServe and PyTriton (loadtests/peers/), each in its virtualenv and in each split
    of the cores. Dynamic batching everywhere: up to 64 requests (Triton: 1,024 texts, 64 requests
    of 16) waiting at most 1 ms for the batch to fill."""
    env = {"PYTHONPATH": str(REPOSITORY_ROOT)}
    model_list = ",".join(models)
    systems = []
    for workers, threads in core_splits():
        tag = f"{workers}w{threads}t"
        thread_count = f"{threads} onnxruntime thread{'s' if threads > 1 else ''}"
        systems.append(Server(
            f"mosec-{tag}", "mosec 0.9 (Rust front end), dynamic batching of 64 requests, 1 ms (loadtests/peers/mosec_server.py)",
            [str(peer_python("mosec")), "-m", "loadtests.peers.mosec_server", "--models", model_list, "--workers", str(workers),
             "--threads", str(threads), "--address", "127.0.0.1", "--port", "{port}", "--log-level", "warning"],
            env, ("/",), TextsJsonApi("/inference", "/inference"), "mosec",
            f"{workers} worker process{'es' if workers > 1 else ''} x {thread_count}",
            peer_python("mosec")))
        systems.append(Server(
            f"litserve-{tag}", "LitServe 0.2 (FastAPI/uvicorn front end), batching of 64 requests, 1 ms (loadtests/peers/litserve_server.py)",
            [str(peer_python("litserve")), "-m", "loadtests.peers.litserve_server", "--models", model_list, "--workers", str(workers),
             "--threads", str(threads), "--port", "{port}"],
            env, ("/health",), TextsJsonApi("/predict", "/predict"), "litserve",
            f"workers_per_device {workers} x {thread_count}",
            peer_python("litserve")))
        systems.append(Server(
            f"pytriton-{tag}", "PyTriton 0.7 (tritonserver, OIP v2 JSON), dynamic batching of 1,024 texts, 1 ms (loadtests/peers/pytriton_server.py)",
            [str(peer_python("pytriton")), "-m", "loadtests.peers.pytriton_server", "--models", model_list, "--instances", str(workers),
             "--threads", str(threads), "--port", "{port}"],
            env, ("/v2/health/ready", *(f"/v2/models/{model}/ready" for model in models)), OpenInferenceJsonApi(), "pytriton",
            f"instance count {workers} x {thread_count}",
            peer_python("pytriton")))
    order = {"mosec": 0, "litserve": 1, "pytriton": 2}
    return sorted(systems, key=lambda server: order[server.peer])  # a peer's configurations together


def servers(models: list[str]) -> list[Server]:
    """The systems compared over HTTP: the service as it ships (one HTTP worker per core), with one
    HTTP worker (onnxruntime then gets every core: the lowest latency at few clients), with a
    separate runner process, the hand-rolled baseline, and the peers."""
    python = sys.executable
    beside = Path(python).with_name("bentoml")  # else on PATH: pip install --target puts it in TARGET/bin (deploy/gpu)
    bentoml = [str(beside) if beside.exists() else shutil.which("bentoml") or str(beside), "serve", "services.service:TextService", "--host", "127.0.0.1", "--port", "{port}"]
    service_env = {"TEXTSERVE_MODELS": ",".join(models), "BENTOML_DO_NOT_TRACK": "True"}
    return [
        Server(SERVICE, "BentoML, inference in the HTTP worker (TEXTSERVE_INFERENCE=inline)",
               bentoml, {**service_env, "TEXTSERVE_INFERENCE": "inline"}, ("/v2/health/ready",)),
        Server("service-1worker", "the same with TEXTSERVE_HTTP_WORKERS=1",
               bentoml, {**service_env, "TEXTSERVE_INFERENCE": "inline", "TEXTSERVE_HTTP_WORKERS": "1"}, ("/v2/health/ready",)),
        Server("service-runner", "BentoML, a separate runner process (TEXTSERVE_INFERENCE=runner)",
               bentoml, {**service_env, "TEXTSERVE_INFERENCE": "runner"}, ("/v2/health/ready",)),
        Server("hand-rolled", "FastAPI + uvicorn + onnxruntime, no batching (loadtests/handrolled_service.py)",
               [python, "-m", "uvicorn", "loadtests.handrolled_service:app", "--host", "127.0.0.1", "--port", "{port}", "--no-access-log"],
               {"HANDROLLED_MODELS": ",".join(models)}, ("/docs",)),
        *peer_servers(models),
    ]


def choose_systems(all_servers: list[Server], chosen: str) -> list[Server]:
    """--systems: 'all', or labels and peer names, comma-separated."""
    if chosen == "all":
        return all_servers
    names = [name.strip() for name in chosen.split(",") if name.strip()]
    known = {server.label for server in all_servers} | {server.peer for server in all_servers if server.peer}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; known: all, {', '.join(sorted(known))}")
    return [server for server in all_servers if server.label in names or server.peer in names]


# --------------------------------------------------------------------------- the workloads

@dataclass(frozen=True)
class Workload:
    kind: str  # CLASSIFIER or LANGUAGE_MODEL
    model: str
    texts: list[str]
    texts_per_request: int
    connections: tuple[int, ...]

    @property
    def name(self) -> str:
        endpoint = "classify" if self.kind == CLASSIFIER else "lm/score"
        return f"{endpoint} {self.texts_per_request}/req"

    def level_key(self, connections: int) -> str:
        return f"{self.name} @{connections}"

    def request_texts(self) -> list[list[str]]:
        """The texts of each request body, cycling through the sample: body i starts at text i."""
        texts = self.texts
        return [[texts[(i + j) % len(texts)] for j in range(self.texts_per_request)] for i in range(len(texts))]


def sample_questions(limit: int = 200) -> list[str]:
    """TREC questions from the committed sample (label, then the question, per line)."""
    lines = SAMPLE_QUESTIONS.read_text(encoding="latin-1").splitlines()
    return [line.split(" ", 1)[1] for line in lines if " " in line][:limit]


def parse_workloads(spec: str, classifier: str, language_model: str) -> list[Workload]:
    """'classify/1@1,64;classify/16@64;lm/1@1,64': KIND/TEXTS-PER-REQUEST@CONNECTIONS, ';'-separated.
    A kind whose model is '' (--classifier '' or --lm '') is left out."""
    workloads = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        try:
            kind_and_texts, connections = item.split("@")
            kind, texts_per_request = kind_and_texts.split("/")
            counts = tuple(sorted({int(c) for c in connections.split(",")}))
            per_request = int(texts_per_request)
        except ValueError:
            raise SystemExit(f"--workloads: {item!r} is not KIND/TEXTS@CONNECTIONS, e.g. classify/16@64") from None
        if kind == "classify" and classifier:
            workloads.append(Workload(CLASSIFIER, classifier, sample_questions(), per_request, counts))
        elif kind == "lm" and language_model:
            workloads.append(Workload(LANGUAGE_MODEL, language_model, NEWS_SENTENCES, per_request, counts))
        elif kind not in ("classify", "lm"):
            raise SystemExit(f"--workloads: unknown kind {kind!r} in {item!r}; expected classify or lm")
    return workloads


# --------------------------------------------------------------------------- the correctness probe

PROBE_QUESTIONS = ["How far is it from Denver to Aspen ?", "Who was the first president of the United States ?",
                   "What does NASA stand for ?", "xyzzy plugh frobnicate ?", "Why ?"]


@dataclass
class References:
    """What onnxruntime in this process answers for the probe texts, per model."""
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    classifications: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    perplexities: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def compute(cls, workloads: list[Workload]) -> "References":
        references = cls()
        for model in {w.model for w in workloads if w.kind == CLASSIFIER}:
            classifier = TextClassifier(read_bundle(ZOO / model))
            probabilities = classifier.probabilities(PROBE_QUESTIONS).astype(np.float64)
            references.labels[model] = classifier.labels
            references.classifications[model] = ([classifier.labels[i] for i in probabilities.argmax(axis=1)], probabilities)
        for model in {w.model for w in workloads if w.kind == LANGUAGE_MODEL}:
            language_model = CharLanguageModel(read_bundle(ZOO / model))
            references.perplexities[model] = np.array([text.perplexity for text in language_model.score(NEWS_SENTENCES[:4])])
        return references


def probe(server: Server, url: str, workloads: list[Workload], references: References) -> dict:
    """Ask the server about the probe texts, all in one request and one text per request, and
    compare with onnxruntime in process. {"passed": bool, "checks": [...], "error": ...}."""
    checks = []

    def ask(kind: str, model: str, texts: list[str]) -> dict:
        response = requests.post(url + server.api.path(kind, model), data=server.api.body(model, texts),
                                 headers={"Content-Type": "application/json"}, timeout=60)
        if response.status_code != 200:
            raise RuntimeError(f"{server.api.path(kind, model)} answered {response.status_code}: {response.text[:300]}")
        return response.json()

    try:
        for model in {w.model for w in workloads if w.kind == CLASSIFIER}:
            expected_labels, expected = references.classifications[model]
            together = [ask(CLASSIFIER, model, PROBE_QUESTIONS)]
            one_by_one = [ask(CLASSIFIER, model, [text]) for text in PROBE_QUESTIONS]
            for how, answers in (("together", together), ("one per request", one_by_one)):
                read = [server.api.classifications(answer, references.labels[model]) for answer in answers]
                labels = [label for answer_labels, _ in read for label in answer_labels]
                probabilities = np.concatenate([answer_probabilities for _, answer_probabilities in read])
                difference = float(np.abs(probabilities - expected).max()) if probabilities.shape == expected.shape else math.inf
                checks.append({"model": model, "how": how, "max_abs_difference": difference, "labels_equal": labels == expected_labels,
                               "passed": difference <= PROBABILITY_TOLERANCE and labels == expected_labels})
        for model in {w.model for w in workloads if w.kind == LANGUAGE_MODEL}:
            expected = references.perplexities[model]
            sentences = NEWS_SENTENCES[: len(expected)]
            together = [ask(LANGUAGE_MODEL, model, sentences)]
            one_by_one = [ask(LANGUAGE_MODEL, model, [sentence]) for sentence in sentences]
            for how, answers in (("together", together), ("one per request", one_by_one)):
                perplexities = np.array([p for answer in answers for p in server.api.perplexities(answer)])
                difference = (float(np.abs(perplexities / expected - 1).max()) if perplexities.shape == expected.shape else math.inf)
                checks.append({"model": model, "how": how, "max_relative_difference": difference,
                               "passed": difference <= PERPLEXITY_TOLERANCE})
    except (requests.RequestException, RuntimeError, KeyError, ValueError, TypeError) as error:
        return {"passed": False, "checks": checks, "error": f"{type(error).__name__}: {error}"}
    return {"passed": all(check["passed"] for check in checks), "checks": checks, "error": None}


def probe_summary(result: dict) -> str:
    if result.get("error"):
        return result["error"]
    parts = []
    for check in result["checks"]:
        if "max_abs_difference" in check:
            parts.append(f"{check['model']} {check['how']}: max |diff| {check['max_abs_difference']:.1e}"
                         + ("" if check["labels_equal"] else ", labels differ"))
        else:
            parts.append(f"{check['model']} {check['how']}: perplexity rel. diff {check['max_relative_difference']:.1e}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- load

BATCH_SERIES = ("textserve_batch_texts_sum", "textserve_batch_texts_count", "textserve_batch_padded_tokens_sum",
                "textserve_batch_padded_tokens_count", "textserve_batch_padding_ratio_sum")


def batch_series(url: str) -> dict[str, float] | None:
    """The service's own batch histograms' sums and counts (every model), or None for a server
    without them (the peers)."""
    try:
        text = requests.get(f"{url}/metrics", timeout=10).text
    except requests.RequestException:
        return None
    totals = dict.fromkeys(BATCH_SERIES, 0.0)
    with contextlib.suppress(ValueError):  # not Prometheus text: a peer's answer to an unknown path
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
    return totals if totals["textserve_batch_texts_count"] else None


def batches_run(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """What the batcher ran during a level: texts per batch, and per model run the padded
    tokens and the share of them that was padding (means)."""
    if before is None or after is None:
        return None
    change = {name: after[name] - before[name] for name in BATCH_SERIES}
    if not change["textserve_batch_texts_count"] or not change["textserve_batch_padded_tokens_count"]:
        return None
    return {"texts_per_batch": change["textserve_batch_texts_sum"] / change["textserve_batch_texts_count"],
            "padded_tokens_per_run": change["textserve_batch_padded_tokens_sum"] / change["textserve_batch_padded_tokens_count"],
            "padding_share": change["textserve_batch_padding_ratio_sum"] / change["textserve_batch_padded_tokens_count"]}


def load_levels(url: str, path: str, bodies: list[str], workload: Workload, seconds: float, warm_up_s: float,
                root: psutil.Process, idle_share: float = 0.0) -> list[dict]:
    """A warm-up at the workload's most connections (not counted), then each of its levels."""
    if warm_up_s > 0:
        run_wrk(url, path, bodies, connections=max(workload.connections), seconds=warm_up_s)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    levels = []
    for connections in workload.connections:
        wait_until_idle(root, cpu_share=idle_share + 0.1)
        batches_before = batch_series(url)
        cpu_before = tree_cpu_seconds(root)
        split: list[int] = []
        # Sampled once every connection is open (wrk opens them at its start).
        sampler = threading.Timer(min(1.0, seconds / 2), lambda: split.extend(connections_per_worker(root, port)))
        sampler.start()
        result = run_wrk(url, path, bodies, connections=connections, seconds=seconds)
        sampler.join()
        server_cpu = tree_cpu_seconds(root) - cpu_before
        batches = batches_run(batches_before, batch_series(url) if batches_before else None)
        levels.append({**result.as_dict(), "workload": workload.name, "level": workload.level_key(connections),
                       "kind": workload.kind, "model": workload.model, "texts_per_request": workload.texts_per_request,
                       "texts_per_s": result.ok_per_s * workload.texts_per_request,
                       "server_cpu_share": server_cpu / result.seconds / os.cpu_count(),
                       "loadgen_cpu_share": result.loadgen_cpu_s / result.seconds / os.cpu_count(),
                       "connections_per_worker": split, "batches": batches})
        print(f"    {workload.level_key(connections):<22} {levels[-1]['texts_per_s']:8.1f} texts/s, p50 {result.p50_ms:7.2f} ms, "
              f"p99 {result.p99_ms:7.2f} ms, refused {result.refused}, other {result.other_statuses}, "
              f"socket errors {sum(result.socket_errors.values())}, connections per worker {'/'.join(map(str, split))}"
              + (f", {batch_summary(batches)}" if batches else ""), flush=True)
    return levels


def batch_summary(batches: dict) -> str:
    return (f"{batches['texts_per_batch']:.1f} texts per batch, {batches['padded_tokens_per_run']:.0f} padded tokens "
            f"per model run, {batches['padding_share']:.0%} padding")


# PyTriton 0.7 sometimes fails to start a model of several instances: the second instance's stub
# finds the first one's handshake socket before it listens (ConnectionRefusedError in
# get_config_from_handshake_server, seen 2 times in 5 starts of 2 instances on this machine).
# A server that did not start is started afresh, up to this many times in all.
START_ATTEMPTS = 3


def measure_system(server: Server, workloads: list[Workload], references: References, seconds: float, warm_up_s: float,
                   log_dir: Path, log_name: str) -> dict:
    """Start the server (again if it did not start, START_ATTEMPTS times in all), probe it, and
    load it with every workload. A server that never starts or fails the probe is {"failed":
    why}, with no levels."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            result = measure_started_system(server, workloads, references, seconds, warm_up_s, log_dir,
                                            log_name if attempt == 1 else f"{log_name}-attempt{attempt}")
            return {**result, "start_attempts": attempt}
        except ServerNotInstalled as error:
            print(f"  FAILED: {error}", flush=True)
            return {"probe": None, "failed": str(error), "levels": [], "start_attempts": attempt}
        except ServerDidNotStart as error:
            print(f"  did not start (attempt {attempt} of {START_ATTEMPTS}): {error}", flush=True)
            if attempt == START_ATTEMPTS:
                return {"probe": None, "failed": f"did not start in {START_ATTEMPTS} attempts: {error}", "levels": [],
                        "start_attempts": attempt}
        except (RuntimeError, OSError, subprocess.CalledProcessError, psutil.Error) as error:
            print(f"  FAILED: {error}", flush=True)
            return {"probe": None, "failed": str(error), "levels": [], "start_attempts": attempt}
    raise AssertionError("unreachable")


def measure_started_system(server: Server, workloads: list[Workload], references: References, seconds: float,
                           warm_up_s: float, log_dir: Path, log_name: str) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    timings = {"begin": time.monotonic()}  # each phase's end: start (until ready), probe, load, stop
    with running(server, port, log_dir, log_name) as root:
        timings["start"] = time.monotonic()
        probe_result = probe(server, url, workloads, references)
        timings["probe"] = time.monotonic()
        print(f"  probe: {'passed' if probe_result['passed'] else 'FAILED'} ({probe_summary(probe_result)})", flush=True)
        result = {"probe": probe_result, "failed": None, "levels": [], "timings_s": {}}
        if not probe_result["passed"]:
            result["failed"] = f"correctness probe: {probe_summary(probe_result)}"
        else:
            result["idle_cpu_share"] = idle_cpu_share(root)
            for workload in workloads:
                bodies = [server.api.body(workload.model, texts) for texts in workload.request_texts()]
                result["levels"] += load_levels(url, server.api.path(workload.kind, workload.model), bodies, workload, seconds,
                                                warm_up_s, root, result["idle_cpu_share"])
        timings["load"] = time.monotonic()
    timings["stop"] = time.monotonic()
    marks = list(timings.items())
    result["timings_s"] = {name: round(end - start, 1) for (_, start), (name, end) in zip(marks, marks[1:])}
    return result


# --------------------------------------------------------------------------- ratios and the best configuration

def levels_by_key(result: dict | None) -> dict[str, dict]:
    return {level["level"]: level for level in (result or {}).get("levels", [])}


def round_ratios(round_result: dict, workloads: list[Workload]) -> dict:
    """One round's figures relative to the service as shipped: each system's texts/s ÷ the
    service's at each level, p50 ÷ the service's at 1 connection; the service's texts/s at each
    workload's most connections ÷ raw onnxruntime at its best batch, and its p50 at 1 connection
    − raw onnxruntime at batch 1 (with one HTTP worker too)."""
    service = levels_by_key(round_result["systems"].get(SERVICE))
    ratios: dict = {"texts_per_s_over_service": {}, "p50_over_service_at_1": {}, "service_over_raw_best_batch": {},
                    "service_p50_minus_raw_batch1_ms": {}, "service_1worker_p50_minus_raw_batch1_ms": {}}
    for label, result in round_result["systems"].items():
        if label == SERVICE or result["failed"]:
            continue
        mine = levels_by_key(result)
        ratios["texts_per_s_over_service"][label] = {
            key: level["texts_per_s"] / service[key]["texts_per_s"] if service.get(key, {}).get("texts_per_s") else None
            for key, level in mine.items()}
        ratios["p50_over_service_at_1"][label] = {
            workload.name: mine[workload.level_key(1)]["p50_ms"] / service[workload.level_key(1)]["p50_ms"]
            for workload in workloads if workload.level_key(1) in mine and workload.level_key(1) in service}
    one_worker = levels_by_key(round_result["systems"].get("service-1worker"))
    for workload in workloads:
        floor = floor_profile(round_result["in_process"][workload.model])
        busiest = workload.level_key(max(workload.connections))
        if busiest in service:
            ratios["service_over_raw_best_batch"][busiest] = service[busiest]["texts_per_s"] / floor["best_texts_per_s"]
        if workload.level_key(1) in service:
            ratios["service_p50_minus_raw_batch1_ms"][workload.name] = service[workload.level_key(1)]["p50_ms"] - floor["batch1_ms"]
        if workload.level_key(1) in one_worker:
            ratios["service_1worker_p50_minus_raw_batch1_ms"][workload.name] = (
                one_worker[workload.level_key(1)]["p50_ms"] - floor["batch1_ms"])
    return ratios


def configuration_score(rounds: list[dict], label: str) -> float | None:
    """Geometric mean of a system's texts/s over every level of every round (at 1 connection that
    is 1 / latency, so latency counts as much as throughput); None if it failed in any round."""
    values = []
    for round_result in rounds:
        result = round_result["systems"].get(label)
        if result is None or result["failed"] or not result["levels"]:
            return None
        values += [level["texts_per_s"] for level in result["levels"]]
    if not values or min(values) <= 0:
        return None
    return math.exp(sum(math.log(value) for value in values) / len(values))


def best_configurations(rounds: list[dict], systems: dict[str, dict]) -> dict[str, dict]:
    """Per peer: its configurations' scores, best first, and the best one's label (None if all failed)."""
    peers: dict[str, list[tuple[str, float | None]]] = {}
    for label, system in systems.items():
        if system["peer"]:
            peers.setdefault(system["peer"], []).append((label, configuration_score(rounds, label)))
    best = {}
    for peer, scored in peers.items():
        ranked = sorted(scored, key=lambda item: -(item[1] or 0))
        best[peer] = {"best": ranked[0][0] if ranked[0][1] else None,
                      "scores": {label: score for label, score in ranked}}
    return best


# --------------------------------------------------------------------------- reports

def text_table(headers: list[str], rows: list[list[str]], left_columns: set[int]) -> list[str]:
    """Aligned columns: those of `left_columns` (names, notes) to the left, the figures to the right."""
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) if rows else len(headers[i]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(widths[i]) if i in left_columns else cell.rjust(widths[i]) for i, cell in enumerate(cells)).rstrip()

    return [line(headers), line(["-" * width for width in widths]), *(line(row) for row in rows)]


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), *("| " + " | ".join(row) + " |" for row in rows)]


def number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def per_round(values: list[float | None], digits: int) -> str:
    """'r1 / r2' (a failed or missing round: —)."""
    return " / ".join(number(value, digits) for value in values)


def report_sections(report: dict) -> list[tuple[str, str, list[str], list[list[str]], set[int]]]:
    """The report as (title, note, headers, rows, the columns of names and notes), shared by
    the printed and the markdown forms."""
    rounds = report["rounds"]
    workloads = report["workloads"]
    level_keys = [f"{w['name']} @{c}" for w in workloads for c in w["connections"]]
    one_connection = [w["name"] for w in workloads if 1 in w["connections"]]
    systems = report["systems"]
    best = report["best_configurations"]
    sections = []

    rows = []
    for model in dict.fromkeys(w["model"] for w in workloads):
        for profile in rounds[0]["in_process"][model]:
            per = [round_result["in_process"][model][profile] for round_result in rounds]
            if "skipped" in per[0]:
                rows.append([model, profile, "", "", "", "skipped: " + per[0]["skipped"]])
                continue
            rows.append([model, profile, per_round([p["batch1_ms"] for p in per], 3),
                         " / ".join(str(p["best_batch"]) for p in per), per_round([p["best_texts_per_s"] for p in per], 0), ""])
    sections.append(("In process (round 1 / round 2 ...)", "",
                     ["model", "", "batch-1 ms", "best batch", "texts/s there", ""], rows, {0, 1, 5}))

    def label_of(label: str) -> str:
        system = systems[label]
        if system["peer"] and best.get(system["peer"], {}).get("best") == label:
            return f"{label} (best {system['peer']})"
        return label

    ordered = ordered_systems(systems, best)
    headers = ["system", "configuration", *(f"{key} texts/s" for key in level_keys),
               *(f"{name} @1 p50 ms" for name in one_connection), "note"]
    rows = []
    for label in ordered:
        results = [round_result["systems"][label] for round_result in rounds if label in round_result["systems"]]
        by_round = [levels_by_key(result) for result in results]
        failures = [f"round {number_of_round}: {result['failed']}" for number_of_round, result in enumerate(results, 1) if result["failed"]]
        restarts = [f"round {number_of_round}: started at attempt {result['start_attempts']}"
                    for number_of_round, result in enumerate(results, 1) if result.get("start_attempts", 1) > 1]
        rows.append([label_of(label), systems[label]["configuration"],
                     *(per_round([levels.get(key, {}).get("texts_per_s") for levels in by_round], 0) for key in level_keys),
                     *(per_round([levels.get(f"{name} @1", {}).get("p50_ms") for levels in by_round], 2) for name in one_connection),
                     "; ".join(["FAILED " + failure[:200] for failure in failures] + restarts)])
    sections.append(("Side by side (round 1 / round 2 ...)",
                     "Each peer's configurations are listed; '(best ...)' marks the one with the highest geometric mean of "
                     "texts/s over every level and round; — marks a round without a figure.", headers, rows,
                     {0, 1, len(headers) - 1}))

    rows = []
    for key in level_keys:
        for label in ordered:
            for number_of_round, round_result in enumerate(rounds, 1):
                level = levels_by_key(round_result["systems"].get(label)).get(key)
                if level is None:
                    continue
                server_side = (f"{level['server_queue_ms']:.2f} / {level['server_inference_ms']:.2f} / {level['server_total_ms']:.2f}"
                               if level.get("server_total_ms") is not None else "")
                rows.append([key, label, str(number_of_round), number(level["texts_per_s"]), f"{level['p50_ms']:.2f}",
                             f"{level['p99_ms']:.2f}", str(level["refused"]), str(sum(level["other_statuses"].values())),
                             str(sum(level["socket_errors"].values())), f"{level['server_cpu_share']:.0%}",
                             f"{level['loadgen_cpu_share']:.0%}", server_side,
                             "/".join(map(str, level.get("connections_per_worker", []))),
                             batch_summary(level["batches"]) if level.get("batches") else ""])
    sections.append(("Every level", "wrk, closed loop; refused = 429/503, other = other non-2xx, lost = socket errors; "
                     "batches: the service's own metrics over the level (textserve_batch_texts, textserve_batch_padded_tokens, "
                     "textserve_batch_padding_ratio).",
                     ["level", "system", "round", "texts/s", "p50 ms", "p99 ms", "refused", "other", "lost", "server CPU", "wrk CPU",
                      "server queue / inference / total ms", "connections per worker", "batches"], rows, {0, 1, 13}))

    ratios = [round_result["ratios"] for round_result in rounds]
    rows = []
    for label in ordered:
        if label == SERVICE:
            continue
        rows.append([label_of(label),
                     *(per_round([r["texts_per_s_over_service"].get(label, {}).get(key) for r in ratios], 2) for key in level_keys),
                     *(per_round([r["p50_over_service_at_1"].get(label, {}).get(name) for r in ratios], 2) for name in one_connection)])
    sections.append(("Relative to the service (texts/s ÷ the service's; p50 ÷ the service's), round 1 / round 2 ...", "",
                     ["system", *(f"{key} texts/s" for key in level_keys), *(f"{name} @1 p50" for name in one_connection)], rows, {0}))

    rows = []
    for name, title, digits in (("service_over_raw_best_batch", "service texts/s ÷ raw onnxruntime + encoding at its best batch", 3),
                                ("service_p50_minus_raw_batch1_ms", "service p50 at 1 connection − raw onnxruntime + encoding at batch 1, ms", 2),
                                ("service_1worker_p50_minus_raw_batch1_ms", "the same, service-1worker, ms", 2)):
        for key in dict.fromkeys(k for r in ratios for k in r[name]):
            rows.append([title, key, per_round([r[name].get(key) for r in ratios], digits)])
    sections.append(("The service against the floor", "", ["figure", "at", "round 1 / round 2 ..."], rows, {0, 1}))
    return sections


def ordered_systems(systems: dict[str, dict], best: dict[str, dict]) -> list[str]:
    """The service's systems as listed, then each peer's best configuration before its others."""
    def key(label: str) -> tuple:
        peer = systems[label]["peer"]
        if not peer:
            return (0, list(systems).index(label))
        ranking = list(best.get(peer, {}).get("scores", {}))
        return (1, list(dict.fromkeys(s["peer"] for s in systems.values() if s["peer"])).index(peer),
                ranking.index(label) if label in ranking else len(ranking))
    return sorted(systems, key=key)


def print_report(report: dict) -> None:
    print(f"\n{report['machine']}; {report['seconds_per_level']:g} s per level, {len(report['rounds'])} round(s)\n")
    for title, note, headers, rows, left_columns in report_sections(report):
        print(f"## {title}")
        if note:
            print(note)
        print("\n".join(text_table(headers, rows, left_columns)))
        print()
    for peer, ranking in report["best_configurations"].items():
        scores = ", ".join(f"{label} {number(score)}" for label, score in ranking["scores"].items())
        print(f"{peer}: best {ranking['best']} (geometric mean texts/s: {scores})")


def markdown_report(report: dict) -> str:
    """The same tables as print_report, as markdown (docs/performance.md quotes them)."""
    lines = [f"`{report['command']}` on {report['machine']}; {report['seconds_per_level']:g} s per level, "
             f"{report['warm_up_s']:g} s of warm-up per workload, {len(report['rounds'])} round(s); "
             f"{report['total_minutes']:.1f} minutes in all.", ""]
    for label, system in report["systems"].items():
        lines.append(f"- **{label}**: {system['description']}" + (f"; {system['configuration']}" if system["configuration"] else ""))
    lines.append("")
    for title, note, headers, rows, _ in report_sections(report):
        lines += [f"**{title}**", ""] + ([note, ""] if note else []) + markdown_table(headers, rows) + [""]
    for peer, ranking in report["best_configurations"].items():
        scores = ", ".join(f"{label} {number(score)}" for label, score in ranking["scores"].items())
        lines.append(f"- {peer}: best **{ranking['best']}** (geometric mean texts/s over every level and round: {scores})")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Texts/s and p50 per level, one bar per system (the mean of its rounds; the whisker spans
    the rounds), the floor as a line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level_keys = [f"{w['name']} @{c}" for w in report["workloads"] for c in w["connections"]]
    ordered = [label for label in ordered_systems(report["systems"], report["best_configurations"])
               if not any(r["systems"].get(label, {}).get("failed") for r in report["rounds"])]
    figure, axes = plt.subplots(2, 1, figsize=(max(10, 1.6 * len(level_keys) * max(1, len(ordered)) / 4), 9))
    width = 0.8 / max(1, len(ordered))
    for index, label in enumerate(ordered):
        for axis, metric in zip(axes, ("texts_per_s", "p50_ms")):
            means, low, high = [], [], []
            for key in level_keys:
                values = [levels_by_key(r["systems"].get(label)).get(key, {}).get(metric) for r in report["rounds"]]
                values = [value for value in values if value is not None]
                means.append(statistics.fmean(values) if values else np.nan)
                low.append(means[-1] - min(values) if values else 0)
                high.append(max(values) - means[-1] if values else 0)
            positions = np.arange(len(level_keys)) + (index - (len(ordered) - 1) / 2) * width
            axis.bar(positions, means, width, yerr=[low, high], label=label, capsize=2)
    axes[0].set(title="throughput (mean of rounds; whiskers: the rounds)", ylabel="texts/s", yscale="log")
    axes[1].set(title="p50 latency", ylabel="ms", yscale="log")
    for axis in axes:
        axis.set_xticks(np.arange(len(level_keys)), level_keys, fontsize=8)
        axis.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, ncol=3)
    figure.suptitle(report["machine"], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine() -> str:
    import onnxruntime

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores; onnxruntime {onnxruntime.__version__}; {platform.python_implementation()} {platform.python_version()}"


# --------------------------------------------------------------------------- the run

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", default="kim-cnn-trec6", help="a classifier bundle, or '' for none")
    parser.add_argument("--lm", default="char-lm-small-ptb", help="a language-model bundle, or '' for none")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                        help="KIND/TEXTS-PER-REQUEST@CONNECTIONS;... with KIND classify or lm (default: %(default)s)")
    parser.add_argument("--clients", help="older form: comma-separated connection counts for both models (with --texts-per-request)")
    parser.add_argument("--texts-per-request", type=int, help="older form: texts per request for both models (with --clients)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per load level")
    parser.add_argument("--warm-up", type=float, default=3.0, help="seconds of load per workload at its most connections first, not counted")
    parser.add_argument("--rounds", type=int, default=2, help="every system runs once per round")
    parser.add_argument("--systems", default="all", help="'all', or labels and peer names (mosec, litserve, pytriton), comma-separated")
    parser.add_argument("--out", type=Path, default=REPOSITORY_ROOT / "loadtests" / "results")
    args = parser.parse_args(argv)
    started = time.monotonic()

    spec = args.workloads
    if args.clients or args.texts_per_request:
        clients = args.clients or "1,8,32,64,128"
        per_request = args.texts_per_request or 1
        spec = f"classify/{per_request}@{clients};lm/{per_request}@{clients}"
    workloads = parse_workloads(spec, args.classifier, args.lm)
    if not workloads:
        raise SystemExit("no workload: --classifier and --lm are both '' or --workloads names neither")
    models = list(dict.fromkeys(w.model for w in workloads))
    chosen = choose_systems(servers(models), args.systems)
    args.out.mkdir(parents=True, exist_ok=True)
    references = References.compute(workloads)

    report = {"machine": machine(), "command": " ".join(["python -m loadtests.bench", *(argv if argv is not None else sys.argv[1:])]),
              "seconds_per_level": args.seconds, "warm_up_s": args.warm_up, "workloads": [
                  {"name": w.name, "kind": w.kind, "model": w.model, "texts_per_request": w.texts_per_request,
                   "connections": list(w.connections)} for w in workloads],
              "systems": {s.label: {"description": s.description, "peer": s.peer, "configuration": s.configuration} for s in chosen},
              "rounds": []}
    for number_of_round in range(1, args.rounds + 1):
        round_result: dict = {"in_process": {}, "systems": {}}
        in_process_started = time.monotonic()
        for workload in workloads:
            if workload.model not in round_result["in_process"]:
                print(f"round {number_of_round}, in process: {workload.model}", flush=True)
                measure = classifier_in_process if workload.kind == CLASSIFIER else language_model_in_process
                round_result["in_process"][workload.model] = measure(workload.model, workload.texts)
        round_result["in_process_wall_s"] = time.monotonic() - in_process_started
        print(f"  {round_result['in_process_wall_s']:.0f} s", flush=True)
        # Round 2 runs the systems in the reverse order, round 3 as round 1, ...: a drift of the
        # shared machine over the run then does not always favour the systems that come first.
        order = chosen if number_of_round % 2 else list(reversed(chosen))
        for server in order:
            print(f"round {number_of_round}: {server.label} ({server.description}"
                  + (f"; {server.configuration}" if server.configuration else "") + ")", flush=True)
            system_started = time.monotonic()
            round_result["systems"][server.label] = measure_system(
                server, workloads, references, args.seconds, args.warm_up, args.out, f"{server.label}-round{number_of_round}")
            result = round_result["systems"][server.label]
            result["wall_s"] = time.monotonic() - system_started
            print(f"  {result['wall_s']:.0f} s ("
                  + ", ".join(f"{name} {seconds:g} s" for name, seconds in result.get("timings_s", {}).items()) + ")", flush=True)
        round_result["systems"] = {s.label: round_result["systems"][s.label] for s in chosen}  # in the listed order
        round_result["ratios"] = round_ratios(round_result, workloads)
        report["rounds"].append(round_result)
    report["best_configurations"] = best_configurations(report["rounds"], report["systems"])
    report["total_minutes"] = (time.monotonic() - started) / 60

    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench.md").write_text(markdown_report(report))
    plot(report, args.out / "bench.png")
    print_report(report)
    print(f"\n{report['total_minutes']:.1f} minutes; wrote {args.out / 'bench.json'}, bench.md (the tables as markdown) and bench.png")


if __name__ == "__main__":
    main()
