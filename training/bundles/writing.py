"""Writing a bundle folder, whatever made it (export, import, quantisation, attached figures):
staged in a hidden sibling folder and swapped in whole, its JSON files, and the manifest that
pins every file by sha256 (services/backends/inference.py `read_bundle` checks it)."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from services.backends.inference import MANIFEST, read_bundle, sha256_file


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def staged_bundle(bundle_dir: Path, copy_from: Path | None = None) -> Iterator[Path]:
    """A hidden sibling folder to write a bundle into (the zoo ignores dot-folders, so a run
    killed halfway never leaves a servable half-bundle); it replaces `bundle_dir` only when the
    block ends without an exception, and is removed otherwise."""
    staging = bundle_dir.with_name("." + bundle_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    if copy_from is not None:
        shutil.copytree(copy_from, staging)
    else:
        staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(bundle_dir, ignore_errors=True)
    staging.rename(bundle_dir)


def write_manifest(bundle_dir: Path) -> None:
    files = sorted(p.name for p in bundle_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    write_json(bundle_dir / MANIFEST, {"files": {file: sha256_file(bundle_dir / file) for file in files}})


def attach_metrics(bundle_dir: Path, extra_metrics: dict) -> dict:
    """Add figures measured after release (e.g. a cross-validation of the same recipe) to a
    bundle's metrics.json, leaving model.onnx and every other file byte for byte as they were.
    The bundle is rewritten through a hidden staging copy, as export does."""
    read_bundle(bundle_dir)  # refuse a bundle that is already inconsistent
    with staged_bundle(bundle_dir, copy_from=bundle_dir) as staging:
        metrics = {**json.loads((staging / "metrics.json").read_text()), **extra_metrics}
        write_json(staging / "metrics.json", metrics)
        write_manifest(staging)
        read_bundle(staging)
    return metrics
