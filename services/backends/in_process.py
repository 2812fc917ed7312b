"""The runner inside the HTTP worker (TEXTSERVE_INFERENCE=inline, the default).

With `bentoml.depends`, texts travel from the HTTP worker to a second process over HTTP and
back, pickled, through BentoML's whole middleware stack twice; `make bench` measured that hop
at several milliseconds and most of the CPU of a small model's request (docs/performance-history.md).
Here the runner's methods run in this process instead:

- the batchable ones (classify_batch, score_batch) behind an IdleDispatchBatcher
  (batching.py): requests' texts that queued while the model was busy are merged, run as one
  batch in a worker thread (the event loop keeps answering while onnxruntime and the
  tokeniser run) and split back; TEXTSERVE_MAX_BATCH_TEXTS and TEXTSERVE_MAX_LATENCY_MS
  bound it as they bound the shared runner's batchers (shared_runner.py);
- the others (explain, next words, generation, vectors) in a worker thread per call, as
  BentoML runs a sync API.

The object offers `batched(api, model, payloads, sent_at)` as the shared runner's client does
(shared_runner.py), and `to_async.<api>` for the others like BentoML's remote proxy, so the
service code is the same in both modes.
"""

from __future__ import annotations

from types import SimpleNamespace

from services.backends.batching import IdleDispatchBatcher
from services.config import SETTINGS
from services.backends.runner import ModelRunner
from services.backends.shared_runner import BATCHED_APIS, QueuedItem


class InProcessRunner:
    def __init__(self) -> None:
        self.instance = ModelRunner()  # BentoML's in-process instance: sessions built and warmed up
        self.to_async = SimpleNamespace(**{name: getattr(self.instance.to_async, name) for name in self.instance.bento_service.apis})
        self.batchers = {name: IdleDispatchBatcher(getattr(self.instance, name), SETTINGS.max_batch_texts, SETTINGS.max_latency_ms)
                         for name in BATCHED_APIS}

    async def batched(self, api: str, model: str, payloads: list, sent_at: float) -> list[dict]:
        """One request's texts (or image rows) through this worker's batcher for `api`."""
        return await self.batchers[api]([QueuedItem(model, payload, sent_at) for payload in payloads])
