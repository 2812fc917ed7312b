"""The service's own Prometheus metrics (prometheus-client, through bentoml.metrics so that they
live in BentoML's multiprocess registry and /metrics shows them from every worker and process).

BentoML's built-in batch histogram counts requests per batch and has no queue wait; these
count texts and measure the wait between the HTTP worker handing texts over and the batch
starting on the runner.
"""

from __future__ import annotations

import time

import bentoml

NAMESPACE = "textserve"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
SHARE_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)

requests_total = bentoml.metrics.Counter(
    name=f"{NAMESPACE}_requests_total",
    documentation="HTTP requests and gRPC calls answered, by model, endpoint and status code",
    labelnames=["model", "endpoint", "status"],
)
request_duration_seconds = bentoml.metrics.Histogram(
    name=f"{NAMESPACE}_request_duration_seconds",
    documentation="Time from request arrival to response, by model and endpoint",
    labelnames=["model", "endpoint"],
    buckets=LATENCY_BUCKETS,
)
texts_total = bentoml.metrics.Counter(
    name=f"{NAMESPACE}_texts_total",
    documentation="Texts run through a model",
    labelnames=["model"],
)
inference_duration_seconds = bentoml.metrics.Histogram(
    name=f"{NAMESPACE}_inference_duration_seconds",
    documentation="onnxruntime time for one model's share of a batch (encoding included)",
    labelnames=["model"],
    buckets=LATENCY_BUCKETS,
)
batch_texts = bentoml.metrics.Histogram(
    name=f"{NAMESPACE}_batch_texts",
    documentation="Texts in one adaptive batch (all models together)",
    buckets=BATCH_BUCKETS,
)
batch_padded_tokens = bentoml.metrics.Histogram(
    name=f"{NAMESPACE}_batch_padded_tokens",
    documentation="Tokens one model's share of a batch ran, padding included (each length group's rows x its longest row)",
    labelnames=["model"],
    buckets=TOKEN_BUCKETS,
)
batch_padding_ratio = bentoml.metrics.Histogram(
    name=f"{NAMESPACE}_batch_padding_ratio",
    documentation="Share of those padded tokens that were padding (0: none)",
    labelnames=["model"],
    buckets=SHARE_BUCKETS,
)
batch_token_budget = bentoml.metrics.Gauge(
    name=f"{NAMESPACE}_batch_token_budget",
    documentation="Padded tokens per onnxruntime run, measured as the model loaded or set by TEXTSERVE_BATCH_TOKENS (the largest over the processes)",
    labelnames=["model"],
    multiprocess_mode="livemax",
)
queue_wait_seconds = bentoml.metrics.Histogram(
    name=f"{NAMESPACE}_queue_wait_seconds",
    documentation="Time from the HTTP worker handing a text over until its batch starts, by model",
    labelnames=["model"],
    buckets=LATENCY_BUCKETS,
)
# Triton's statistics extension (services/api/model_statistics.py) reads these, with the
# histograms above, summed over every process.
inference_requests_total = bentoml.metrics.Counter(
    name=f"{NAMESPACE}_inference_requests",
    documentation="Inference requests and calls answered (HTTP and gRPC), by model and outcome (success: a 2xx or 3xx answer)",
    labelnames=["model", "outcome"],
)
inference_request_seconds_total = bentoml.metrics.Counter(
    name=f"{NAMESPACE}_inference_request_seconds",
    documentation="Their time from arrival to answer, summed, by model and outcome",
    labelnames=["model", "outcome"],
)
model_runs_total = bentoml.metrics.Counter(
    name=f"{NAMESPACE}_model_runs",
    documentation="One model's share of a batch run, by model and its number of texts (at most TEXTSERVE_MAX_BATCH_TEXTS)",
    labelnames=["model", "texts"],
)
model_run_seconds_total = bentoml.metrics.Counter(
    name=f"{NAMESPACE}_model_run_seconds",
    documentation="Their onnxruntime time (encoding included), summed, by model and number of texts",
    labelnames=["model", "texts"],
)
last_inference_timestamp_seconds = bentoml.metrics.Gauge(
    name=f"{NAMESPACE}_last_inference_timestamp_seconds",
    documentation="When the model last ran a batch, in seconds since the epoch (the latest over the processes)",
    labelnames=["model"],
    multiprocess_mode="max",
)
model_loaded = bentoml.metrics.Gauge(
    name=f"{NAMESPACE}_model_loaded",
    documentation="1 when the model is loaded and served, 0 when it failed to load at startup (the lowest over the workers)",
    labelnames=["model"],
    multiprocess_mode="livemin",
)
auth_refusals_total = bentoml.metrics.Counter(
    name=f"{NAMESPACE}_auth_refusals_total",
    documentation="Requests refused for want of a good key: 401 (none, malformed, unknown) or 403 (not an admin key)",
    labelnames=["status"],
)


# Each (model, endpoint, status) series of the two request metrics, looked up once: bounded by
# the loaded models x routes x statuses (callers pass a route name, never a raw path, and a
# model only once it names a loaded one).
_request_series: dict[tuple[str, str, int], tuple] = {}


def count_request(model: str, endpoint: str, status: int, elapsed_s: float, inference: bool = False) -> None:
    """One answered request (HTTP or gRPC): textserve_requests_total and its duration, and for
    an inference request that named a model, its outcome for Triton's statistics."""
    key = (model, endpoint, status)
    series = _request_series.get(key)
    if series is None:
        outcome = "success" if status < 400 else "failure"
        series = _request_series[key] = (
            requests_total.labels(model=model, endpoint=endpoint, status=str(status)),
            request_duration_seconds.labels(model=model, endpoint=endpoint),
            inference_requests_total.labels(model=model, outcome=outcome) if model else None,
            inference_request_seconds_total.labels(model=model, outcome=outcome) if model else None)
    series[0].inc()
    series[1].observe(elapsed_s)
    if inference and series[2] is not None:
        series[2].inc()
        series[3].inc(elapsed_s)


def count_model_run(model: str, texts: int, seconds: float, queue_waits_s: list[float]) -> None:
    """One model's share of a batch: its texts, its onnxruntime time, each text's queue wait."""
    inference_duration_seconds.labels(model=model).observe(seconds)
    texts_total.labels(model=model).inc(texts)
    model_runs_total.labels(model=model, texts=str(texts)).inc()
    model_run_seconds_total.labels(model=model, texts=str(texts)).inc(seconds)
    last_inference_timestamp_seconds.labels(model=model).set(time.time())
    waits = queue_wait_seconds.labels(model=model)
    for wait_s in queue_waits_s:
        waits.observe(wait_s)
