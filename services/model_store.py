"""Imports the zoo's bundles into the BentoML model store, the place the service loads from.

A bundle becomes the store model `NAME:VERSION`, where VERSION is the start of the bundle's
manifest sha256: re-importing an unchanged bundle does nothing, a retrained one gets a new
version. `python -m services.model_store` imports the whole zoo (make serve runs it first).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException, NotFound

from services.config import ServiceSettings
from services.inference import MANIFEST, Bundle, BundleError, read_bundle


def zoo_bundles(settings: ServiceSettings) -> list[Path]:
    """Bundle folders of the zoo (those holding a manifest), limited to settings.models if set."""
    if not settings.zoo.is_dir():
        raise BundleError(f"model zoo {settings.zoo} does not exist")
    found = {p.name: p for p in sorted(settings.zoo.iterdir()) if not p.name.startswith(".") and (p / MANIFEST).is_file()}
    if settings.models:
        missing = sorted(set(settings.models) - set(found))
        if missing:
            raise BundleError(f"TEXTSERVE_MODELS names {missing}, not in {settings.zoo} (has {sorted(found)})")
        return [found[name] for name in settings.models]
    if not found:
        raise BundleError(f"model zoo {settings.zoo} holds no bundles")
    return list(found.values())


def store_tag(bundle: Bundle) -> str:
    return f"{bundle.name}:{bundle.sha256[:16]}"


def import_bundle(bundle_dir: Path) -> str:
    """Copy one bundle into the store (after checking its sha256s); returns the store tag."""
    bundle = read_bundle(bundle_dir)
    tag = store_tag(bundle)
    try:
        bentoml.models.get(tag)
        return tag
    except NotFound:
        pass
    try:
        with bentoml.models.create(tag, labels={"architecture": bundle.architecture}, metadata={"sha256": bundle.sha256}) as model:
            for file in bundle_dir.iterdir():
                if file.is_file():
                    shutil.copy2(file, Path(model.path) / file.name)
    except BentoMLException:
        bentoml.models.get(tag)  # another process imported it at the same moment: fine if it is there now
    return tag


def stored_bundles(settings: ServiceSettings) -> list[Bundle]:
    """The zoo's bundles as the store holds them (importing any that are missing), sha256-checked."""
    return [read_bundle(bentoml.models.get(import_bundle(path)).path) for path in zoo_bundles(settings)]


def main() -> None:
    settings = ServiceSettings.from_environment()
    for path in zoo_bundles(settings):
        print(f"{path.name}: {import_bundle(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
