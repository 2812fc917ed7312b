"""Command line of the training side: `python -m training COMMAND ...`; `--help` lists the commands.

    python -m training train    --data ../shared/data/trec/train.txt --format trec --out checkpoints/kim-cnn-trec6.pt
    python -m training cv       --data ../shared/data/mr --format mr --folds 10 --out checkpoints/kim-cnn-mr-cv.json
    python -m training export   --checkpoint checkpoints/kim-cnn-trec6.pt --bundle models/zoo/kim-cnn-trec6
    python -m training import-onnx --onnx model.onnx --labels labels.txt --tokenizer tokenizer.json --bundle models/zoo/NAME
    python -m training evaluate --bundle models/zoo/kim-cnn-trec6 --data FILE --format trec
    python -m training predict  --bundle models/zoo/kim-cnn-trec6 --data FILE --out predictions.jsonl   (docs/training.md)
    python -m training optimize --bundle models/zoo/kim-cnn-trec6   (graph passes, parity with the old graph)
    python -m training quantize --bundle models/zoo/lstm-trec6      (writes models/zoo/lstm-trec6-int8)
    python -m training results  (regenerates docs/results.md from models/zoo)

This file only gathers the commands: each room registers its own, parser and `run(args)` together
(training/jobs/commands.py: train, cv, train-lm, train-image, cv-image; training/bundles/commands.py:
export, export-image, import-onnx, attach-cv, optimize, quantize; training/evaluation/commands.py:
evaluate, results, check-drawn, show-filters; training/predict.py: predict). `evaluate` prints one
JSON object on its last line. `train`, `cv` and `train-lm` run unchanged under
`torchrun --nproc_per_node N` (or --nnodes): data-parallel, one share of every batch per rank
(training/jobs/distributed.py).
"""

from __future__ import annotations

import argparse
import sys

from models.recipe import SettingError
from training import predict
from training.bundles import commands as bundle_commands
from training.data.datasets import ColumnError, MalformedDataError, UnknownLabelError
from training.evaluation import commands as evaluation_commands
from training.jobs import commands as job_commands

REGISTERS = (job_commands.register, bundle_commands.register, evaluation_commands.register, predict.register)


def parser() -> argparse.ArgumentParser:
    whole = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    commands = whole.add_subparsers(dest="command", required=True)
    for register in REGISTERS:
        register(commands)
    return whole


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


def data_error_line(error: Exception) -> str:
    """A data problem as the one line a user needs: which file (and line), what is wrong, what to do."""
    if isinstance(error, UnknownLabelError):
        return str(error)  # it says what to do
    if isinstance(error, FileNotFoundError):
        return (f"{error.filename}: no such file. Check --data; the benchmark data sets (PTB, TREC, MR) are not in a "
                "clone: give --data the path of your copy, or try training/sample_data's small samples")
    return f"{error}. `python -m training <command> --help` says what each --format reads"


def run(argv: list[str] | None = None) -> None:
    """main(), with a data file that is missing or malformed, or a `--set` that does not fit its
    setting, reported in one line (exit 2), not a traceback."""
    try:
        main(argv)
    except (MalformedDataError, FileNotFoundError, ColumnError) as error:
        print(f"python -m training: error: {data_error_line(error)}", file=sys.stderr)
        sys.exit(2)
    except SettingError as error:
        print(f"python -m training: error: --set {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
