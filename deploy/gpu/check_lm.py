"""Step (a) of the GPU check: the large character-aware LM (Kim et al. 2016, LSTM-Char-Large,
19 M parameters, 35 epochs on PTB) trained on a lent GPU, its weights brought back in parts, and
released here as char-lm-large-ptb.

    there:  python3 -m deploy.gpu.check_lm train --stash /tmp/gpu-stash --minutes 8 --out "$OUT"
            (rerun to resume, within the machine's 30 s; each run stops and checkpoints before --minutes)
            python3 -m deploy.gpu.check_lm bring-back --stash /tmp/gpu-stash --out "$OUT"
    here:   python -m deploy.gpu.check_lm release --parts FOLDER [--parts FOLDER ...]

The checkpoint that resumes (best and current weights, the average, the RNG states: about 230 MB)
stays on the machine. What comes back with every train call is the best weights so far alone, as
float16 (about 39 MB), in parts of 16 MiB, at most 3 per call beside the logs (the tool returns
64 MiB per call); `bring-back` fetches any left over. `release` joins and checks
them, exports with the parity check, scores PTB's validation text through onnxruntime and writes
the int8 variant where its gate allows. The paper's test perplexity is 78.9; the target here is
at most 82 on validation (test stays held out).

Here `--device cpu` with a tiny `--set` runs the same path in minutes: make gpu-check-dry."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deploy.gpu import parts
from deploy.gpu.payload import RETURN_PART_BYTES

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
NAME = "char-lm-large-ptb"
PARTS_PER_CALL = 3  # 48 MiB of parts, the logs beside them: under the tool's 64 MiB per call
TARGET_VALID_PERPLEXITY = 82.0
PAPER_TEST_PERPLEXITY = 78.9


def checkpoint_path(stash: Path) -> Path:
    return stash / f"{NAME}.pt"


def return_folder(stash: Path) -> Path:
    return stash / "return"


def run_logged(command: list[str], log: Path, env: dict | None = None) -> int:
    """Run `command` with its output appended to `log` and echoed; returns its exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(command), flush=True)
    with log.open("a") as sink:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPOSITORY_ROOT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        for line in process.stdout:
            sink.write(line)
            print(line, end="", flush=True)
        return process.wait()


def environment_facts(device: str) -> dict:
    import torch

    facts = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
        facts["cudnn"] = torch.backends.cudnn.version()
    return facts


