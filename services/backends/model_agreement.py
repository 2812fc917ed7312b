"""Models loaded, reloaded and unloaded while the server runs: TEXTSERVE_MODEL_CONTROL=explicit
(the repository API), or poll (the same, driven by the zoo folder's changes: ZooPoller at the end).

Several processes serve: the HTTP workers (each with its own sessions when inline) and, with
TEXTSERVE_INFERENCE=runner, the runner processes that own the sessions. A load answered 200
must mean that every one of them serves the new version, so they agree through files in one
folder per server (TEXTSERVE_MODEL_STATE_DIR, default the temporary folder, then
textserve-<arbiter pid>-<its start time>-models/; the arbiter is BentoML's parent of every worker):

    desired.json       {"generation": g, "models": {name: store tag, or null when unloaded},
                        "prepare": {name: store tag}}
                       written by the process that answers a load or unload, one change at a
                       time (an asyncio lock, then an flock on `lock`); created at start-up from
                       the startup model set by the first process to start, so that a worker
                       BentoML restarts later serves what the others serve, not what the zoo
                       held at start
    acks/<who>.json    each process's answer: {"generation": the last one it has applied,
                       "loaded": the same, written once its swap is done, "failures": {name:
                       reason}, "serving": {name: tag}, "draining": [tags still answering]}

A load is two generations, so that a bundle one process refuses never serves anywhere:
1. prepare: every process reads the new version's bundle from the BentoML store by its tag,
   checks its sha256s and builds and warms up its sessions (the process that owns sessions:
   each HTTP worker inline, the runner with TEXTSERVE_INFERENCE=runner), serving nothing new;
   if any refuses, the publisher drops the prepared version everywhere and answers 400 with
   the reason, and nothing has changed;
2. commit: every process swaps the prepared version in under its name (with the shared runner,
   an HTTP worker swaps once the runner has) and confirms; the answer is 200 once all have.
The old version's sessions are freed once the requests in flight on it have finished (they
finish on it: a request picks its model's tag once, when it starts); the runner frees a tag
only when no HTTP worker's ack lists it as serving or draining. An unload is one commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path


from services.config import ServiceSettings
from services.errors import ApiError

logger = logging.getLogger("bentoml.textserve")
WATCH_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Desired:
    generation: int
    models: dict[str, str | None]  # name -> store tag; None: unloaded
    prepare: dict[str, str] = field(default_factory=dict)  # name -> tag to build, not yet to serve


def state_folder(settings: ServiceSettings, parent_pid: int | None = None) -> Path:
    """This server's folder: named by its arbiter's pid and start time, so that a server started
    later with the same pid (a container restarted in the same pod keeps /tmp) starts afresh."""
    parent_pid = parent_pid or os.getppid()
    folder = settings.model_state_dir or tempfile.gettempdir()
    return Path(folder) / f"textserve-{parent_pid}-{process_start(parent_pid)}-models"


def process_start(pid: int) -> str:
    """When `pid` started, in clock ticks since boot (Linux /proc), or "" where unknown."""
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def participants(settings: ServiceSettings) -> list[str]:
    """Every process that serves models, as named in acks/: http-1..N, runner-1..R."""
    names = [f"http-{index}" for index in range(1, settings.http_workers + 1)]
    if settings.inference_mode == "runner":
        names += [f"runner-{index}" for index in range(1, settings.runner_workers + 1)]
    return names


def write_atomically(path: Path, content: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(content))
    os.replace(temporary, path)  # readers see the old file or the new one, never half of one


class ModelState:
    """The files through which one server's processes agree on its model set."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.desired_path = folder / "desired.json"
        self.acks_folder = folder / "acks"
        self.seen: tuple[int, int] | None = None
        self.in_process = asyncio.Lock()

    def initialise(self, startup: dict[str, str]) -> Desired:
        """The model set to serve: the one already agreed on, or `startup` (name -> tag) if this
        is the server's first process to get here."""
        self.acks_folder.mkdir(parents=True, exist_ok=True)
        if not self.desired_path.is_file():  # created only if absent, without the lock a change may hold
            temporary = self.folder / f".desired.{os.getpid()}.tmp"
            temporary.write_text(json.dumps({"generation": 0, "models": startup, "prepare": {}}))
            with contextlib.suppress(FileExistsError):
                os.link(temporary, self.desired_path)  # atomic: the first process to get here wins
            temporary.unlink()
        return self.read()

    def read(self) -> Desired:
        content = json.loads(self.desired_path.read_text())
        return Desired(int(content["generation"]), dict(content["models"]), dict(content.get("prepare", {})))

    def write(self, desired: Desired) -> None:
        write_atomically(self.desired_path, {"generation": desired.generation, "models": desired.models,
                                             "prepare": desired.prepare})

    def changed(self) -> bool:
        """Whether desired.json changed since the last call (one stat)."""
        try:
            status = os.stat(self.desired_path)
        except FileNotFoundError:
            return False
        signature = (status.st_mtime_ns, status.st_ino)
        if signature == self.seen:
            return False
        self.seen = signature
        return True

    @contextlib.asynccontextmanager
    async def locked(self):
        """One change at a time across every process: this process's requests queue on an
        asyncio lock (not in threads), then one at a time takes the flock, polled."""
        async with self.in_process:
            lock = open(self.folder / "lock", "a")
            try:
                while True:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(WATCH_INTERVAL_S / 2)
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
                lock.close()

    def acknowledge(self, participant: str, generation: int, loaded: int, failures: dict[str, str],
                    serving: dict[str, str] | None = None, draining: list[str] | None = None) -> None:
        write_atomically(self.acks_folder / f"{participant}.json",
                         {"generation": generation, "loaded": loaded, "failures": failures, "serving": serving or {},
                          "draining": draining or [], "pid": os.getpid()})

    def acks(self) -> dict[str, dict]:
        found = {}
        for path in self.acks_folder.glob("*.json"):
            try:
                found[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced right now: read again on the next poll
        return found

    async def wait_for(self, who: list[str], generation: int, timeout_s: float, field_name: str = "generation") -> dict[str, dict]:
        """The acks of `who` once each has reached `generation` in `field_name`; 504 naming
        the processes that have not after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            acks = self.acks()
            behind = [name for name in who if acks.get(name, {}).get(field_name, -1) < generation]
            if not behind:
                return acks
            if time.monotonic() > deadline:
                raise ApiError(504, f"processes {behind} did not confirm the model change within {timeout_s:g} s "
                                    "(TEXTSERVE_MODEL_LOAD_TIMEOUT_S); they are still loading or not running")
            await asyncio.sleep(WATCH_INTERVAL_S / 2)


async def watch(state: ModelState, applied: Callable[[], int], apply: Callable[[Desired], Awaitable[None]],
                wake: asyncio.Event, every_tick: Callable[[], None] | None = None) -> None:
    """Apply each new generation of desired.json as it appears (every WATCH_INTERVAL_S, or at
    once when `wake` is set by this process's own change), and call `every_tick` each time.
    Runs until cancelled."""
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), WATCH_INTERVAL_S)
        wake.clear()
        if every_tick is not None:
            every_tick()
        if not state.changed():
            continue
        try:
            desired = state.read()
            if desired.generation > applied():
                await apply(desired)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not stop this process from following later changes
            logger.exception("applying the model set failed")
