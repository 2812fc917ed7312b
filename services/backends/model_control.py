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
import re
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import bentoml

from services.backends.inference import MANIFEST, Bundle, read_bundle, sha256_file
from services.backends.model_store import LOAD_ERRORS, bento_models, import_bundle, store_tag, zoo_folders
from services.config import ServiceSettings
from services.errors import ApiError

logger = logging.getLogger("bentoml.textserve")
BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a folder name in the zoo, never a path
WATCH_INTERVAL_S = 0.1
DRAIN_POLL_S = 0.01


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


def agreed(settings: ServiceSettings, bundles: list[Bundle], failures: dict[str, str]) -> tuple[list[Bundle], dict[str, str], int, frozenset[str]]:
    """At a process's start: the model set the server's processes agreed on (this process's
    startup set if it is the first), as (bundles, failures, generation, unloaded names)."""
    state = ModelState(state_folder(settings))
    desired = state.initialise({bundle.name: store_tag(bundle) for bundle in bundles})
    by_name = {bundle.name: bundle for bundle in bundles}
    unloaded = set()
    for name, tag in desired.models.items():
        if tag is None:
            by_name.pop(name, None)
            unloaded.add(name)
        elif name not in by_name or store_tag(by_name[name]) != tag:
            try:
                by_name[name] = stored_bundle(tag)
                failures.pop(name, None)
            except LOAD_ERRORS as error:
                by_name.pop(name, None)  # not the startup version either: nobody agreed on it
                failures[name] = reason_of(error)
    return list(by_name.values()), failures, desired.generation, frozenset(unloaded)


def stored_bundle(tag: str) -> Bundle:
    """The bundle of a BentoML store tag, every file checked against its manifest."""
    return read_bundle(bentoml.models.get(tag).path)


