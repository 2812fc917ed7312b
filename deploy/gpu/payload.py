"""What travels to a lent GPU machine, call by call, under the tool's 64 MiB.

A call to the GPU machine copies the checkout's tracked files, its untracked files that git does
not ignore, and the ignored paths named in `carry`. The committed zoo alone is 177 MiB, so while
calls are sent the zoo is taken out of the index (and ignored); each call carries one staged folder
.gpu-payload/CALL holding just its share: PTB, wheel parts, bundles. On the machine the call's
first command moves that share into /tmp/gpu-stash, which lives as long as the machine stays warm
(30 s after a call), so the calls of a step run back to back.

    python -m deploy.gpu.payload plan [STEP]      # each call's size (no git change): make gpu-check-dry
    python -m deploy.gpu.payload out STEP         # zoo out of the index, shares staged; prints each call's carry and command
    (the calls, in order, through the device tool)
    python -m deploy.gpu.payload back             # the zoo back in the index, the stage removed
    python -m deploy.gpu.payload status           # whether the zoo is out (a commit is refused while it is)

The steps (docs/gpu.md): `lm` trains the large language model and brings its weights back;
`serve` carries the serving wheels and every bundle, then checks serving on CUDA."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20
TRAVEL_LIMIT = 64 * MIB  # the device tool refuses a call above this
CALL_LIMIT = 60 * MIB  # ours: every call stays this far below the tool's limit
ITEMS_ROOM = 54 * MIB  # a call's share; the code (about 3 MiB) and untracked files take the rest
WHEEL_PART_BYTES = 54 * MIB
WHEEL_TOOLS_ALLOWANCE = 1 * MIB  # wrk and libluajit's .debs, before make gpu-wheels has fetched them
RETURN_PART_BYTES = 16 * MIB  # the tool brings back files of at most 16 MiB, 64 MiB per call

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
ZOO = "models/zoo"
STAGE = ".gpu-payload"
STASH = Path("/tmp/gpu-stash")  # on the GPU machine
EXCLUDE_LINE = f"/{ZOO}/"
MARKER = "gpu-payload.json"  # in .git: present while the zoo is out of the index
HOOK = """#!/bin/sh
# Installed by deploy/gpu/payload.py: a commit while models/zoo is out of the index would delete it.
if [ -f "$(git rev-parse --git-dir)/gpu-payload.json" ]; then
  echo "models/zoo is out of the index for a GPU call: run python -m deploy.gpu.payload back first" >&2
  exit 1
fi
"""


class PayloadError(Exception):
    """A call would be too large, the zoo is already out, or git refused."""


@dataclass(frozen=True)
class Item:
    """One thing a call carries: `source` here (file or folder; None while only planned), `dest`
    its path under the call's folder and under the stash there, `size` its bytes."""
    dest: str
    size: int
    source: Path | None = None


@dataclass
class Call:
    name: str
    command: str
    items: list[Item] = field(default_factory=list)

    @property
    def items_size(self) -> int:
        return sum(item.size for item in self.items)

    def carry(self) -> list[str]:
        return [f"{STAGE}/{self.name}"] if self.items else []


# --------------------------------------------------------------------------- sizes