def train(stash: Path, out: Path, minutes: float, device: str, preset: str, overrides: list[str],
          part_bytes: int = RETURN_PART_BYTES) -> dict:
    """Train (or resume) into the stash's checkpoint within `minutes`, then cut the best weights so
    far into parts and put the first ones in `out`, finished or not."""
    started = time.perf_counter()
    checkpoint = checkpoint_path(stash)
    command = [sys.executable, "-m", "training", "train-lm", "--data", str(stash / "ptb"), "--preset", preset,
               "--device", device, "--out", str(checkpoint), "--curve", str(out / f"{NAME}.curve.jsonl"),
               "--checkpoint-every", "120", "--minutes", f"{minutes:g}"]
    for item in overrides:
        command += ["--set", item]
    curve_kept = stash / f"{NAME}.curve.jsonl"  # $OUT is emptied before each call: the curve lives in the stash
    if curve_kept.exists():
        shutil.copy2(curve_kept, out / f"{NAME}.curve.jsonl")
    status = run_logged(command, out / "train-lm.log")
    if (out / f"{NAME}.curve.jsonl").exists():
        shutil.copy2(out / f"{NAME}.curve.jsonl", curve_kept)
    if status != 0:
        raise SystemExit(f"train-lm exited with {status}: see train-lm.log")
    import torch

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # about 230 MB: read once
    summary = run_summary(saved, device)
    summary["call_seconds"] = round(time.perf_counter() - started, 1)
    summary["parts"] = cut_weights(saved, return_folder(stash), part_bytes)
    summary["brought"] = bring_back(stash, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(summary_table(summary))
    return summary


def run_summary(checkpoint: dict, device: str) -> dict:
    metrics = checkpoint["metrics"]
    progress = checkpoint["resume"]["progress"]
    epochs = metrics["epochs"] + metrics["tail_epochs"]
    steps = progress["step"]
    return {**environment_facts(device), "epochs_run": metrics["epochs_run"], "epochs": epochs,
            "finished": metrics["epochs_run"] >= epochs, "steps": steps, "train_seconds": metrics["train_seconds"],
            "seconds_per_step": round(metrics["train_seconds"] / steps, 5) if steps else None,
            "valid_perplexity": metrics["valid_perplexity"], "best_epoch": metrics["best_epoch"],
            "parameters": metrics["parameters"],
            "history": [{k: e.get(k) for k in ("epoch", "valid_perplexity", "learning_rate", "seconds")} for e in metrics["history"]]}


def cut_weights(checkpoint: dict, folder: Path, part_bytes: int) -> int:
    """The checkpoint without its resume state (best weights, vocabulary, encoding, metrics), its
    weights rounded to float16, cut into parts. float16 halves the 77 MB of float32 weights, so
    that they come back with the call that trained them (3 parts, with the logs under the 64 MiB
    a call returns) whatever time is left; the bundle is float16 anyway where rounding moves the
    validation perplexity by under 0.1 % (export's gate), and release reads them back as float32."""
    import torch

    best = {key: value for key, value in checkpoint.items() if key != "resume"}
    best["state_dict"] = {name: value.half() if value.is_floating_point() else value
                          for name, value in checkpoint["state_dict"].items()}
    best["metrics"] = {**checkpoint["metrics"], "brought_back_as": "float16"}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    weights = folder / f"{NAME}.weights.pt"
    torch.save(best, weights)
    manifest = parts.split(weights, folder, part_bytes)
    weights.unlink()
    return len(parts.read_manifest(manifest)["parts"])


def bring_back(stash: Path, out: Path, per_call: int = PARTS_PER_CALL) -> list[str]:
    """Copy the manifest and the next parts not yet brought into `out`; returns their names."""
    folder = return_folder(stash)
    manifest_file = parts.manifest_path(folder, f"{NAME}.weights.pt")
    manifest = parts.read_manifest(manifest_file)
    brought_file = folder / "brought.json"
    brought = json.loads(brought_file.read_text()) if brought_file.exists() else []
    now = [p.name for p in manifest["parts"] if p.name not in brought][:per_call]
    out.mkdir(parents=True, exist_ok=True)
    for name in [manifest_file.name, *now]:
        shutil.copy2(folder / name, out / name)
    brought_file.write_text(json.dumps(brought + now))
    left = len(manifest["parts"]) - len(brought) - len(now)
    print(f"brought {', '.join(now) or 'nothing'}; {left} part(s) left" + (": run bring-back again" if left else ""))
    return now


def as_float32(weights: Path, unfinished: bool) -> None:
    """The joined checkpoint's weights back in float32 (what export and PyTorch's parity expect);
    a run that did not finish its epochs is refused unless `unfinished`."""
    import torch

    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    metrics = checkpoint["metrics"]
    if metrics["epochs_run"] < metrics["epochs"] + metrics["tail_epochs"] and not unfinished:
        raise SystemExit(f"these weights are from epoch {metrics['best_epoch']} of a run stopped after {metrics['epochs_run']} "
                         f"of {metrics['epochs'] + metrics['tail_epochs']} epochs: resume it there, or pass --unfinished")
    checkpoint["state_dict"] = {name: value.float() if value.is_floating_point() else value
                                for name, value in checkpoint["state_dict"].items()}
    torch.save(checkpoint, weights)


def release(part_folders: list[Path], bundle: Path, valid: Path, work: Path, quantize: bool = True,
            unfinished: bool = False) -> dict:
    """Join the weights, export with the parity check (the validation perplexity through
    onnxruntime comes with it), and write the int8 variant where its gate allows."""
    manifest = next((f / f"{NAME}.weights.pt.parts.json" for f in part_folders if (f / f"{NAME}.weights.pt.parts.json").exists()), None)
    if manifest is None:
        raise parts.PartError(f"no {NAME}.weights.pt.parts.json in {', '.join(map(str, part_folders))}")
    weights = parts.join(manifest, work / f"{NAME}.weights.pt", part_folders)
    as_float32(weights, unfinished)
    log = work / "release.log"
    python = sys.executable
    if run_logged([python, "-m", "training", "export", "--checkpoint", str(weights), "--data", str(valid), "--format", "ptb",
                   "--bundle", str(bundle)], log) != 0:
        raise SystemExit(f"export failed: see {log}")
    metrics = json.loads((bundle / "metrics.json").read_text())
    result = {"bundle": str(bundle), "valid_perplexity": metrics.get("valid_perplexity_onnx"),
              "target": TARGET_VALID_PERPLEXITY, "paper_test": PAPER_TEST_PERPLEXITY}
    if quantize:
        status = run_logged([python, "-m", "training", "quantize", "--bundle", str(bundle)], log)
        int8 = bundle.with_name(bundle.name + "-int8")
        result["int8"] = str(int8) if status == 0 and int8.exists() else f"refused by its gate (exit {status}; {log})"
    print(json.dumps(result))
    return result


def summary_table(summary: dict) -> str:
    rows = [("device", f"{summary.get('gpu', summary['device'])} (torch {summary['torch']})"),
            ("epochs", f"{summary['epochs_run']} of {summary['epochs']}" + ("" if summary["finished"] else
                                                                              ": rerun with --minutes (budget left - 90 s) / 60 to resume")),
            ("steps", str(summary["steps"])),
            ("seconds per step", f"{summary['seconds_per_step']}"),
            ("training seconds", f"{summary['train_seconds']}"),
            ("best valid perplexity", f"{summary['valid_perplexity']} (epoch {summary['best_epoch']})"),
            ("weights parts", f"{summary.get('parts', '-')}, brought {len(summary.get('brought', []))}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.gpu.check_lm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="train or resume within --minutes; bring the first parts when finished")
    run.add_argument("--stash", type=Path, required=True, help="holds ptb/ (from the payload) and the checkpoint")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--minutes", type=float, default=8.0, help="the training's budget in this call (it stops and checkpoints)")
    run.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    run.add_argument("--preset", default="large", choices=("small", "large"))
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE", help="passed to train-lm")
    run.add_argument("--part-mib", type=float, default=RETURN_PART_BYTES / parts.MIB)
    back = commands.add_parser("bring-back", help="the next parts of the weights into --out")
    back.add_argument("--stash", type=Path, required=True)
    back.add_argument("--out", type=Path, required=True)
    out = commands.add_parser("release", help="here: join the parts, export, score, quantize")
    out.add_argument("--parts", type=Path, action="append", required=True, help="a folder of parts (repeat for each call's)")
    out.add_argument("--bundle", type=Path, default=REPOSITORY_ROOT / "models" / "zoo" / NAME)
    out.add_argument("--valid", type=Path, default=REPOSITORY_ROOT.parent / "shared" / "data" / "ptb" / "valid.txt")
    out.add_argument("--work", type=Path, default=REPOSITORY_ROOT / "checkpoints")
    out.add_argument("--no-int8", action="store_true")
    out.add_argument("--unfinished", action="store_true", help="release weights of a run stopped before its last epoch")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            args.out.mkdir(parents=True, exist_ok=True)
            train(args.stash, args.out, args.minutes, args.device, args.preset, args.overrides, int(args.part_mib * parts.MIB))
        elif args.command == "bring-back":
            bring_back(args.stash, args.out)
        else:
            release(args.parts, args.bundle, args.valid, args.work, quantize=not args.no_int8, unfinished=args.unfinished)
    except parts.PartError as error:
        print(f"refused: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
