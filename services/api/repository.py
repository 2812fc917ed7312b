"""The model repository API (Triton's extension): what POST /v2/repository/index, .../load and
.../unload do, over HTTP and gRPC, in the process that answers the call. A change is published
through the server's agreement (services/backends/model_agreement.py) and answered once every
process has applied it; its refusals are the API's errors (400, 403, 404, 500, 504)."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path


from services.backends.inference import read_bundle, version_of
from services.backends.model_store import LOAD_ERRORS, bento_models, import_bundle, zoo_folders
from services.backends.model_agreement import Desired, ModelState, participants
from services.backends.served_models import ServedModels, reason_of, stored_bundle
from services.config import ServiceSettings
from services.errors import ApiError

logger = logging.getLogger("bentoml.textserve")
BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a folder name in the zoo, never a path


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
                entry = {"name": name, "version": models.bundles[name].version, "state": "READY"}
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
            raise ApiError(404, f"no bundle named {name!r} to load: the zoo folder (TEXTSERVE_ZOO) and the bento hold "
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
                    serving = f"version {version_of(previous.partition(':')[2])} keeps serving" if previous else "nothing was loaded"
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
