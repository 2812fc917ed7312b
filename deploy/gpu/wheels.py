"""The serving stack for a lent GPU machine, which has no network: the cp312 manylinux wheels of
deploy/requirements-serving.txt (onnxruntime-gpu and everything BentoML needs, the versions the
suite tests), and wrk, built here into parts that travel one per command, and installed there.

    python -m deploy.gpu.wheels lock       # deploy/gpu/wheels.json: each wheel's file, size and sha256 (after a pin changes)
    python -m deploy.gpu.wheels check      # the lock against requirements-serving.txt, nothing downloaded
    make gpu-wheels                        # build: download (hashes required), pack, cut into parts, check the parts
    python3 -m deploy.gpu.wheels install --stash /tmp/gpu-stash --target /tmp/site    # there

The lock lists the whole tested closure rather than what the machine lacks: PYTHONPATH puts it
before the machine's own packages (numpy 2.5, protobuf, ...), so the service runs on the versions
that CI runs. wrk comes from Debian 12 (glibc 2.36; it runs on any newer one) with its one library
outside glibc and OpenSSL, libluajit."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from deploy.gpu import parts

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPOSITORY_ROOT / "deploy" / "requirements-serving.txt"
LOCK = Path(__file__).with_name("wheels.json")
WHEELHOUSE = REPOSITORY_ROOT / ".gpu-wheels"  # ignored: wheels/, tools/, parts/
PACK_NAME = "serving-wheels.tar"
PYTHON_VERSION = "3.12"  # the GPU machine's python3 (/opt/torch/.venv)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
WRK_SUITE = "bookworm"
WRK_PACKAGES = ("wrk", "libluajit-5.1-2")
TAR_BLOCK = 512
BUILT_FROM = "built-from.json"  # beside the parts: the lock's sha256 they were built from


class WheelhouseError(Exception):
    """The lock disagrees with the pins, a wheel does not match the lock, or a part is missing."""


def requirement_pins(path: Path = REQUIREMENTS) -> dict[str, str]:
    """{normalized name: version} of a requirements file of NAME==VERSION lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalized(name)] = version.strip()
    return pins


def normalized(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def read_lock(path: Path = LOCK) -> list[dict]:
    return json.loads(path.read_text())["wheels"]


def check_lock(lock: list[dict], pins: dict[str, str]) -> list[str]:
    """What is wrong with the lock: a pin with no wheel, another version, a wheel with no pin, a
    file for another Python or machine. Empty when the lock is the pins' closure for cp312."""
    faults = []
    locked = {normalized(w["name"]): w for w in lock}
    for name, version in sorted(pins.items()):
        if name not in locked:
            faults.append(f"{name}=={version} is pinned but has no wheel in {LOCK.name}")
        elif locked[name]["version"] != version:
            faults.append(f"{name}: pinned {version}, locked {locked[name]['version']}")
    faults += [f"{name} is locked but not pinned" for name in sorted(set(locked) - set(pins))]
    for wheel in lock:
        if not fits_the_gpu_machine(wheel["file"]):
            faults.append(f"{wheel['file']}: not a wheel for CPython {PYTHON_VERSION} on x86_64 Linux")
    return faults


def fits_the_gpu_machine(file: str) -> bool:
    """A wheel's tags (NAME-VERSION[-BUILD]-PYTHON-ABI-PLATFORM.whl) allow CPython 3.12 on x86_64 Linux."""
    python_tags, abi, platform_tags = (tag.split(".") for tag in file[:-len(".whl")].split("-")[-3:])
    cp = "cp" + PYTHON_VERSION.replace(".", "")
    fits_python = any(tag in ("py3", cp) for tag in python_tags) or (
        abi == ["abi3"] and any(tag.startswith("cp3") and int(tag[3:]) <= int(cp[3:]) for tag in python_tags))
    fits_machine = platform_tags == ["any"] or any(tag.endswith("x86_64") and "linux" in tag for tag in platform_tags)
    return fits_python and fits_machine


def pip_download(requirements: Path, dest: Path, require_hashes: bool) -> None:
    platform_args = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-qq", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON_VERSION, "--implementation", "cp", *platform_args,
                    *(["--require-hashes"] if require_hashes else []), "-r", str(requirements), "-d", str(dest)],
                   check=True)


def wheel_name_version(file: str) -> tuple[str, str]:
    name, version = file.split("-")[:2]
    return normalized(name), version


