"""Triton's statistics extension: each served model's request, queue and compute figures since
the server started, summed over every process (HTTP workers and the runner), as Triton's
`ModelStatistics` (grpc_service.proto). GET /v2/models[/{name}[/versions/{v}]]/stats answers it
as JSON, the gRPC call ModelStatistics as the message; perf_analyzer reads it around its runs.

The figures are the service's own metrics (services/metrics.py), read back from the
multiprocess files every process writes (PROMETHEUS_MULTIPROC_DIR), so nothing is kept twice:
- success / fail: inference requests and calls answered (HTTP routes that run a model, gRPC
  ModelInfer) by outcome, with their time from arrival to answer
  (textserve_inference_requests_total, textserve_inference_request_seconds_total);
- queue: each text's wait for its batch (textserve_queue_wait_seconds, by model);
- compute_infer and the batch statistics: each run of the model's share of a batch, by its
  number of texts (textserve_model_runs_total, textserve_model_run_seconds_total; the text
  encoding runs inside it, so compute_input and compute_output count the same runs at 0 ns);
- inference_count: texts run (textserve_texts_total); execution_count: runs;
- last_inference: when the model last ran a batch (ms since the epoch).
Counts are by model name: a version loaded later adds to its name's figures.
"""

from __future__ import annotations

import os
from collections import defaultdict

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from services.metrics import NAMESPACE

NANOSECONDS = 1e9
WANTED = {f"{NAMESPACE}_{name}" for name in (
    "inference_requests_total", "inference_request_seconds_total", "queue_wait_seconds_count", "queue_wait_seconds_sum",
    "model_runs_total", "model_run_seconds_total", "texts_total", "last_inference_timestamp_seconds")}


def metric_samples() -> dict[str, dict[str, list[tuple[dict, float]]]]:
    """The samples the statistics read, by metric name and model: [(labels, value)], every
    process summed (the multiprocess files), or this process's registry when none are kept."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    registry = REGISTRY
    if folder:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
    samples: dict[str, dict[str, list[tuple[dict, float]]]] = defaultdict(lambda: defaultdict(list))
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in WANTED and "model" in sample.labels:
                samples[sample.name][sample.labels["model"]].append((sample.labels, sample.value))
    return samples


def duration(count: float, seconds: float) -> dict:
    return {"count": int(count), "ns": int(round(seconds * NANOSECONDS))}


NONE = duration(0, 0.0)


def statistics_of(name: str, version: str, samples: dict) -> dict:
    """One model's ModelStatistics as Triton's JSON."""
    def total(metric: str, **labels: str) -> float:
        return sum(value for sample_labels, value in samples[f"{NAMESPACE}_{metric}"].get(name, [])
                   if all(sample_labels.get(key) == wanted for key, wanted in labels.items()))

    runs: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])  # texts -> [runs, seconds]
    for labels, value in samples[f"{NAMESPACE}_model_runs_total"].get(name, []):
        runs[int(labels["texts"])][0] += value
    for labels, value in samples[f"{NAMESPACE}_model_run_seconds_total"].get(name, []):
        runs[int(labels["texts"])][1] += value
    executions = sum(count for count, _ in runs.values())
    return {
        "name": name,
        "version": version,
        "last_inference": int(total("last_inference_timestamp_seconds") * 1000),  # Triton's: ms since the epoch
        "inference_count": int(total("texts_total")),
        "execution_count": int(executions),
        "inference_stats": {
            "success": duration(total("inference_requests_total", outcome="success"),
                                total("inference_request_seconds_total", outcome="success")),
            "fail": duration(total("inference_requests_total", outcome="failure"),
                             total("inference_request_seconds_total", outcome="failure")),
            "queue": duration(total("queue_wait_seconds_count"), total("queue_wait_seconds_sum")),
            # the encoding runs inside compute_infer: input and output take no time of their own,
            # with compute_infer's count (perf_analyzer requires the three counts equal)
            "compute_input": duration(executions, 0.0),
            "compute_infer": duration(executions, sum(seconds for _, seconds in runs.values())),
            "compute_output": duration(executions, 0.0),
            "cache_hit": NONE,
            "cache_miss": NONE,
        },
        "batch_stats": [{"batch_size": texts, "compute_input": duration(count, 0.0), "compute_infer": duration(count, seconds),
                         "compute_output": duration(count, 0.0)} for texts, (count, seconds) in sorted(runs.items())],
    }


def statistics(models: list[tuple[str, str]]) -> dict:
    """{"model_stats": [...]} for (name, version) pairs, from one reading of the metrics."""
    samples = metric_samples()
    return {"model_stats": [statistics_of(name, version, samples) for name, version in models]}
