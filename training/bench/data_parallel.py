"""Training throughput of one process against torchrun ranks on this machine, for the two jobs:
`python -m training.bench.data_parallel [--ptb ../shared/data/ptb] [--trec ../shared/data/trec/train.txt]
[--ranks 1 2] [--rounds 2] [--lm-minutes 1.5] [--cnn-epochs 5]`.

Each row is a real run of the real command, one after the other (never two at once):
- the LM: `train-lm --preset small` for --lm-minutes, then the checkpoint's own bookkeeping (steps
  and training seconds; reading and encoding PTB are not counted) gives words per second;
- Kim's CNN: `train --format trec --epochs N`, whose metrics give the training seconds (dev
  evaluation included, as the job runs it) and so examples per second.
One process gets every core as threads; N ranks get cores / N threads each, which is what
torchrun gives them (OMP_NUM_THREADS). The table prints each round's figures and the ratio to one
process in the same round, plus what one step's gradient all-reduce moves (4 bytes a parameter),
from which docs/training.md projects a multi-GPU run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[2]


def launch(arguments: list[str], ranks: int, threads: int) -> None:
    launcher = [sys.executable] if ranks == 1 else [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                                                    "--nproc_per_node", str(ranks)]
    result = subprocess.run([*launcher, "-m", "training", *arguments], cwd=REPOSITORY, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} on {ranks} rank(s) failed:\n{result.stderr[-2000:]}")


def lm_words_per_second(ptb: Path, ranks: int, threads: int, minutes: float, work: Path) -> tuple[float, float, int]:
    """(words/s, seconds per step, parameters) of `train-lm --preset small` for `minutes`."""
    out = work / f"lm-{ranks}.pt"
    out.unlink(missing_ok=True)
    out.with_suffix(".curve.jsonl").unlink(missing_ok=True)
    launch(["train-lm", "--data", str(ptb), "--preset", "small", "--minutes", str(minutes), "--checkpoint-every", "1e9",
            "--threads", str(threads), "--out", str(out)], ranks, threads)
    checkpoint = torch.load(out, map_location="cpu", weights_only=True)
    progress, config = checkpoint["resume"]["progress"], checkpoint["config"]
    words_per_step = config["recipe"]["batch_size"] * config["recipe"]["bptt_steps"]
    return (progress["step"] * words_per_step / progress["seconds"], progress["seconds"] / progress["step"],
            checkpoint["metrics"]["parameters"])


def cnn_examples_per_second(trec: Path, ranks: int, threads: int, epochs: int, work: Path) -> tuple[float, float, int]:
    """(examples/s, seconds per step, parameters) of Kim's CNN-rand on TREC for `epochs`."""
    out = work / f"cnn-{ranks}.pt"
    launch(["train", "--data", str(trec), "--format", "trec", "--epochs", str(epochs), "--out", str(out)], ranks, threads)
    metrics = torch.load(out, map_location="cpu", weights_only=True)["metrics"]
    steps = epochs * -(-metrics["train_examples"] // metrics["global_batch"])
    return epochs * metrics["train_examples"] / metrics["train_seconds"], metrics["train_seconds"] / steps, metrics["parameters"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ptb", type=Path, default=REPOSITORY.parent / "shared/data/ptb")
    parser.add_argument("--trec", type=Path, default=REPOSITORY.parent / "shared/data/trec/train.txt")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lm-minutes", type=float, default=1.5)
    parser.add_argument("--cnn-epochs", type=int, default=5)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    jobs = {"char-lm small, PTB (words/s)": lambda r, t, w: lm_words_per_second(args.ptb, r, t, args.lm_minutes, w),
            "kim-cnn rand, TREC (examples/s)": lambda r, t, w: cnn_examples_per_second(args.trec, r, t, args.cnn_epochs, w)}
    print(f"{cores} cores; one process: {cores} threads; N ranks (gloo): {cores} / N threads each")
    print(f"| job | round | ranks | throughput | s/step | vs 1 process | all-reduce per step |")
    print(f"|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, job in jobs.items():
            for round_number in range(1, args.rounds + 1):
                single = None
                for ranks in args.ranks:
                    throughput, step_seconds, parameters = job(ranks, max(1, cores // ranks), Path(folder))
                    single = single or throughput
                    all_reduce = f"{parameters * 4 / 2**20:.1f} MiB" if ranks > 1 else "-"
                    print(f"| {name} | {round_number} | {ranks} | {throughput:,.0f} | {step_seconds:.4f} | "
                          f"{throughput / single:.2f}x | {all_reduce} |", flush=True)


if __name__ == "__main__":
    main()
