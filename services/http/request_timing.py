"""Where a request's time went, for the client and for Prometheus.

Every response carries three headers, as text-embeddings-inference's do, so that a user sees
where time goes without a profiler (milliseconds, with microsecond resolution):

    x-queue-time      texts waiting for their adaptive batch to start (0 for unbatched calls)
    x-inference-time  the batch's onnxruntime run, encoding included (the slowest batch
                      when a request's texts were split over several)
    x-total-time      from the request's arrival here until its response headers left

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which runs the app in a second
task and costs about as much as a small model), keyed by a context variable that the service
fills in while it handles the request.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass

from services import metrics
from services.http.outcome import request_outcome

QUEUE_HEADER, INFERENCE_HEADER, TOTAL_HEADER = b"x-queue-time", b"x-inference-time", b"x-total-time"


@dataclass
class Timing:
    queue_s: float = 0.0
    inference_s: float = 0.0

    def record(self, queue_s: float, inference_s: float) -> None:
        """A batch's share of this request; a request split over batches keeps the slowest."""
        self.queue_s = max(self.queue_s, queue_s)
        self.inference_s = max(self.inference_s, inference_s)


current_timing: contextvars.ContextVar[Timing | None] = contextvars.ContextVar("textserve_timing", default=None)


def record(queue_s: float, inference_s: float) -> None:
    """Note a batch's queue and inference time on the request being handled (if any)."""
    timing = current_timing.get()
    if timing is not None:
        timing.record(queue_s, inference_s)


def milliseconds(seconds: float) -> bytes:
    return f"{seconds * 1000:.3f}".encode()


class RequestTiming:
    """ASGI middleware: timing headers on every response, and the request counter and latency
    histogram by model, route template and status (bounded labels: never the raw path)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        timing = Timing()
        token = current_timing.set(timing)
        status = None  # none sent: the request was cancelled (a timeout) or failed past every handler
        outcome = request_outcome(scope)

        async def send_with_headers(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (QUEUE_HEADER, milliseconds(timing.queue_s)),
                                                  (INFERENCE_HEADER, milliseconds(timing.inference_s)),
                                                  (TOTAL_HEADER, milliseconds(time.perf_counter() - started))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            current_timing.reset(token)
            if not outcome.get("counted"):  # else refused by an outer layer, which counted it (a body over the limit: 413)
                if status is None:
                    status = 504 if outcome.get("timed_out") else 500  # the timeout middleware answers 504
                route = scope.get("route")
                endpoint = getattr(route, "path", "unmatched")
                model = scope.get("state", {}).get("model", "")
                metrics.requests_total.labels(model=model, endpoint=endpoint, status=str(status)).inc()
                metrics.request_duration_seconds.labels(model=model, endpoint=endpoint).observe(time.perf_counter() - started)