def reason_of(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass
class ServedModels:
    """One process's models by name: the bundle and store tag each name serves now, those that
    failed or were unloaded, and the requests in flight on each tag."""

    bundles: dict[str, Bundle]
    failed: dict[str, str]  # name -> why it is not served
    unloaded: set[str] = field(default_factory=set)
    tags: dict[str, str] = field(default_factory=dict)
    in_flight: Counter = field(default_factory=Counter)
    generation: int = 0
    prepared: dict[str, Bundle] = field(default_factory=dict)  # tag -> bundle built, not yet served
    draining: list[str] = field(default_factory=list)  # tags replaced, still answering requests in flight

    def __post_init__(self) -> None:
        self.tags = {name: store_tag(bundle) for name, bundle in self.bundles.items()}

    @contextlib.contextmanager
    def holding(self, tag: str) -> Iterator[None]:
        """Count a request on `tag` until it is answered: its sessions stay until then."""
        self.in_flight[tag] += 1
        try:
            yield
        finally:
            self.in_flight[tag] -= 1
            if not self.in_flight[tag]:
                del self.in_flight[tag]

    async def drained(self, tags: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(self.in_flight.get(tag) for tag in tags) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)

    async def apply(self, desired: Desired, prepare: Callable[[str, str, Bundle], Awaitable[None]],
                    release: Callable[[str], None], confirm: Callable[[dict[str, str]], None], drain_timeout_s: float,
                    before_swap: Callable[[str, str], Awaitable[None]] | None = None) -> None:
        """Move to `desired`, then `confirm(failures)` (name -> reason), then, once the requests
        in flight on the versions replaced have finished, `release` each and confirm again.

        - desired.prepare: read and check each new version's bundle and `prepare(name, tag,
          bundle)` it (build and warm up its sessions), serving nothing new yet; a prepared
          version that desired no longer names (an aborted load) is released.
        - desired.models: swap each name whose tag differs to its prepared version (or prepare
          it now: a process that started after the prepare phase), `before_swap(name, tag)`
          first if given; None stops the name taking requests. A version that fails keeps
          the old one serving here."""
        failures: dict[str, str] = {}
        for name, tag in desired.prepare.items():
            if tag not in self.prepared and tag != self.tags.get(name):
                try:
                    self.prepared[tag] = await self.built(name, tag, prepare)
                except Exception as error:  # BundleError, onnxruntime's, ...
                    failures[name] = reason_of(error)
                    logger.error("model %s: version %s refused: %s", name, tag, error)
        wanted = set(desired.prepare.values()) | {tag for tag in desired.models.values() if tag}
        for tag in [tag for tag in self.prepared if tag not in wanted]:
            del self.prepared[tag]  # a load that was called off
            release(tag)
        retired: list[str] = []
        for name, tag in desired.models.items():
            current = self.tags.get(name)
            if tag == current:
                if tag is None and name in self.failed:  # unloading a model that failed at start
                    self.failed.pop(name)
                    self.unloaded.add(name)
                continue
            if tag is None:
                self.bundles.pop(name, None)
                self.tags.pop(name, None)
                self.failed.pop(name, None)
                self.unloaded.add(name)
                retired.append(current)
                logger.info("model %s unloaded (was %s)", name, current)
                continue
            try:
                bundle = self.prepared.pop(tag, None) or await self.built(name, tag, prepare)
                if before_swap is not None:
                    await before_swap(name, tag)
            except Exception as error:
                failures[name] = reason_of(error)
                logger.error("model %s: version %s refused, %s keeps serving: %s", name, tag, current or "nothing", error)
                continue
            self.bundles[name], self.tags[name] = bundle, tag
            self.failed.pop(name, None)
            self.unloaded.discard(name)
            if current is not None:
                retired.append(current)
            logger.info("model %s now serves %s (was %s)", name, tag, current or "not loaded")
        self.generation = desired.generation
        self.draining = [tag for tag in retired if tag is not None]
        confirm(failures)
        await self.drained(self.draining, drain_timeout_s)
        for tag in self.draining:
            release(tag)
        if self.draining:
            self.draining = []
            confirm(failures)

    async def built(self, name: str, tag: str, prepare: Callable[[str, str, Bundle], Awaitable[None]]) -> Bundle:
        bundle = await asyncio.to_thread(stored_bundle, tag)
        await prepare(name, tag, bundle)
        return bundle


# --------------------------------------------------------------------------- the repository API

class Repository:
    """What POST /v2/repository/... (HTTP and gRPC) do, in the process that answers the call."""

    def __init__(self, settings: ServiceSettings, state: ModelState | None, wake: asyncio.Event | None, bento=None) -> None:
        self.settings = settings
        self.state = state  # None with TEXTSERVE_MODEL_CONTROL=none
        self.wake = wake
        self.bento = bento
        self.loading: set[str] = set()
        self.changes: set[asyncio.Task] = set()  # kept referenced until done

    def check_enabled(self, action: str) -> None:
        if self.state is None:
            raise ApiError(403, f"model control is off: {action} is refused while TEXTSERVE_MODEL_CONTROL=none; "
                                "start the server with TEXTSERVE_MODEL_CONTROL=explicit (or poll) to load and unload models")

    def how_to_add(self, name: str) -> str:
        """What to do to serve a model by this name, for the unknown-model 404."""
        if not BUNDLE_NAME.fullmatch(name):
            return "A model's name is its bundle folder's: letters, digits, '.', '_' and '-', never a path"
        folder = f"{name}/ in the zoo folder (TEXTSERVE_ZOO)"  # never the server's own path
        load = f"POST /v2/repository/models/{name}/load"
        if self.state is None:
            return (f"To add it: put its bundle folder {folder} (python -m training export --bundle ZOO/{name}) and restart "
                    f"the server, or run the server with TEXTSERVE_MODEL_CONTROL=explicit and {load}")
        if name in self.available():
            return f"Its bundle is in the zoo but not loaded: {load}"
        if self.settings.model_control == "poll":
            return (f"To add it: put its bundle folder {folder}; it is loaded within "
                    f"{self.settings.model_poll_interval_s} s (TEXTSERVE_MODEL_CONTROL=poll)")
        return f"To add it: put its bundle folder {folder}, then {load}"

    def available(self) -> dict[str, Path | str]:
        """Every bundle this server can serve: name -> its zoo folder, or its store tag in the bento."""
        found: dict[str, Path | str] = dict(bento_models(self.bento)) if self.bento is not None else {}
        if self.settings.zoo.is_dir():
            found.update(zoo_folders(self.settings.zoo))
        return found

    def index(self, models: ServedModels, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: every servable bundle, with its state and reason."""
        entries = []
        for name in sorted(set(self.available()) | set(models.bundles) | set(models.failed) | models.unloaded):
            if name in self.loading:
                entry = {"name": name, "state": "LOADING"}
            elif name in models.bundles:
                entry = {"name": name, "version": models.tags[name].partition(":")[2], "state": "READY"}
            elif name in models.failed:
                entry = {"name": name, "state": "UNAVAILABLE", "reason": models.failed[name]}
            else:
                entry = {"name": name, "state": "UNAVAILABLE", "reason": "unloaded" if name in models.unloaded else "not loaded"}
            if not ready_only or entry["state"] == "READY":
                entries.append(entry)
        return entries

    async def source_tag(self, name: str) -> str:
        """The store tag to load `name` from: its zoo folder imported into the store (which
        checks every sha256), or the bento's model of that name."""
        source = self.available().get(name)
        if source is None:
            raise ApiError(404, f"no bundle named {name!r} to load: the zoo {self.settings.zoo} and the bento hold "
                                f"{sorted(self.available())}; put the bundle in the zoo folder (TEXTSERVE_ZOO) first")
        if isinstance(source, str):
            return source
        try:
            await asyncio.to_thread(read_bundle, source)  # the zoo's files as they are now, against its manifest
            tag = await asyncio.to_thread(import_bundle, source)
            bundle = await asyncio.to_thread(stored_bundle, tag)
        except LOAD_ERRORS as error:
            raise ApiError(400, f"bundle {name!r} refused: {reason_of(error)}; the version already serving, if any, "
                                "keeps serving") from None
        if bundle.name != name:
            raise ApiError(400, f"bundle folder {name!r} holds model {bundle.name!r} (config.json's name); "
                                "rename one so that they agree")
        return tag

    async def load(self, name: str) -> None:
        self.check_enabled("load")
        self.loading.add(name)
        try:
            tag = await self.source_tag(name)
            await self.change_to_the_end(name, tag)
        finally:
            self.loading.discard(name)

    async def unload(self, name: str, models: ServedModels) -> None:
        self.check_enabled("unload")
        if name not in models.bundles and name not in self.available():
            raise ApiError(404, f"unknown model {name!r}; loaded models: {sorted(models.bundles)}")
        await self.change_to_the_end(name, None)

    async def change_to_the_end(self, name: str, tag: str | None) -> None:
        """`change`, which a cancelled call (a client that left, the request timeout) does not
        stop half-way: the processes must not be left with a change published and not confirmed."""
        change = asyncio.get_running_loop().create_task(self.change(name, tag))
        self.changes.add(change)
        change.add_done_callback(self.changes.discard)
        await asyncio.shield(change)

    async def change(self, name: str, tag: str | None) -> None:
        """Set `name` to `tag` in every process: prepared everywhere first, then committed; if
        any process refuses the prepared version, it is dropped everywhere and nothing changes."""
        who = participants(self.settings)
        async with self.state.locked():
            desired = self.state.read()
            previous = desired.models.get(name)
            generation = desired.generation
            if tag is not None and tag != previous:
                generation += 1
                failures = await self.publish(Desired(generation, desired.models, {name: tag}), who, name)
                if failures:
                    await self.publish(Desired(generation + 1, desired.models), who, name)  # called off
                    first = next(iter(failures.values()))
                    serving = f"version {previous.partition(':')[2]} keeps serving" if previous else "nothing was loaded"
                    raise ApiError(400, f"model {name!r} refused by {sorted(failures)}: {first}; {serving}")
            failures = await self.publish(Desired(generation + 1, {**desired.models, name: tag}), who, name)
        if failures:  # a process that started between the two phases and could not build it (rare)
            raise ApiError(500, f"model {name!r}: processes {sorted(failures)} could not take the new version "
                                f"({next(iter(failures.values()))}) and keep the previous one; the others serve the new one")

    async def publish(self, desired: Desired, who: list[str], name: str) -> dict[str, str]:
        """Write `desired` and wait until every process has confirmed it: process -> why it
        refused `name` (none when all took it). A 504 if some do not confirm in time; a
        prepare that times out is called off first (written, not waited for)."""
        self.state.write(desired)
        self.wake.set()  # this process applies it at once; the others within WATCH_INTERVAL_S
        try:
            # A little longer than the processes' own waits (for the runner), so that theirs end first.
            acks = await self.state.wait_for(who, desired.generation, self.settings.model_load_timeout_s + 10)
        except ApiError:
            if desired.prepare:
                self.state.write(Desired(desired.generation + 1, desired.models))
                self.wake.set()
            raise
        return {process: acks[process]["failures"][name] for process in who if name in acks[process].get("failures", {})}


# --------------------------------------------------------------------------- TEXTSERVE_MODEL_CONTROL=poll

def zoo_fingerprint(folder: Path) -> tuple:
    """(name, size, mtime) of every file of a bundle folder: changes while a copy is under way
    and when an export replaces the folder, so that a failed load is retried once the files change."""
    try:
        return tuple(sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                            for entry in os.scandir(folder) if entry.is_file()))
    except OSError:
        return ()


class ZooPoller:
    """Watches the zoo folder (TEXTSERVE_MODEL_CONTROL=poll): a bundle that appears or changes
    is loaded through Repository.load (the same checks and two-phase swap as POST .../load),
    one that is gone on two scans in a row is unloaded (an export replaces its folder by a
    rename: one scan may fall between the two steps). One HTTP worker polls: the one holding
    poller.lock in the server's state folder; another takes over if it dies.

    After the first scan it acts on changes only, so a model unloaded through the API stays
    unloaded until its files change. A bundle that fails its checks is logged and tried again
    when its files change (a copy still under way fails and is retried as it completes)."""

    def __init__(self, repository: "Repository", interval_s: float) -> None:
        self.repository = repository
        self.interval_s = interval_s
        self.lock_file = None
        self.known: dict[str, tuple] | None = None  # name -> fingerprint when last acted on; None: no scan yet
        self.missing_once: set[str] = set()

    def leads(self) -> bool:
        if self.lock_file is None:
            handle = open(self.repository.state.folder / "poller.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                return False
            self.lock_file = handle  # held for this process's life
        return True

    def watched(self) -> dict[str, Path]:
        settings = self.repository.settings
        found = zoo_folders(settings.zoo) if settings.zoo.is_dir() else {}
        return {name: path for name, path in found.items() if not settings.models or name in settings.models}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                if self.leads():
                    await self.scan()
            except Exception:  # never let one bad scan stop the watching
                logger.exception("model poll: scan failed; trying again in %.0f s", self.interval_s)

    async def scan(self) -> None:
        desired = self.repository.state.read()
        first, self.known = self.known is None, self.known or {}
        zoo = await asyncio.to_thread(lambda: {name: (path, zoo_fingerprint(path)) for name, path in self.watched().items()})
        for name, (path, fingerprint) in zoo.items():
            if self.known.get(name) == fingerprint:
                continue
            self.known[name] = fingerprint
            try:
                tag = f"{name}:{(await asyncio.to_thread(sha256_file, path / MANIFEST))[:16]}"
            except OSError:
                continue  # the manifest is not there yet (or not any more): next scan
            current = desired.models.get(name)
            if tag == current or (first and name in desired.models and current is None):
                continue  # serving this version already, or unloaded on purpose before this poller began
            try:
                await self.repository.load(name)
                logger.info("model poll: %s serves version %s from %s", name, tag.partition(":")[2], path)
            except ApiError as error:
                logger.error("model poll: %s not loaded: %s", name, error.message)
                if error.status >= 500:  # the server's trouble (a process slow or restarting), not the bundle's: try it again next scan
                    del self.known[name]
        self.missing_once &= set(self.known) - set(zoo)
        for name in set(self.known) - set(zoo):
            if name not in self.missing_once:
                self.missing_once.add(name)
                continue
            del self.known[name]
            self.missing_once.discard(name)
            if desired.models.get(name) and name not in self.repository.available():
                try:
                    await self.repository.change_to_the_end(name, None)
                    logger.info("model poll: %s unloaded, its folder left %s", name, self.repository.settings.zoo)
                except ApiError as error:
                    logger.error("model poll: %s not unloaded: %s", name, error.message)
