"""Batching in the HTTP worker: whatever queued while the model was busy runs as the next batch.

The policy of Triton's dynamic batcher with no queue delay, and of continuous batching: a
request that finds the model idle runs at once, alone (no waiting for company, so one client
pays nothing); requests that arrive while a batch runs wait for it and then go together, up
to `max_batch_texts` texts. Batches grow with the load by themselves, and no cost model has
to be learnt.

Why not BentoML's CorkDispatcher here (it still batches TEXTSERVE_INFERENCE=runner): `make
bench` measured it keeping, after a burst, the average wait it saw during the burst as the time
to hold every later request, and that wait only decays 5 % every 5 s (the kim-cnn-trec6 p50 at
one client went from 2 ms before a 128-client burst to 30 ms after it); its controller also
polls the queue every millisecond. docs/performance-history.md has the figures.

A request that has waited `max_wait_ms` without starting is refused (503, "retry shortly");
a request larger than `max_batch_texts` runs in several batches; a client that went away
leaves its texts unrun. A batch that fails is run again one request at a time, so that only
the request whose texts make the model fail gets the error.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bentoml.exceptions import ServiceUnavailable


@dataclass(eq=False)
class Job:
    items: Sequence[Any]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    next_item: int = 0  # items before this one are in a batch already
    # Answers by the item's position: a request split over batches that run side by side
    # (concurrent_batches > 1) gets its slices back in any order.
    answers: list = field(init=False)
    unanswered: int = field(init=False)

    def __post_init__(self) -> None:
        self.answers = [None] * len(self.items)
        self.unanswered = len(self.items)


class IdleDispatchBatcher:
    """`await batcher(items)` -> `run(batch)`'s answers for `items`, `run` taking a list of
    items from several requests and answering one per item, in order, in a worker thread."""

    def __init__(self, run: Callable[[list], list], max_batch_texts: int, max_wait_ms: float, concurrent_batches: int = 1) -> None:
        self.run = run
        self.max_batch_texts = max_batch_texts
        self.max_wait_s = max_wait_ms / 1000
        self.queue: deque[Job] = deque()
        self.concurrent_batches = concurrent_batches
        self.running = 0  # drain tasks, each running one batch at a time
        # Threads of its own run the batches, `concurrent_batches` at once (1 in an HTTP worker:
        # a batch uses every onnxruntime thread of the process; the shared runner on a CPU runs
        # one per core, each session.run on one thread, since onnxruntime's intra-op threads
        # did not make a small model's batch faster here: docs/performance-history.md).
        # loop.run_in_executor hands a batch over through a C queue and the answer back through
        # the loop's wake-up pipe; anyio.to_thread, used before, cost about 15 % of the event
        # loop's CPU at one text per request (capacity limiter, cancel scope, a Python queue per
        # hand-over: docs/performance-history.md, the profile before).
        self.threads = ThreadPoolExecutor(max_workers=concurrent_batches, thread_name_prefix="textserve-batch")

    async def __call__(self, items: Sequence[Any]) -> list:
        job = Job(items, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        if self.running < self.concurrent_batches:
            self.running += 1
            asyncio.get_running_loop().create_task(self.drain())
        return await job.future

    async def drain(self) -> None:
        """Run batches until the queue is empty; at most `concurrent_batches` such tasks."""
        try:
            while self.queue:
                batch = self.next_batch()
                if batch:
                    await self.run_batch(batch)
        finally:
            self.running -= 1

    def next_batch(self) -> list[tuple[Job, int, int]]:
        """Up to max_batch_texts items from the head of the queue, as (job, start, stop) slices.
        Jobs waiting longer than max_wait are refused instead; abandoned ones are dropped."""
        batch, room, now = [], self.max_batch_texts, time.monotonic()
        while self.queue and room:
            job = self.queue[0]
            if job.future.done():  # the client went away (cancelled)
                self.queue.popleft()
                continue
            if job.next_item == 0 and now - job.enqueued > self.max_wait_s:
                self.queue.popleft()
                job.future.set_exception(ServiceUnavailable(f"waited over {self.max_wait_s * 1000:g} ms for a batch"))
                continue
            stop = min(len(job.items), job.next_item + room)
            batch.append((job, job.next_item, stop))
            room -= stop - job.next_item
            job.next_item = stop
            if stop == len(job.items):
                self.queue.popleft()
        return batch

    async def run_batch(self, batch: list[tuple[Job, int, int]]) -> None:
        items = [item for job, start, stop in batch for item in job.items[start:stop]]
        try:
            answers = await asyncio.get_running_loop().run_in_executor(self.threads, self.run, items)
            if len(answers) != len(items):
                raise RuntimeError(f"the model answered {len(answers)} of the batch's {len(items)} items")
        except Exception as error:
            if len(batch) > 1:  # whose texts failed? Each request alone: one client's bad text fails only its own request
                for part in batch:
                    await self.run_batch([part])
                return
            for job, _, _ in batch:  # the model failed on this request's texts: it hears why
                if not job.future.done():
                    job.future.set_exception(error)
                if job in self.queue:  # a request split over batches: its other parts will not run
                    self.queue.remove(job)
            return
        offset = 0
        for job, start, stop in batch:
            job.answers[start:stop] = answers[offset : offset + stop - start]
            offset += stop - start
            job.unanswered -= stop - start
            if job.unanswered == 0 and not job.future.done():
                job.future.set_result(job.answers)
