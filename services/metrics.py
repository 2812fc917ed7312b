"""The service's own Prometheus metrics (prometheus-client, through bentoml.metrics so that they
live in BentoML's multiprocess registry and /metrics shows them from every worker and process).

BentoML's built-in batch histogram counts requests per batch and has no queue wait; these
count texts and measure the wait between the HTTP worker handing texts over and the batch
starting on the runner.
"""

from __future__ import annotations

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
    documentation="Time from the HTTP worker sending texts to the runner until their batch starts",
    buckets=LATENCY_BUCKETS,
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


def count_request(model: str, endpoint: str, status: int, elapsed_s: float) -> None:
    """One answered request (HTTP or gRPC): textserve_requests_total and its duration."""
    key = (model, endpoint, status)
    series = _request_series.get(key)
    if series is None:
        series = _request_series[key] = (requests_total.labels(model=model, endpoint=endpoint, status=str(status)),
                                         request_duration_seconds.labels(model=model, endpoint=endpoint))
    series[0].inc()
    series[1].observe(elapsed_s)
