"""services/backends/batching.py on a real event loop with real worker threads: what runs together,
in what order the answers come back, and what is refused."""

import asyncio
import threading
import time

import pytest
from bentoml.exceptions import ServiceUnavailable

from services.backends.batching import IdleDispatchBatcher


class RecordingModel:
    """Answers each item with its double; records every batch it was given. With `hold_first`,
    the first batch runs until that event is set, so that a test decides what arrives meanwhile
    (not the scheduler of a busy machine)."""

    def __init__(self, hold_first: threading.Event | None = None) -> None:
        self.hold_first = hold_first
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self.hold_first is not None and len(self.batches) == 1:
            assert self.hold_first.wait(timeout=30), "the test never released the first batch"
        return [2 * item for item in items]


async def first_batch_running(model: RecordingModel) -> None:
    while not model.batches:
        await asyncio.sleep(0.001)


def test_a_request_that_finds_the_model_idle_runs_at_once_alone_and_off_the_event_loop():
    model = RecordingModel()

    async def main():
        batcher = IdleDispatchBatcher(model, max_batch_texts=64, max_wait_ms=10_000)
        started = time.perf_counter()
        answer = await batcher([1, 2, 3])
        return answer, time.perf_counter() - started

    answer, seconds = asyncio.run(main())
    assert answer == [2, 4, 6] and model.batches == [[1, 2, 3]]
    assert seconds < 1.0  # nothing waited for company (that would take max_wait: 10 s)
    assert threading.main_thread().name not in model.threads


def test_requests_that_arrive_while_a_batch_runs_go_together_in_the_next_one():
    release = threading.Event()
    model = RecordingModel(hold_first=release)

    async def main():
        batcher = IdleDispatchBatcher(model, max_batch_texts=64, max_wait_ms=10_000)
        first = asyncio.ensure_future(batcher([1]))
        await first_batch_running(model)
        rest = [asyncio.ensure_future(batcher([10 * i, 10 * i + 1])) for i in range(1, 4)]
        while len(batcher.queue) < 3:  # all three wait behind the running batch
            await asyncio.sleep(0.001)
        release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first == [2] and rest == [[20, 22], [40, 42], [60, 62]]
    assert model.batches == [[1], [10, 11, 20, 21, 30, 31]]


def test_a_request_larger_than_a_batch_runs_in_several_and_its_answers_stay_in_order():
    model = RecordingModel()

    async def main():
        batcher = IdleDispatchBatcher(model, max_batch_texts=4, max_wait_ms=1000)
        return await asyncio.gather(batcher(list(range(10))), batcher([100]))

    big, small = asyncio.run(main())
    assert big == [2 * i for i in range(10)] and small == [200]
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 100]]


def test_a_request_that_waited_too_long_for_a_batch_is_refused():
    release = threading.Event()
    model = RecordingModel(hold_first=release)

    async def main():
        batcher = IdleDispatchBatcher(model, max_batch_texts=1, max_wait_ms=50)
        first = asyncio.ensure_future(batcher([1]))
        await first_batch_running(model)
        late = asyncio.ensure_future(batcher([2]))
        await asyncio.sleep(0.1)  # the late request has waited longer than max_wait when the batch ends
        release.set()
        await first
        with pytest.raises(ServiceUnavailable, match="waited over 50 ms"):
            await late

    asyncio.run(main())
    assert model.batches == [[1]]  # the refused text never ran


def test_a_failing_batch_is_rerun_request_by_request_so_only_the_failing_request_fails():
    calls = []

    def model(items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("onnxruntime failed")
        return items

    async def main():
        batcher = IdleDispatchBatcher(model, max_batch_texts=8, max_wait_ms=1000)
        first = asyncio.ensure_future(batcher(["a"]))
        await asyncio.sleep(0)
        queued = [asyncio.ensure_future(batcher(texts)) for texts in (["bad", "b"], ["c"])]
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        return results, await batcher(["d"])

    (first, failed, good), after = asyncio.run(main())
    assert first == ["a"] and good == ["c"] and after == ["d"]  # the batcher goes on
    assert isinstance(failed, RuntimeError) and "onnxruntime failed" in str(failed)
    # [a], then [bad, b, c] together (fails), then each request alone: [bad, b] fails, [c] runs.
    assert calls == [["a"], ["bad", "b", "c"], ["bad", "b"], ["c"], ["d"]]


def test_the_shared_runners_batcher_runs_as_many_batches_at_once_as_it_has_threads():
    """concurrent_batches=2 (the shared runner on two cores): a second request that arrives while
    a batch runs starts its own batch at once, in another thread. The model only answers once two
    batches are inside it together (a barrier), so a batcher that ran them one after the other
    would time out here."""
    barrier = threading.Barrier(2, timeout=5)
    model = RecordingModel()

    def two_at_a_time(items):
        barrier.wait()
        return model(items)

    async def main():
        batcher = IdleDispatchBatcher(two_at_a_time, max_batch_texts=64, max_wait_ms=5000, concurrent_batches=2)
        first = asyncio.ensure_future(batcher([1]))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(batcher([2]))
        return await asyncio.gather(first, second)

    assert asyncio.run(main()) == [[2], [4]]
    assert sorted(model.batches) == [[1], [2]]
    assert len(model.threads) == 2


def test_a_request_split_over_batches_running_at_once_gets_every_answer_in_order():
    # The shared runner on a CPU runs one batch per core. A request of 256 texts in batches of
    # 64 then has slices running side by side; here the slice 128-191 runs slower than the
    # slice 192-255, so the last slice finishes first: every answer must still come back, each
    # in its text's place.
    def model(items):
        if items[0] == 128:
            time.sleep(0.3)
        return [2 * item for item in items]

    async def main():
        batcher = IdleDispatchBatcher(model, max_batch_texts=64, max_wait_ms=10_000, concurrent_batches=2)
        return await asyncio.gather(batcher(list(range(256))), batcher([1000]))

    big, small = asyncio.run(main())
    assert big == [2 * i for i in range(256)] and small == [2000]
