"""TEXTSERVE_MODEL_CONTROL=poll: the zoo folder's changes become loads and unloads through the
repository API (repository.py), with its checks and two-phase swap."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from pathlib import Path


from services.backends.inference import MANIFEST, sha256_file
from services.backends.model_store import zoo_folders
from services.errors import ApiError

from services.api.repository import Repository

logger = logging.getLogger("bentoml.textserve")


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
