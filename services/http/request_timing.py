"""Where a request's time went, for the client and for Prometheus.

Every response carries three headers, as text-embeddings-inference's do, so that a user sees
where time goes without a profiler (milliseconds, with microsecond resolution):

    x-queue-time      texts waiting for their adaptive batch to start (0 for unbatched calls)
    x-inference-time  the batch's onnxruntime run, encoding included (the slowest batch
                      when a request's texts were split over several)
    x-total-time      from the request's arrival here until its response headers left

The pipeline (pipeline.py) adds them to every response, from a context variable that the
service fills in while it handles the request.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


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
