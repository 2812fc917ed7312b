"""The runner inside the HTTP worker (TEXTSERVE_INFERENCE=inline, the default).

With `bentoml.depends`, texts travel from the HTTP worker to a second process over HTTP and
back, pickled, through BentoML's whole middleware stack twice; `make bench` measured that hop
at several milliseconds and most of the CPU of a small model's request (docs/performance.md).
Here the runner's methods run in this process instead:

- the batchable ones (classify_batch, score_batch) behind BentoML's own adaptive batcher, the
  CorkDispatcher that BentoML puts in front of a batchable API, with the same max_batch_size
  and max_latency_ms: requests' texts are merged, run as one batch in a worker thread (the
  event loop keeps answering while onnxruntime and the tokeniser run) and split back;
- the others (explain, next words, generation, vectors) in a worker thread per call, as
  BentoML runs a sync API.

The object offers `to_async.<api>` like BentoML's remote proxy, so the service code is the
same in both modes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import SimpleNamespace

import anyio
from bentoml._internal.marshal.dispatcher import CorkDispatcher
from bentoml.exceptions import ServiceUnavailable

from services.config import SETTINGS
from services.runner import ModelRunner, TextItem

BATCHED_APIS = ("classify_batch", "score_batch")


def refuse():
    """CorkDispatcher's answer to a request it cancels because its batch could not start in time."""
    raise ServiceUnavailable("the batch queue is full")


class InProcessRunner:
    def __init__(self) -> None:
        self.instance = ModelRunner()  # BentoML's in-process instance: sessions built and warmed up
        self.one_batch_at_a_time = anyio.CapacityLimiter(1)  # a batch uses every onnxruntime thread
        apis = {name: getattr(self.instance.to_async, name) for name in self.instance.bento_service.apis}
        for name in BATCHED_APIS:
            dispatcher = CorkDispatcher(
                max_latency_in_ms=SETTINGS.max_latency_ms,
                max_batch_size=SETTINGS.max_batch_texts,
                fallback=refuse,
                get_batch_size=len,  # a request's share is its list of texts
            )
            apis[name] = dispatcher(functools.partial(self.run_batch, getattr(self.instance, name).local))
        self.to_async = SimpleNamespace(**apis)

    async def run_batch(self, run, requests: Sequence[list[TextItem]]) -> list[list]:
        """Merge the requests' texts into one batch, run it off the event loop, split the answers."""
        items = [item for request in requests for item in request]
        answers = await anyio.to_thread.run_sync(run, items, limiter=self.one_batch_at_a_time)
        split, start = [], 0
        for request in requests:
            split.append(answers[start : start + len(request)])
            start += len(request)
        return split
