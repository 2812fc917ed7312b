"""The shared runner's socket (services/backends/shared_runner.py) between real asyncio
endpoints on a real Unix socket: an HTTP worker's request never waits on a connection that is
gone, and a runner stopping (SIGTERM) finishes what it took and refuses the rest with 503.

The runner's side is the real RunnerSocketServer, its batchers and frames; only the function a
batch runs is the test's own (an upper-casing of the texts, slow on demand), since what is
tested is the hop, not a model (tests/test_shared_runner.py runs the real models through it)."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.backends.shared_runner import BATCHED_APIS, FrameProtocol, RunnerConnection, RunnerSocketServer, SharedRunnerClient
from services.errors import ApiError

FAST_FAILURE_S = 1.0  # a request on a lost connection fails within this, far under any request timeout


def socket_in(folder: str) -> Path:
    return Path(folder) / "runner.sock"


class PeerThatHangsUp(FrameProtocol):
    """A runner that dies as it accepts: each connection is closed `turns` turns of its event
    loop after it was made (0: at once), before any answer."""

    def __init__(self, turns: int) -> None:
        super().__init__(lambda message: None, lambda exc: None)
        self.turns = turns

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self.hang_up())

    async def hang_up(self) -> None:
        for _ in range(self.turns):
            await asyncio.sleep(0)
        self.transport.close()


class UpperCasing:
    """What RunnerSocketServer's batchers call: per item {"answer", "queue_s", "inference_s"},
    after waiting for `release` while it is set up (a batch the test holds running)."""

    def __init__(self) -> None:
        self.release: threading.Event | None = None
        self.started = threading.Event()

    def __call__(self, items: list) -> list[dict]:
        self.started.set()
        if self.release is not None:
            assert self.release.wait(timeout=30)
        return [{"answer": item.text.upper(), "queue_s": 0.0, "inference_s": 0.0} for item in items]


def runner_with(run: Callable[[list], list]) -> SimpleNamespace:
    apis = {api: run for api in BATCHED_APIS}  # the batched calls are plain methods of ModelRunner
    return SimpleNamespace(**apis, loaded_models=SimpleNamespace(local=lambda: ["m:1"]))


async def started_runner(path: Path, run: Callable[[list], list] | None = None) -> RunnerSocketServer:
    """The real RunnerSocketServer listening on `path`, its batches running `run`."""
    runner = RunnerSocketServer(runner_with(run or UpperCasing()), max_batch_texts=8, max_latency_ms=10_000, concurrent_batches=1)
    await runner.start(path)
    return runner


def client_of(path: Path) -> SharedRunnerClient:
    """An HTTP worker's client of the one runner at `path`."""
    client = SharedRunnerClient(fallback=None, runner_workers=1)
    client.connections = [RunnerConnection(path)]
    return client


async def expect_fast_503(call) -> ApiError:
    started = time.monotonic()
    with pytest.raises(ApiError) as refused:
        await asyncio.wait_for(call, FAST_FAILURE_S)
    assert refused.value.status == 503 and "retry" in refused.value.message
    assert time.monotonic() - started < FAST_FAILURE_S
    return refused.value


@pytest.mark.parametrize("turns", range(6))
def test_a_runner_that_hangs_up_fails_every_request_at_once_and_no_dead_connection_is_kept(turns):
    async def main():
        with tempfile.TemporaryDirectory() as folder:
            path = socket_in(folder)
            server = await asyncio.get_running_loop().create_unix_server(lambda: PeerThatHangsUp(turns), str(path))
            connection = RunnerConnection(path)
            for _ in range(10):
                await expect_fast_503(connection.call({"api": "loaded_models"}))
                assert connection.protocol is None or connection.protocol.usable
            server.close()
            # The runner back (BentoML restarts it): the next request connects to it.
            runner = await started_runner(path)
            answer = await asyncio.wait_for(connection.call({"api": "loaded_models"}), 5)
            assert answer["answers"] == ["m:1"]
            await runner.drain()

    asyncio.run(main())


@pytest.mark.parametrize("turns", range(10))
def test_a_runner_that_dies_with_the_connection_in_its_backlog_fails_the_request_at_once(turns):
    # The kernel completes a connect to a listening socket before the runner accepts it; the
    # runner then dies (`turns` event-loop turns into the request) without ever accepting.
    async def main():
        with tempfile.TemporaryDirectory() as folder:
            path = socket_in(folder)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(path))
            listener.listen(8)
            connection = RunnerConnection(path)
            request = asyncio.get_running_loop().create_task(connection.call({"api": "loaded_models"}))
            for _ in range(turns):
                await asyncio.sleep(0)
            listener.close()
            await expect_fast_503(request)
            assert connection.protocol is None or connection.protocol.usable
            await expect_fast_503(connection.call({"api": "loaded_models"}))  # and the next one too

    asyncio.run(main())


def test_a_request_that_left_while_connecting_leaves_no_old_attempt_behind():
    async def main():
        with tempfile.TemporaryDirectory() as folder:
            path = socket_in(folder)
            runner = await started_runner(path)
            connection = RunnerConnection(path)
            left = asyncio.get_running_loop().create_task(connection.call({"api": "loaded_models"}))
            await asyncio.sleep(0)  # its connection attempt has started
            left.cancel()

            async def attempt_finished() -> None:  # without the request that started it
                while connection.protocol is None:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(attempt_finished(), 5)
            assert connection.connecting is None
            connection.protocol.transport.close()  # the runner's connection is lost
            await asyncio.sleep(0.05)
            answer = await asyncio.wait_for(connection.call({"api": "loaded_models"}), FAST_FAILURE_S)
            assert answer["answers"] == ["m:1"]  # a new connection, not the old attempt's closed one
            await runner.drain()

    asyncio.run(main())