def lock(dest: Path = WHEELHOUSE / "wheels") -> list[dict]:
    """Download the pins' wheels for cp312 and write the lock with each one's size and sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    pip_download(REQUIREMENTS, dest, require_hashes=False)
    pins = requirement_pins()
    wheels = []
    for path in sorted(dest.glob("*.whl")):
        name, version = wheel_name_version(path.name)
        if pins.get(name) == version:
            wheels.append({"name": name, "version": version, "file": path.name, "size": path.stat().st_size,
                           "sha256": parts.sha256_of(path)})
    LOCK.write_text(json.dumps({"python": PYTHON_VERSION, "from": str(REQUIREMENTS.relative_to(REPOSITORY_ROOT)),
                                "wheels": wheels}, indent=1) + "\n")
    return wheels


def packed_size(lock_entries: list[dict]) -> int:
    """Bytes of the uncompressed tar of the locked wheels: a header and padding to 512 per file,
    and the end-of-archive blocks rounded up to tarfile's 10 KiB record."""
    body = sum(TAR_BLOCK + -(-w["size"] // TAR_BLOCK) * TAR_BLOCK for w in lock_entries)
    record = 20 * TAR_BLOCK
    return -(-(body + 2 * TAR_BLOCK) // record) * record


def hashed_requirements(lock_entries: list[dict], folder: Path) -> Path:
    path = folder / "requirements-hashed.txt"
    path.write_text("".join(f"{w['name']}=={w['version']} --hash=sha256:{w['sha256']}\n" for w in lock_entries))
    return path


def verified_wheels(folder: Path, lock_entries: list[dict]) -> list[Path]:
    """The lock's wheels in `folder`, each one's sha256 checked; a missing or altered one raises by name."""
    found = []
    for wheel in lock_entries:
        path = folder / wheel["file"]
        if not path.is_file():
            raise WheelhouseError(f"{wheel['file']} is missing from {folder}")
        if parts.sha256_of(path) != wheel["sha256"]:
            raise WheelhouseError(f"{wheel['file']} does not match its sha256 in {LOCK.name}")
        found.append(path)
    return found


def fetch_wrk(folder: Path) -> list[Path]:
    from loadtests.perf_analyzer import debian_packages, fetch_debian_package  # the build side only

    folder.mkdir(parents=True, exist_ok=True)
    return [fetch_debian_package(package, folder) for package in debian_packages(WRK_PACKAGES, WRK_SUITE).values()]


def build(part_bytes: int, wheelhouse: Path = WHEELHOUSE) -> Path:  # make gpu-wheels
    """Download the locked wheels (pip checks each hash), pack them into one tar, cut it into parts
    of at most `part_bytes`, and check the parts by joining them; returns the parts' manifest."""
    lock_entries = read_lock()
    faults = check_lock(lock_entries, requirement_pins())
    if faults:
        raise WheelhouseError("the lock is stale (`python -m deploy.gpu.wheels lock`): " + "; ".join(faults))
    wheels_dir = wheelhouse / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        pip_download(hashed_requirements(lock_entries, Path(scratch)), wheels_dir, require_hashes=True)
    wheels = verified_wheels(wheels_dir, lock_entries)
    debs = fetch_wrk(wheelhouse / "tools")
    return pack_into_parts([*wheels, *debs], wheelhouse, part_bytes)


def pack_into_parts(files: list[Path], wheelhouse: Path, part_bytes: int) -> Path:
    """One tar of `files` (as FOLDER/NAME, their folder's name kept: wheels/, tools/) cut into parts
    under wheelhouse/parts, then checked by joining them as the GPU machine will."""
    shutil.rmtree(wheelhouse / "parts", ignore_errors=True)
    pack = wheelhouse / PACK_NAME
    with tarfile.open(pack, "w", format=tarfile.USTAR_FORMAT) as archive:
        for path in files:
            archive.add(path, arcname=f"{path.parent.name}/{path.name}")
    manifest = parts.split(pack, wheelhouse / "parts", part_bytes)
    pack.unlink()
    with tempfile.TemporaryDirectory() as scratch:
        parts.join(manifest, Path(scratch) / PACK_NAME)
    (wheelhouse / "parts" / BUILT_FROM).write_text(json.dumps({"lock_sha256": lock_digest()}) + "\n")
    return manifest


def lock_digest(path: Path = LOCK) -> str:
    return parts.sha256_of(path)


def stale_parts(wheelhouse: Path = WHEELHOUSE) -> str | None:
    """Why the built parts do not match the lock in this checkout (which the GPU machine checks
    them against), or None."""
    built = wheelhouse / "parts" / BUILT_FROM
    if not built.is_file():
        return f"{built} is missing: make gpu-wheels"
    if json.loads(built.read_text()).get("lock_sha256") != lock_digest():
        return f"the parts in {built.parent} were built from another {LOCK.name}: make gpu-wheels"
    return None


def install(stash: Path, target: Path, lock_entries: list[dict] | None = None) -> dict:
    """Join and check the parts found in `stash`, check each wheel against the lock, and install
    them with pip (no index, no dependency resolution) into `target`; wrk goes to target/tools.
    Done once per manifest: a second call with the same parts returns at once."""
    manifest_file = stash / parts.manifest_path(Path(), PACK_NAME)
    stamp = target / ".installed.json"
    manifest = parts.read_manifest(manifest_file)
    if stamp.is_file() and json.loads(stamp.read_text()).get("sha256") == manifest["sha256"]:
        return json.loads(stamp.read_text())
    unpacked = stash / "unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    pack = parts.join(manifest_file, stash / PACK_NAME)
    with tarfile.open(pack) as archive:
        archive.extractall(unpacked, filter="data")
    pack.unlink()
    wheels = verified_wheels(unpacked / "wheels", lock_entries if lock_entries is not None else read_lock())
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)], check=True)
    record = {"sha256": manifest["sha256"], "wheels": len(wheels), "target": str(target), "wrk": unpack_tools(unpacked, target)}
    stamp.write_text(json.dumps(record) + "\n")
    return record


