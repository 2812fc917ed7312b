"""A file cut into numbered parts with a manifest of sha256s, and put back together with every
part checked: how a file larger than one transfer crosses to and from a lent GPU machine.

    python3 -m deploy.gpu.parts split FILE FOLDER --mib 16     -> FOLDER/NAME.part-000 ... + NAME.parts.json
    python3 -m deploy.gpu.parts join FOLDER/NAME.parts.json OUT [--from FOLDER ...]

Standard library only: it runs on the GPU machine before anything else is installed there. A
missing, short or altered part is refused by its name, and so is a whole that does not hash to
the manifest's sum (parts from two different splits)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
CHUNK = 4 * MIB  # read size while hashing and copying


class PartError(Exception):
    """A part is missing, of the wrong size, or does not hash to the manifest's sum."""


@dataclass(frozen=True)
class Part:
    name: str
    size: int
    sha256: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.parts.json"


def split(source: Path, folder: Path, part_bytes: int) -> Path:
    """Cut `source` into parts of at most `part_bytes` in `folder`; returns the manifest's path."""
    if part_bytes <= 0:
        raise ValueError(f"part size {part_bytes}: must be positive")
    folder.mkdir(parents=True, exist_ok=True)
    parts: list[Part] = []
    whole = hashlib.sha256()
    with source.open("rb") as reader:
        while True:
            block = reader.read(part_bytes)
            if not block and parts:
                break
            name = f"{source.name}.part-{len(parts):03d}"
            (folder / name).write_bytes(block)
            parts.append(Part(name, len(block), hashlib.sha256(block).hexdigest()))
            whole.update(block)
            if len(block) < part_bytes:
                break
    manifest = {"name": source.name, "size": sum(p.size for p in parts), "sha256": whole.hexdigest(),
                "part_bytes": part_bytes, "parts": [vars(p) for p in parts]}
    path = manifest_path(folder, source.name)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        manifest["parts"] = [Part(**p) for p in manifest["parts"]]
    except FileNotFoundError:
        raise PartError(f"{path}: no manifest") from None
    except (ValueError, KeyError, TypeError) as error:
        raise PartError(f"{path}: not a parts manifest ({error})") from None
    return manifest


def find_part(name: str, folders: list[Path]) -> Path:
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise PartError(f"part {name} is missing (looked in {', '.join(map(str, folders))})")


def checked_parts(manifest: dict, folders: list[Path]) -> list[Path]:
    """Every part's path, each one's size and sha256 checked; the first fault raises, naming the part."""
    paths = []
    for part in manifest["parts"]:
        path = find_part(part.name, folders)
        size = path.stat().st_size
        if size != part.size:
            raise PartError(f"part {part.name} is {size} bytes, the manifest says {part.size}: cut short or from another split")
        if sha256_of(path) != part.sha256:
            raise PartError(f"part {part.name} does not match its sha256 in the manifest: altered or from another split")
        paths.append(path)
    return paths


def join(manifest_file: Path, out: Path, folders: list[Path] | None = None) -> Path:
    """Put the parts back together into `out`, checking each part and then the whole; `out` is
    written beside itself first and renamed, so a failed join leaves nothing that looks whole."""
    manifest = read_manifest(manifest_file)
    paths = checked_parts(manifest, folders or [manifest_file.parent])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".joining")
    whole = hashlib.sha256()
    with partial.open("wb") as writer:
        for path in paths:
            with path.open("rb") as reader:
                while block := reader.read(CHUNK):
                    whole.update(block)
                    writer.write(block)
    if whole.hexdigest() != manifest["sha256"]:
        partial.unlink()
        raise PartError(f"{manifest['name']}: the joined parts do not hash to the manifest's sha256")
    partial.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m deploy.gpu.parts", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cut = commands.add_parser("split", help="cut FILE into parts of at most --mib MiB in FOLDER")
    cut.add_argument("file", type=Path)
    cut.add_argument("folder", type=Path)
    cut.add_argument("--mib", type=float, required=True)
    glue = commands.add_parser("join", help="check every part of MANIFEST and join them into OUT")
    glue.add_argument("manifest", type=Path)
    glue.add_argument("out", type=Path)
    glue.add_argument("--from", dest="folders", type=Path, action="append", default=None,
                      help="a folder holding parts (repeatable; default: the manifest's folder)")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            print(split(args.file, args.folder, int(args.mib * MIB)))
        else:
            print(join(args.manifest, args.out, args.folders))
    except PartError as error:
        print(f"refused: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
