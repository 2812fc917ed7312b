"""The arguments that several `python -m training` commands share, read one way everywhere: the
data (`--data`, `--format`, columns), the model (`--architecture`, `--preset`, `--set`, vectors),
the image data and model, and how a run records the command that made it (as the command line for
people and as values for the commands that read it later: `recorded_arguments`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from training.data.datasets import CLASSIFICATION_FORMATS, FORMAT_HELP, read_labelled

CASED_FORMATS = ("trec", "trec50")  # Kim keeps case for TREC, lower-cases everything else


def command_line() -> str:
    return shlex.join(["python", "-m", "training", *sys.argv[1:]])


def recorded_arguments(args: argparse.Namespace) -> dict:
    """The parsed arguments as JSON values (paths as strings), kept beside the command line in a
    checkpoint and a bundle's metrics.json so that later commands read values, not a shell string."""
    return {key: json_value(value) for key, value in sorted(vars(args).items()) if not callable(value)}


def json_value(value):
    """An argument's value as JSON keeps it: a path as its string, a list item by item."""
    if isinstance(value, list):
        return [json_value(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def recorded(metrics: dict, kind: str, instead: str) -> dict:
    """The values a `kind` command (train, export) recorded in a checkpoint's or bundle's metrics."""
    values = metrics.get(f"{kind}_arguments")
    if not values:
        made_by = metrics.get(f"{kind}_command")
        if made_by:  # a bundle written before the values were kept: its command line says what to give
            raise SystemExit(f"this bundle was written before its {kind} command was kept as values; give them once: "
                             f"python -m training record-arguments --bundle BUNDLE -- {made_by.removeprefix('python -m training ')}")
        raise SystemExit(f"this checkpoint or bundle records no {kind} arguments: {instead}")
    return values


def add_data_arguments(parser: argparse.ArgumentParser, formats: tuple[str, ...] = CLASSIFICATION_FORMATS,
                       data_help: str = "data file (for mr: the folder with rt-polarity.pos/.neg)", required: bool = True) -> None:
    parser.add_argument("--data", required=required, help=data_help)
    parser.add_argument("--format", required=required, choices=formats,
                        help="; ".join(f"{name}: {FORMAT_HELP[name]}" for name in formats if name in FORMAT_HELP))
    parser.add_argument("--text-column", default="text",
                        help="csv/tsv/jsonl: the text's column, by name or 0-based index; several (1,2) are joined by a space")
    parser.add_argument("--label-column", default="label", help="csv/tsv/jsonl: the label's column, by name or 0-based index")
    parser.add_argument("--header", action=argparse.BooleanOptionalAction, default=None,
                        help="csv/tsv: whether the first row names the columns (default: yes when a column is given by "
                             "name, no when by index)")


def add_overrides_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """`--set NAME=VALUE`, repeatable: parse_overrides reads it, models/recipe.py applies it."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help=f"override a config value, e.g. {example}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`--set NAME=VALUE` arguments as {name: value}; one without `=` is refused by its text (a value
    that does not fit its setting is refused by models/recipe.py `with_overrides`, by its name)."""
    overrides = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator or not name.strip():
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE")
        overrides[name.strip()] = value.strip()
    return overrides


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from models.registry import ARCHITECTURES

    presets = "; ".join(f"{name}: {', '.join(arch.presets)}" for name, arch in ARCHITECTURES.items())
    parser.add_argument("--architecture", default="kim-cnn", choices=tuple(ARCHITECTURES))
    parser.add_argument("--preset", default=None, help=f"the paper's settings to start from (default: the first). {presets}")
    parser.add_argument("--vectors", type=Path, default=None, help="pretrained word vectors for Kim's static, non-static, multichannel: a word2vec text/binary or GloVe file, or a char-lm bundle folder")
    parser.add_argument("--vectors-format", default="auto", choices=("auto", "word2vec-text", "word2vec-binary", "glove", "char-lm"),
                        help="auto: a folder is a char-lm bundle (vectors from its word encoder), a file is sniffed")
    add_overrides_argument(parser, "--set length=256 --set recipe.epochs=10")


def model_options(args: argparse.Namespace) -> dict:
    from models.registry import architecture

    preset = args.preset or next(iter(architecture(args.architecture).presets))
    return {"architecture_name": args.architecture, "preset": preset, "overrides": parse_overrides(args.overrides),
            "vectors_path": args.vectors, "vectors_format": args.vectors_format}


def read_examples(args: argparse.Namespace):
    if args.format in ("csv", "tsv"):
        return read_labelled(args.data, args.format, text_column=args.text_column, label_column=args.label_column,
                             header=getattr(args, "header", None))
    if args.format == "jsonl":
        return read_labelled(args.data, args.format, text_column=args.text_column, label_column=args.label_column)
    return read_labelled(args.data, args.format)


def member_count(text: str) -> int:
    """--members: how many networks of one recipe, 1 (a single model) or more."""
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"--members {count}: give 1 (a single model) or more")
    return count


def add_device_argument(parser: argparse.ArgumentParser, auto: bool = True) -> None:
    if auto:
        parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: a CUDA GPU when one is usable")
    else:
        parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))


def add_image_model_arguments(parser: argparse.ArgumentParser) -> None:
    from models.image_cnn import PRESETS

    parser.add_argument("--preset", default="digits", choices=tuple(PRESETS),
                        help="digits: the lecture notes' network (the released digits-cnn); digits-16: the same read at 16x16, "
                             "wider, shifted copies (docs/training.md); lenet5: LeNet-5 (models/image_cnn.py)")
    add_overrides_argument(parser, "--set dropout=0.3 --set recipe.shift=2 --set recipe.epochs=60")
    parser.add_argument("--seed", type=int, default=3435)
    parser.add_argument("--members", type=member_count, default=1,
                        help="train this many seeds (--seed, --seed + 1000, ...) and serve the mean of their logits as one model")


def add_image_data_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--idx", nargs=2, type=Path, metavar=("IMAGES", "LABELS"), help="an MNIST-style IDX file pair (training images)")
    source.add_argument("--pictures", type=Path, help="a folder with one sub-folder of PNG/JPEG pictures per class")
    parser.add_argument("--test-idx", nargs=2, type=Path, metavar=("IMAGES", "LABELS"), help="with --idx: the held-out IDX pair")
    # Neither: scikit-learn's 8x8 digits, with their fixed split (training/data/image_data.py).


def read_image_data(args: argparse.Namespace):
    """((train grids, labels), (test grids, labels) or None, label names) from the chosen source."""
    from training.data import image_data

    if args.idx:
        grids, labels, names = image_data.read_idx(*args.idx)
        test = image_data.read_idx(*args.test_idx)[:2] if args.test_idx else None
        return (grids, labels), test, names
    if args.pictures:
        grids, labels, names = image_data.read_png_folder(args.pictures)
        return (grids, labels), None, names
    return image_data.digits()