def unpack_tools(unpacked: Path, target: Path) -> str:
    """wrk and libluajit into target/tools; a failure is reported, not raised: only the service's
    load needs wrk, and the rest of the check should still run."""
    tools = target / "tools"
    for deb in sorted((unpacked / "tools").glob("*.deb")):
        done = subprocess.run(["dpkg", "-x", str(deb), str(tools)], capture_output=True, text=True)
        if done.returncode != 0:
            return f"dpkg -x {deb.name} failed: {done.stderr.strip()[:300]}"
    wrk = tools / "usr" / "bin" / "wrk"
    return str(wrk) if wrk.is_file() else "no wrk among the carried tools"


def environment(target: Path) -> dict[str, str]:
    """The variables under which the installed stack (and wrk) is found first."""
    tools = target / "tools"
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), str(REPOSITORY_ROOT), os.environ.get("PYTHONPATH", "")])),
            "PATH": os.pathsep.join([str(tools / "usr" / "bin"), str(target / "bin"), os.environ.get("PATH", "")]),
            "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(tools / "usr" / "lib" / "x86_64-linux-gnu"),
                                                             os.environ.get("LD_LIBRARY_PATH", "")]))}


def main(argv: list[str] | None = None) -> int:
    from deploy.gpu.payload import WHEEL_PART_BYTES

    parser = argparse.ArgumentParser(prog="python -m deploy.gpu.wheels", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("lock", help=f"download the pins for cp{PYTHON_VERSION} and rewrite {LOCK.name}")
    commands.add_parser("check", help="the lock against deploy/requirements-serving.txt (no download)")
    commands.add_parser("build", help="download, pack and cut the wheelhouse into parts under .gpu-wheels/parts")
    put = commands.add_parser("install", help="on the GPU machine: join, check and install the parts in --stash")
    put.add_argument("--stash", type=Path, required=True)
    put.add_argument("--target", type=Path, default=Path("/tmp/site"))
    args = parser.parse_args(argv)
    try:
        if args.command == "lock":
            print(f"{LOCK}: {len(lock())} wheels")
        elif args.command == "check":
            entries = read_lock()
            faults = check_lock(entries, requirement_pins())
            for fault in faults:
                print(f"stale lock: {fault}", file=sys.stderr)
            if faults:
                return 1
            print(f"{LOCK.name}: {len(entries)} wheels for cp{PYTHON_VERSION.replace('.', '')}, "
                  f"{sum(w['size'] for w in entries) / parts.MIB:.1f} MiB, every pin of {REQUIREMENTS.name} at its version")
        elif args.command == "build":
            manifest = parts.read_manifest(build(WHEEL_PART_BYTES))
            for part in manifest["parts"]:
                print(f"{part.name}  {part.size / parts.MIB:6.1f} MiB  {part.sha256[:16]}")
            print(f"{len(manifest['parts'])} parts, {manifest['size'] / parts.MIB:.1f} MiB, joined and checked")
        else:
            print(json.dumps(install(args.stash, args.target)))
    except (WheelhouseError, parts.PartError) as error:
        print(f"refused: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
