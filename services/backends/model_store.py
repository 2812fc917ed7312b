"""Imports the zoo's bundles into the BentoML model store, the place the service loads from.

A bundle becomes the store model `NAME:VERSION`, where VERSION is the start of the bundle's
manifest sha256: re-importing an unchanged bundle does nothing, a retrained one gets a new
version. `python -m services.backends.model_store` imports the whole zoo (make serve runs it first).

Where the served models come from:
- from a checkout (`make serve`, the tests): the zoo folder, imported into the store first;
- from a bento (`bentoml serve textserve:VERSION`, or the container `bentoml containerize`
  makes): exactly the store models the bento was built with (deploy/bentofile.yaml); a bento
  carries no zoo folder.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException, NotFound

from services.config import ServiceSettings
from services.backends.inference import MANIFEST, Bundle, BundleError, read_bundle, sha256_file


# What reading a bundle from the zoo or the store can raise: it is then reported, not served.
LOAD_ERRORS = (BundleError, BentoMLException, OSError, ValueError, KeyError)


def zoo_folders(zoo: Path) -> dict[str, Path]:
    """Every bundle folder of a zoo by name (those holding a manifest; hidden staging folders skipped)."""
    return {p.name: p for p in sorted(zoo.iterdir()) if not p.name.startswith(".") and (p / MANIFEST).is_file()}


def zoo_bundles(settings: ServiceSettings) -> list[Path]:
    """Bundle folders of the zoo, limited to settings.models if set."""
    if not settings.zoo.is_dir():
        raise BundleError(f"model zoo {settings.zoo} does not exist")
    return selected(zoo_folders(settings.zoo), settings, f"model zoo {settings.zoo}")


def selected(available: dict, settings: ServiceSettings, source: str) -> list:
    """The values of `available` (by model name) that TEXTSERVE_MODELS names, in its order, or
    all of them; an error naming `source` if a name is missing or there is nothing."""
    if settings.models:
        missing = sorted(set(settings.models) - set(available))
        if missing:
            raise BundleError(f"TEXTSERVE_MODELS names {missing}, not in {source} (has {sorted(available)})")
        return [available[name] for name in settings.models]
    if not available:
        raise BundleError(f"{source} holds no bundles")
    return list(available.values())


def store_tag(bundle: Bundle) -> str:
    return f"{bundle.name}:{bundle.sha256[:16]}"


def import_bundle(bundle_dir: Path) -> str:
    """Copy one bundle into the store (after checking its sha256s); returns the store tag.
    A bundle the store already holds costs one small hash (its manifest's): loading checks
    every file of the stored copy anyway."""
    if not (bundle_dir / MANIFEST).is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST}; is this a model bundle?")
    tag = f"{bundle_dir.name}:{sha256_file(bundle_dir / MANIFEST)[:16]}"
    try:
        bentoml.models.get(tag)
        return tag
    except NotFound:
        pass
    bundle = read_bundle(bundle_dir)
    tag = store_tag(bundle)
    try:
        with bentoml.models.create(tag, labels={"architecture": bundle.architecture}, metadata={"sha256": bundle.sha256}) as model:
            for file in bundle_dir.iterdir():
                if file.is_file():
                    shutil.copy2(file, Path(model.path) / file.name)
    except BentoMLException:
        bentoml.models.get(tag)  # another process imported it at the same moment: fine if it is there now
    return tag


def zoo_tags(settings: ServiceSettings) -> list[str]:
    """Store tags of the zoo's bundles (importing any that are missing): what a bento built
    from this checkout carries. A bundle that fails its checks is left out here and reported
    when the service loads (`make bento` imports the zoo first, which stops at a bad bundle)."""
    tags = []
    for path in zoo_bundles(settings):
        try:
            tags.append(import_bundle(path))
        except LOAD_ERRORS:
            continue
    return tags


def bento_models(bento) -> dict[str, str]:
    """Store tags of every model a bento was built with, by name."""
    return {model.tag.name: str(model.tag) for model in bento.info.all_models}


def bento_tags(settings: ServiceSettings, bento) -> list[str]:
    """Store tags of the models a bento was built with, limited to settings.models if set."""
    return selected(bento_models(bento), settings, f"bento {bento.tag}")


@dataclass(frozen=True)
class Served:
    bundles: list[Bundle]
    failures: dict[str, str]  # model name -> why it could not be loaded
    generation: int = 0  # of the model set agreed by the server's processes (model_agreement.py)
    unloaded: frozenset[str] = frozenset()


def load_served(settings: ServiceSettings, bento=None) -> tuple[list[Bundle], dict[str, str]]:
    """The bundles to serve, each read from the store and sha256-checked, and the models that
    failed (name -> reason). One bad bundle does not stop the others from serving: the caller
    reports it (metrics, 503 for that model, the log)."""
    bundles: list[Bundle] = []
    failures: dict[str, str] = {}
    if bento is not None:
        sources = [(tag.partition(":")[0], lambda tag=tag: tag) for tag in bento_tags(settings, bento)]
    else:
        sources = [(path.name, lambda path=path: import_bundle(path)) for path in zoo_bundles(settings)]
    for name, tag_of in sources:
        try:
            bundles.append(read_bundle(bentoml.models.get(tag_of()).path))
        except LOAD_ERRORS as error:
            failures[name] = f"{type(error).__name__}: {error}"
    return bundles, failures


def main() -> None:
    settings = ServiceSettings.from_environment()
    for path in zoo_bundles(settings):
        print(f"{path.name}: {import_bundle(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