def test_a_stopping_runner_finishes_what_it_took_and_refuses_new_texts_with_503():
    async def main():
        with tempfile.TemporaryDirectory() as folder:
            path = socket_in(folder)
            run = UpperCasing()
            run.release = threading.Event()
            runner = await started_runner(path, run)
            client = client_of(path)
            taken = asyncio.get_running_loop().create_task(client.batched("classify_batch", "m:1", ["a", "b"], time.time()))
            await asyncio.to_thread(run.started.wait, 10)  # its batch is running
            draining = asyncio.get_running_loop().create_task(runner.drain())
            await asyncio.sleep(0.05)
            refused = await expect_fast_503(client.batched("classify_batch", "m:1", ["c"], time.time()))
            assert "stopping" in refused.message
            assert not draining.done() and path.exists()  # still finishing the request it took
            run.release.set()
            answers = await asyncio.wait_for(taken, 10)
            assert [a["answer"] for a in answers] == ["A", "B"]
            await asyncio.wait_for(draining, 10)
            assert not path.exists()

    asyncio.run(main())


class WritesCounted:
    """A real transport whose writes are recorded as they pass (how many, and their bytes)."""

    def __init__(self, transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class RunnerWithWritesCounted(RunnerSocketServer):
    """The real RunnerSocketServer, each connection's transport wrapped in WritesCounted."""

    counted: list[WritesCounted]

    def connection(self) -> FrameProtocol:
        protocol = super().connection()
        made = protocol.connection_made

        def connection_made(transport) -> None:
            made(WritesCounted(transport))
            self.counted.append(protocol.transport)

        protocol.connection_made = connection_made
        return protocol


def test_the_answers_of_one_batch_leave_the_runner_in_one_write_each_to_its_own_request():
    async def main():
        with tempfile.TemporaryDirectory() as folder:
            path = socket_in(folder)
            run = UpperCasing()
            run.release = threading.Event()
            runner = RunnerWithWritesCounted(runner_with(run), max_batch_texts=8, max_latency_ms=10_000, concurrent_batches=1)
            runner.counted = []
            await runner.start(path)
            client = client_of(path)
            loop = asyncio.get_running_loop()
            first = loop.create_task(client.batched("classify_batch", "m:1", ["first"], time.time()))
            await asyncio.to_thread(run.started.wait, 10)  # the first batch holds the runner: the next four queue
            queued = [loop.create_task(client.batched("classify_batch", "m:1", [f"t{i}a", f"t{i}b"], time.time())) for i in range(4)]
            while len(runner.batchers["classify_batch"].queue) < 4:  # all four requests have arrived and wait
                await asyncio.sleep(0.005)
            run.release.set()
            answers = await asyncio.wait_for(asyncio.gather(first, *queued), 10)
            await runner.drain()
            return answers, runner.counted

    answers, counted = asyncio.run(main())
    assert [[a["answer"] for a in request] for request in answers] == [["FIRST"], *[[f"T{i}A", f"T{i}B"] for i in range(4)]]
    [connection] = counted
    # Two batches ran (the first request, then the four that queued behind it): two writes, the
    # second holding four answer frames, where one write per request made five.
    assert len(connection.writes) == 2
    assert [write.count(b'"answers"') for write in connection.writes] == [1, 4]


def test_a_stopping_runner_leaves_the_socket_of_the_runner_that_replaced_it():
    async def main():
        with tempfile.TemporaryDirectory() as folder:
            path = socket_in(folder)
            old = await started_runner(path)
            new = await started_runner(path)  # the restarted runner binds the same path
            await old.drain()
            assert path.exists()
            answer = await asyncio.wait_for(RunnerConnection(path).call({"api": "loaded_models"}), 5)
            assert answer["answers"] == ["m:1"]
            await new.drain()
            assert not path.exists()

    asyncio.run(main())


def test_a_model_the_runner_lacks_reads_as_a_503_that_says_so_not_a_500():
    # The HTTP worker serves the name, the runner does not (its sessions failed to build there,
    # or a reload is under way): the runner's NotFound crosses the socket and the service tells
    # the client to retry, naming the model.
    from bentoml.exceptions import NotFound

    from services.service import runner_errors

    def lacks_the_model(items: list) -> list:
        raise NotFound(f"model {items[0].model.partition(':')[0]!r} is not loaded")

    async def main():
        with tempfile.TemporaryDirectory() as folder:
            path = socket_in(folder)
            runner = await started_runner(path, lacks_the_model)
            client = client_of(path)
            with pytest.raises(ApiError) as refused:
                with runner_errors():
                    await client.batched("classify_batch", "kim-cnn-trec6:abc", ["a"], time.time())
            await runner.drain()
            return refused.value

    refused = asyncio.run(main())
    assert refused.status == 503 and refused.headers == {"Retry-After": "1"}
    assert "'kim-cnn-trec6' is not loaded" in refused.message and "retry" in refused.message