def git(root: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise PayloadError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def code_size(root: Path = REPOSITORY_ROOT) -> int:
    """Bytes that travel with every call: the tracked files outside the zoo and the untracked files
    git does not ignore (not counting the zoo's, which the tool will not see once it is out)."""
    names = git(root, "ls-files", "-z").split("\0") + git(root, "ls-files", "-z", "--others", "--exclude-standard").split("\0")
    files = {root / name for name in names if name and not name.startswith(ZOO + "/")}
    return sum(path.stat().st_size for path in files if path.is_file())


# --------------------------------------------------------------------------- the steps


PTB_SIZES = {"train.txt": 5_101_618, "valid.txt": 399_782}  # Mikolov's files: what is planned where no copy is at hand


def ptb_items(data: Path) -> list[Item]:
    return [Item(f"ptb/{name}", (data / name).stat().st_size, data / name) if (data / name).is_file() else Item(f"ptb/{name}", size)
            for name, size in PTB_SIZES.items()]


def lm_calls(data: Path) -> list[Call]:
    """Step (a): train on the GPU within one command (rerun it to resume), then fetch the weights'
    remaining parts in a second."""
    return [
        Call("lm-train", "python3 -m deploy.gpu.payload receive lm-train && "
                         "python3 -m deploy.gpu.check_lm train --stash /tmp/gpu-stash --minutes 8 --out \"$OUT\"",
             ptb_items(data)),
        Call("lm-bring-back", "python3 -m deploy.gpu.check_lm bring-back --stash /tmp/gpu-stash --out \"$OUT\""),
    ]


def wheel_items(root: Path) -> list[Item]:
    """The wheelhouse's parts: as built (make gpu-wheels), else as the lock says they will be."""
    from deploy.gpu import parts, wheels

    manifest_file = root / ".gpu-wheels" / "parts" / f"{wheels.PACK_NAME}.parts.json"
    if manifest_file.is_file():
        stale = wheels.stale_parts(root / ".gpu-wheels")
        if stale:
            raise PayloadError(stale)
        manifest = parts.read_manifest(manifest_file)
        return [Item(f"wheels/{manifest_file.name}", manifest_file.stat().st_size, manifest_file),
                *(Item(f"wheels/{p.name}", p.size, manifest_file.parent / p.name) for p in manifest["parts"])]
    total = wheels.packed_size(wheels.read_lock()) + WHEEL_TOOLS_ALLOWANCE
    count = -(-total // WHEEL_PART_BYTES)
    sizes = [WHEEL_PART_BYTES] * (count - 1) + [total - WHEEL_PART_BYTES * (count - 1)]
    return [Item(f"wheels/{wheels.PACK_NAME}.parts.json", 4096),
            *(Item(f"wheels/{wheels.PACK_NAME}.part-{i:03d}", size) for i, size in enumerate(sizes))]


def bundle_items(root: Path) -> list[Item]:
    zoo = root / ZOO
    return [Item(f"zoo/{folder.name}", tree_size(folder), folder)
            for folder in sorted(zoo.iterdir()) if (folder / "manifest.json").is_file()]


def packed_calls(items: list[Item], room: int, prefix: str) -> list[Call]:
    """First fit, largest first: the fewest calls for the items, none over `room`; the wheel parts
    come first so that an interrupted sequence has the stack before the bundles."""
    calls: list[Call] = []
    for item in sorted(items, key=lambda i: (not i.dest.startswith("wheels/"), -i.size)):
        if item.size > room:
            raise PayloadError(f"{item.dest} is {item.size / MIB:.1f} MiB: more than one call's {room / MIB:.0f} MiB")
        target = next((call for call in calls if call.items_size + item.size <= room), None)
        if target is None:
            target = Call(f"{prefix}-{len(calls) + 1}", "")
            calls.append(target)
        target.items.append(item)
    for call in calls:
        call.command = f"python3 -m deploy.gpu.payload receive {call.name}"
    return calls


def serve_calls(root: Path) -> list[Call]:
    """Step (b): the wheel parts and every released bundle over as few calls as fit, then the check."""
    calls = packed_calls(wheel_items(root) + bundle_items(root), ITEMS_ROOM, "serve")
    check = ("python3 -m deploy.gpu.check_serving --stash /tmp/gpu-stash --device cuda --out \"$OUT\" "
             "2>&1 | tee \"$OUT/check-serving.log\"")
    if calls[-1].items_size > ITEMS_ROOM // 4:  # a full last share gets a call of its own
        calls.append(Call(f"serve-{len(calls) + 1}", ""))
    last = calls[-1]
    last.command = f"{last.command} && {check}" if last.items else check
    return calls


def step_calls(step: str, root: Path = REPOSITORY_ROOT, data: Path | None = None) -> list[Call]:
    if step == "lm":
        return lm_calls(data or root.parent / "shared" / "data" / "ptb")
    if step == "serve":
        return serve_calls(root)
    raise PayloadError(f"unknown step {step!r}: lm or serve")


STEPS = ("lm", "serve")


def plan_rows(root: Path = REPOSITORY_ROOT, steps: tuple[str, ...] = STEPS) -> list[dict]:
    code = code_size(root)
    rows = []
    for step in steps:
        for call in step_calls(step, root):
            rows.append({"step": step, "call": call.name, "items": len(call.items), "code_bytes": code,
                         "items_bytes": call.items_size, "payload_bytes": code + call.items_size})
    return rows


def plan_table(rows: list[dict]) -> str:
    lines = [f"{'step':<6} {'call':<14} {'items':>5} {'code MiB':>9} {'share MiB':>10} {'payload MiB':>12}"]
    for row in rows:
        lines.append(f"{row['step']:<6} {row['call']:<14} {row['items']:>5} {row['code_bytes'] / MIB:>9.1f} "
                     f"{row['items_bytes'] / MIB:>10.1f} {row['payload_bytes'] / MIB:>12.1f}")
    worst = max(row["payload_bytes"] for row in rows)
    lines.append(f"largest call {worst / MIB:.1f} MiB; limit {CALL_LIMIT / MIB:.0f} MiB (the tool's {TRAVEL_LIMIT / MIB:.0f})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the zoo out and back


def git_dir(root: Path) -> Path:
    return Path(git(root, "rev-parse", "--absolute-git-dir").strip())


def zoo_is_out(root: Path) -> bool:
    return (git_dir(root) / MARKER).is_file()


def install_hook(root: Path) -> None:
    """A pre-commit hook that refuses while the zoo is out; an existing hook of another's is left."""
    hook = git_dir(root) / "hooks" / "pre-commit"
    if hook.exists() and "deploy/gpu/payload.py" not in hook.read_text(errors="replace"):
        return
    hook.parent.mkdir(exist_ok=True)
    hook.write_text(HOOK)
    hook.chmod(0o755)


def take_zoo_out(root: Path) -> None:
    """Take the zoo out of the index and ignore it; the files on disk stay as they are."""
    if zoo_is_out(root):
        raise PayloadError("the zoo is already out of the index (python -m deploy.gpu.payload back)")
    if git(root, "diff", "--cached", "--name-only", "--", ZOO).strip():
        raise PayloadError(f"{ZOO} has staged changes: commit or unstage them first (they would be lost)")
    install_hook(root)
    exclude = git_dir(root) / "info" / "exclude"
    exclude.parent.mkdir(exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    added = EXCLUDE_LINE not in lines
    if added:
        exclude.write_text("\n".join([*lines, EXCLUDE_LINE]) + "\n")
    head = git(root, "rev-parse", "HEAD").strip()
    (git_dir(root) / MARKER).write_text(json.dumps({"exclude_added": added, "head": head}) + "\n")
    git(root, "rm", "-r", "-q", "--cached", "--", ZOO)


def put_zoo_back(root: Path) -> int:
    """The zoo's index entries from HEAD again, the exclude line and the marker removed; returns the
    count of zoo files in the index, checked against HEAD's."""
    marker = git_dir(root) / MARKER
    state = json.loads(marker.read_text()) if marker.is_file() else {"exclude_added": False, "head": "HEAD"}
    if git(root, "rev-parse", "HEAD").strip() != git(root, "rev-parse", state["head"]).strip():
        # A commit landed while the zoo was out (a hook bypassed): it records the zoo's deletion.
        # The index gets the zoo of the commit it was taken from, so the next commit restores it.
        print(f"HEAD moved while the zoo was out: its index entries come from {state['head'][:12]}; commit them", file=sys.stderr)
    git(root, "reset", "-q", state["head"], "--", ZOO)
    if state["exclude_added"]:
        exclude = git_dir(root) / "info" / "exclude"
        exclude.write_text("".join(f"{line}\n" for line in exclude.read_text().splitlines() if line != EXCLUDE_LINE))
    indexed = len(git(root, "ls-files", "--", ZOO).splitlines())
    committed = len(git(root, "ls-tree", "-r", "--name-only", state["head"], "--", ZOO).splitlines())
    if indexed != committed:
        raise PayloadError(f"{ZOO}: {indexed} files in the index against {committed} in {state['head'][:12]}; the marker is kept")
    marker.unlink(missing_ok=True)
    return indexed


def stage(calls: list[Call], root: Path) -> None:
    """Each call's share under .gpu-payload/CALL, hard-linked (copied across file systems)."""
    shutil.rmtree(root / STAGE, ignore_errors=True)
    for call in calls:
        for item in call.items:
            if item.source is None:
                raise PayloadError(f"{item.dest}: nothing here to send (wheel parts: make gpu-wheels; PTB: out lm --data FOLDER)")
            target = root / STAGE / call.name / item.dest
            if item.source.is_dir():
                shutil.copytree(item.source, target, copy_function=link_or_copy)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(item.source, target)


def link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def send_out(step: str, root: Path = REPOSITORY_ROOT, data: Path | None = None) -> list[dict]:
    """`out`: the step's calls, staged and measured as the tool will see them; the zoo left out."""
    calls = step_calls(step, root, data)
    take_zoo_out(root)
    try:
        stage(calls, root)
        code = code_size(root)
        sent = []
        for call in calls:
            size = code + tree_size(root / STAGE / call.name) if call.items else code
            if size > CALL_LIMIT:
                raise PayloadError(f"{call.name} would carry {size / MIB:.1f} MiB, over {CALL_LIMIT / MIB:.0f} MiB")
            sent.append({"call": call.name, "payload_mib": round(size / MIB, 1), "carry": call.carry(),
                         "command": call.command})
        return sent
    except BaseException:
        put_zoo_back(root)
        shutil.rmtree(root / STAGE, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- there


def receive(call: str, root: Path = REPOSITORY_ROOT, stash: Path = STASH) -> dict[str, int]:
    """On the GPU machine: move the call's share into the stash; returns what the stash holds."""
    share = root / STAGE / call
    if not share.is_dir():
        raise PayloadError(f"{share}: this call carried nothing (was it named in carry?)")
    for path in sorted(p for p in share.rglob("*") if p.is_file()):
        target = stash / path.relative_to(share)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), target)
    held = {kind.name: len(list(kind.iterdir())) for kind in sorted(stash.iterdir()) if kind.is_dir()}
    print(f"received {call}; the stash holds " + ", ".join(f"{n} in {k}/" for k, n in held.items()), flush=True)
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.gpu.payload", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="each call's payload, computed (no change to git)")
    plan.add_argument("step", nargs="?", choices=STEPS)
    out = commands.add_parser("out", help="take the zoo out of the index and stage STEP's calls")
    out.add_argument("step", choices=STEPS)
    out.add_argument("--data", type=Path, default=None, help="PTB folder for step lm (default: ../shared/data/ptb)")
    commands.add_parser("back", help="the zoo back into the index; the stage removed")
    commands.add_parser("status", help="whether the zoo is out of the index")
    there = commands.add_parser("receive", help="on the GPU machine: move a call's share into /tmp/gpu-stash")
    there.add_argument("call")
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            print(plan_table(plan_rows(steps=(args.step,) if args.step else STEPS)))
        elif args.command == "out":
            for call in send_out(args.step, data=args.data):
                print(json.dumps(call))
            print("the zoo is out of the index: after the calls, python -m deploy.gpu.payload back")
        elif args.command == "back":
            print(f"{put_zoo_back(REPOSITORY_ROOT)} zoo files back in the index")
            shutil.rmtree(REPOSITORY_ROOT / STAGE, ignore_errors=True)
        elif args.command == "status":
            print("out of the index (python -m deploy.gpu.payload back)" if zoo_is_out(REPOSITORY_ROOT) else "in the index")
            return 1 if zoo_is_out(REPOSITORY_ROOT) else 0
        else:
            receive(args.call)
    except PayloadError as error:
        print(f"refused: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
