"""The shared runner's hop: every HTTP worker's texts to one inference process, over a Unix socket.

TEXTSERVE_INFERENCE=runner (the default where TEXTSERVE_DEVICE resolves to cuda) runs the
models in one separate process, ModelRunner (runner.py), started and supervised by BentoML
through `bentoml.depends`: on a GPU one process must own the device (one CUDA context, one
copy of each model) and one batcher must merge the texts of every HTTP worker.

The batched calls (classify_batch, score_batch, classify_image_batch, and the readiness
question) do not go through BentoML's HTTP client: `make bench` measured that hop, a pickled
HTTP request through BentoML's whole stack on both sides, at 22-536 texts/s against 3,038
inline, with 500 answers from its client reusing connections the runner had closed, and its
CorkDispatcher keeping after a burst the wait it learnt during the burst (docs/performance-history.md).
Here instead:

    HTTP worker                      runner process
    SharedRunnerClient  --frames-->  RunnerSocketServer -> IdleDispatchBatcher per API
      one connection per runner      (batching.py: what queued while a batch ran is the next
      worker, requests multiplexed   batch, across every HTTP worker) -> ModelRunner's methods
      by id                 <--frames--  answers with their queue wait and inference time

A frame is a 4-byte big-endian length and an orjson object. A request is one frame
{"id", "api", "model", "items" (texts, or images as rows), "sent_at"}; its answer one frame
{"id", "answers": [...], "queue_s", "inference_s"} or {"id", "status", "error"}.

What happens when the runner dies: every request waiting on it fails at once with 503 ("the
shared inference runner is unreachable...; retry shortly", Retry-After), BentoML's supervisor
starts a new runner, and the next request connects to it (requests in the meantime fail fast
the same way, without waiting). On SIGTERM the runner stops accepting connections, answers a
request that still comes on an open one with that 503 ("the runner is stopping"), finishes every
request it had taken, then BentoML stops it. The other runner APIs (explain, next words,
generation, vectors, neighbours) are one call per request and keep BentoML's own client.

The socket's path is derived from the process that started both (BentoML's arbiter, the
parent of every worker), so that two servers on one machine never meet:
TEXTSERVE_RUNNER_SOCKET_DIR (default: the temporary folder)/textserve-<parent pid>-runner-<worker>.sock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
from bentoml.exceptions import BentoMLException, ServiceUnavailable

from services.backends.batching import IdleDispatchBatcher
from services.backends.runner_errors import InferenceFailed, ModelNotLoaded
from services.config import SETTINGS
from services.errors import RETRY_AFTER_S, ApiError

logger = logging.getLogger("bentoml.textserve")
LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 256 * 1024 * 1024  # far above any request the HTTP limits admit
BATCHED_APIS = ("classify_batch", "score_batch", "classify_image_batch")
CONNECT_TIMEOUT_S = 1.0


def socket_path(worker_index: int, parent_pid: int | None = None, folder: str | None = None) -> Path:
    """Where runner worker `worker_index` (1-based, BentoML's numbering) listens."""
    folder = folder or SETTINGS.runner_socket_dir or tempfile.gettempdir()
    return Path(folder) / f"textserve-{parent_pid or os.getppid()}-runner-{worker_index}.sock"


def frame(message: dict) -> bytes:
    body = orjson.dumps(message, option=orjson.OPT_SERIALIZE_NUMPY)
    return LENGTH.pack(len(body)) + body


class FrameProtocol(asyncio.Protocol):
    """Length-prefixed frames over a stream; each whole frame goes to `on_message`."""

    def __init__(self, on_message: Callable[[dict], None], on_lost: Callable[[Exception | None], None]) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = False  # connection_lost has run: nothing sent now would be answered
        self.outgoing: list[bytes] = []  # frames sent in this turn of the event loop, written together at its end

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(self.buffer)
            if size > MAX_FRAME_BYTES:
                self.transport.close()
                return
            if len(self.buffer) < LENGTH.size + size:
                return
            body = bytes(self.buffer[LENGTH.size:LENGTH.size + size])
            del self.buffer[:LENGTH.size + size]
            self.on_message(orjson.loads(body))

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.on_lost(exc)

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.lost and not self.transport.is_closing()

    def send(self, message: dict) -> bool:
        """Send one frame at the end of this turn of the event loop, with the others sent in it;
        False when the connection is closing or gone (nothing was sent)."""
        if not self.usable:
            return False
        if not self.outgoing:
            self.loop.call_soon(self.flush)
        self.outgoing.append(frame(message))
        return True

    def flush(self) -> None:
        """Write the frames of this turn of the event loop in one write: the answers of a batch
        (or the requests of a turn) cost one system call and one wake-up of the other side, not
        one each (`python -m loadtests.profile_service --env TEXTSERVE_INFERENCE=runner`, every
        process counted: 4.1 -> 2.2 writes and 1.4 -> 0.9 context switches per request)."""
        frames, self.outgoing = self.outgoing, []
        if frames and self.usable:
            self.transport.write(b"".join(frames))


# --------------------------------------------------------------------------- the runner's side

@dataclass(frozen=True)
class QueuedItem:
    """One text (or image) of a request, as ModelRunner's batched methods read it."""

    model: str
    text: object  # a text, or an image's rows (run_by_model's payload picks the field)
    sent_at: float

    @property
    def image(self):
        return self.text


class RunnerSocketServer:
    """In the runner process: answers the batched APIs of every HTTP worker's connections
    through one IdleDispatchBatcher per API (so texts from all workers share batches)."""

    def __init__(self, runner, max_batch_texts: int, max_latency_ms: int, concurrent_batches: int) -> None:
        self.runner = runner
        self.batchers = {api: IdleDispatchBatcher(getattr(runner, api), max_batch_texts, max_latency_ms, concurrent_batches)
                         for api in BATCHED_APIS}
        self.server: asyncio.AbstractServer | None = None
        self.in_flight: set[asyncio.Task] = set()
        self.path: Path | None = None
        self.inode: int | None = None  # of the socket file this process bound
        self.stopping = False

    async def start(self, path: Path) -> None:
        path.unlink(missing_ok=True)  # a socket left by a runner that was killed
        self.path = path
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(self.connection, str(path))
        self.inode = path.stat().st_ino
        logger.info("shared runner listening on %s", path)

    def connection(self) -> FrameProtocol:
        protocol: FrameProtocol

        def on_message(message: dict) -> None:
            if self.stopping:  # asked after SIGTERM, on a connection opened before it: the HTTP worker says "retry"
                protocol.send({"id": message["id"], "status": 503, "kind": "Stopping",
                               "error": "the runner is stopping (SIGTERM) and takes no new texts"})
                return
            task = asyncio.get_running_loop().create_task(self.answer(protocol, message))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

        protocol = FrameProtocol(on_message, lambda exc: None)
        return protocol

    async def answer(self, protocol: FrameProtocol, message: dict) -> None:
        request_id = message["id"]
        api = message["api"]
        try:
            if api == "loaded_models":
                protocol.send({"id": request_id, "answers": self.runner.loaded_models.local()})
                return
            model, sent_at = message["model"], message["sent_at"]
            timed = await self.batchers[api]([QueuedItem(model, item, sent_at) for item in message["items"]])
        except BentoMLException as error:
            protocol.send({"id": request_id, "status": int(error.error_code), "error": str(error),
                           "kind": type(error).__name__})
            return
        except Exception as error:  # a bug on the runner's side: the client hears of it, the runner goes on
            logger.exception("shared runner failed on %s", api)
            protocol.send({"id": request_id, "status": 500, "error": f"{type(error).__name__}: {error}", "kind": "Exception"})
            return
        protocol.send({"id": request_id, "answers": [t["answer"] for t in timed],
                       "queue_s": [t["queue_s"] for t in timed], "inference_s": [t["inference_s"] for t in timed]})

    async def drain(self, timeout_s: float = 30) -> None:
        """SIGTERM: stop accepting connections, refuse new requests on the open ones, and finish
        every request already taken (up to `timeout_s`)."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.in_flight and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(list(self.in_flight), timeout=left)
        if self.in_flight:
            logger.warning("shared runner stopping with %d requests unfinished after %g s", len(self.in_flight), timeout_s)
        # Only this process's socket: a runner restarted with the same index may have bound the path since.
        with contextlib.suppress(FileNotFoundError):
            if self.path is not None and self.path.stat().st_ino == self.inode:
                self.path.unlink()


# --------------------------------------------------------------------------- the HTTP worker's side

class RunnerConnection:
    """One connection to one runner worker, requests multiplexed by id. No request waits on a
    connection that is gone: one whose frame cannot be sent, or whose connection is lost before
    its answer, fails at once with 503, and the next request connects afresh."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.protocol: FrameProtocol | None = None
        self.waiting: dict[int, tuple[FrameProtocol, asyncio.Future]] = {}  # id -> (its connection, its answer)
        self.ids = itertools.count()
        self.connecting: asyncio.Task | None = None

    async def connected(self) -> FrameProtocol:
        if self.protocol is not None and self.protocol.usable:
            return self.protocol
        if self.connecting is None:  # one connection attempt at a time, shared by the requests waiting for it
            self.connecting = asyncio.get_running_loop().create_task(self.connect())
            # Forgotten once it ends, whether or not anyone still waits for it (a client that
            # left while connecting), so that a later request never reuses an old attempt.
            self.connecting.add_done_callback(self.connect_ended)
        return await asyncio.shield(self.connecting)

    def connect_ended(self, attempt: asyncio.Task) -> None:
        if self.connecting is attempt:
            self.connecting = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here: every waiter may have left

    async def connect(self) -> FrameProtocol:
        loop = asyncio.get_running_loop()

        def new_protocol() -> FrameProtocol:
            protocol = FrameProtocol(self.on_message, lambda exc: self.on_lost(protocol))
            return protocol

        try:
            _, protocol = await asyncio.wait_for(loop.create_unix_connection(new_protocol, str(self.path)), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as error:
            raise unreachable(f"{type(error).__name__}: {error}") from None
        if not protocol.usable:  # the runner closed it as soon as it accepted it (it was stopping or dying)
            raise unreachable("the runner closed the connection at once")
        self.protocol = protocol
        return protocol

    def on_message(self, message: dict) -> None:
        _, future = self.waiting.pop(message["id"], (None, None))
        if future is not None and not future.done():
            future.set_result(message)

    def on_lost(self, protocol: FrameProtocol) -> None:
        """`protocol`'s connection is gone: the requests waiting on it fail now (not the ones on
        a newer connection, if there is one already)."""
        if self.protocol is protocol:
            self.protocol = None
        for request_id, (owner, future) in list(self.waiting.items()):
            if owner is protocol:
                del self.waiting[request_id]
                if not future.done():
                    future.set_exception(unreachable("the connection was lost; it is being restarted"))

    async def call(self, message: dict) -> dict:
        protocol = await self.connected()
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = (protocol, future)
        try:
            if not protocol.send({**message, "id": request_id}):  # lost since it was connected
                self.on_lost(protocol)
            return await future
        finally:
            self.waiting.pop(request_id, None)


def unreachable(reason: str) -> ApiError:
    return ApiError(503, f"the shared inference runner is unreachable ({reason}); retry shortly", {"Retry-After": RETRY_AFTER_S})


def refusal(answer: dict) -> BentoMLException:
    """The runner's refusal as the BentoML exception the service already turns into a client
    error (service.py runner_error)."""
    kind = {"ServiceUnavailable": ServiceUnavailable, "ModelNotLoaded": ModelNotLoaded,
            "NotFound": ModelNotLoaded}.get(answer.get("kind"), InferenceFailed)
    return kind(answer["error"])


class SharedRunnerClient:
    """In each HTTP worker: `batched(api, ...)` over the runner's socket, as the in-process
    runner offers it; `to_async.<api>` (and loaded_models) for the other APIs through `fallback`
    (BentoML's proxy of the runner service)."""

    def __init__(self, fallback, runner_workers: int) -> None:
        self.connections = [RunnerConnection(socket_path(index)) for index in range(1, runner_workers + 1)]
        self.turn = itertools.cycle(range(len(self.connections)))
        self.fallback = fallback
        self.to_async = self

    def __getattr__(self, api: str):
        return getattr(self.fallback.to_async, api)  # explain, next_words, generate, word_vectors, neighbors

    def connection(self) -> RunnerConnection:
        return self.connections[next(self.turn)]

    async def batched(self, api: str, model: str, payloads: list, sent_at: float) -> list[dict]:
        """One request's texts (or image rows) through the runner's batcher for `api`: per
        payload {"answer", "queue_s", "inference_s"}."""
        answer = await self.connection().call({"api": api, "model": model, "items": payloads, "sent_at": sent_at})
        if answer.get("kind") == "Stopping":
            raise unreachable(answer["error"])
        if "error" in answer:
            raise refusal(answer)
        return [{"answer": a, "queue_s": q, "inference_s": i}
                for a, q, i in zip(answer["answers"], answer["queue_s"], answer["inference_s"])]

    async def loaded_models(self) -> list[str]:
        """The models every runner worker has loaded (none until all of them answer)."""
        loaded = None
        for connection in self.connections:
            answer = await connection.call({"api": "loaded_models"})
            if "error" in answer:  # a runner stopping
                raise unreachable(answer["error"])
            loaded = set(answer["answers"]) if loaded is None else loaded & set(answer["answers"])
        return sorted(loaded or ())

