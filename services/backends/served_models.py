"""The models one process serves: the set it starts with (the one the server's processes agreed
on, with model control: model_agreement.py), and, while it serves, each name's bundle and store
tag, the requests in flight on each tag, and the swap of a new version in once it is prepared
(`ServedModels.apply`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import bentoml

from services.backends.inference import Bundle, read_bundle
from services.backends.model_store import LOAD_ERRORS, Served, load_served, store_tag
from services.config import ServiceSettings

from services.backends.model_agreement import Desired, ModelState, state_folder

logger = logging.getLogger("bentoml.textserve")
DRAIN_POLL_S = 0.01


_served_here: Served | None = None  # this process's answer; the first caller's bento decides


def served(settings: ServiceSettings, bento=None) -> Served:
    """The bundles this process serves, read once: the HTTP service asks first (with its bento),
    the in-process runner then gets the same answer; a separate runner process asks with its own.
    With model control, what the server's processes agreed on, which a worker restarted later
    must follow."""
    global _served_here
    if _served_here is None:
        bundles, failures = load_served(settings, bento)
        if settings.model_control == "none":
            _served_here = Served(bundles, failures)
        else:
            _served_here = Served(*agreed(settings, bundles, failures))
    return _served_here


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
