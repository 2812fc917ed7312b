"""The commands that write bundles: `export`, `export-image`, `import-onnx`, `attach-cv`,
`optimize`, `quantize`. Each registers its parser and its `run(args)` (training/__main__.py
gathers them). What a bundle's training or export recorded is read as values
(`training/arguments.py` `recorded`), never parsed back from a command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.arguments import add_data_arguments, add_image_data_arguments, command_line, read_examples, read_image_data, recorded, recorded_arguments
from training.data.datasets import CLASSIFICATION_FORMATS


def register(commands) -> None:
    for add in (add_export, add_export_image, add_import_onnx, add_attach_cv, add_optimize, add_quantize, add_record_arguments):
        add(commands)


# --------------------------------------------------------------------------- export


def add_export(commands) -> None:
    from training.bundles.export_classifier import STORAGE_CHOICES

    export = commands.add_parser("export", help="checkpoint -> ONNX with a parity check -> model bundle")
    export.add_argument("--checkpoint", required=True, type=Path)
    add_data_arguments(export, (*CLASSIFICATION_FORMATS, "ptb"), required=False, data_help=(
        "texts to check the ONNX graph against PyTorch on (and to measure float16 rounding on), with --format; "
        "default: the 512 texts train kept in the checkpoint (a language model: the validation file of its "
        "train-lm --data). Labels are not used"))
    export.add_argument("--bundle", required=True, type=Path,
                        help="bundle folder, e.g. models/zoo/kim-cnn-trec6; a running server picks it up with "
                             "POST /v2/repository/models/NAME/load (TEXTSERVE_MODEL_CONTROL=explicit)")
    export.add_argument("--storage", default="auto", choices=STORAGE_CHOICES,
                        help="float16 stores the weights at half the size, computed in float32; auto (default): float16 "
                             "unless rounding changes more than 0.1%% of the parity texts' predictions (a language model: "
                             "more than 0.1%% perplexity), float32 then. The choice and its measure go into metrics.json")
    export.add_argument("--metrics-from", type=Path, action="append", default=[], help="JSON file of extra metrics (e.g. cv output)")
    export.set_defaults(run=run_export)


def export_record(args: argparse.Namespace, extra_files: list[Path]) -> dict:
    """What export adds to the bundle's metrics: its command, its values, and the figures of --metrics-from."""
    extra = {"export_command": command_line(), "export_arguments": recorded_arguments(args)}
    for path in extra_files:
        extra.update(json.loads(path.read_text()))
    return extra


def run_export(args: argparse.Namespace) -> None:
    from training.jobs.classifier import load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    if checkpoint.get("architecture") == "char-lm":
        export_language_model_bundle(args, checkpoint)
    else:
        export_classifier_bundle(args, checkpoint)


def export_language_model_bundle(args: argparse.Namespace, checkpoint: dict) -> None:
    from training.bundles.export_lm import export_language_model
    from training.data.datasets import read_ptb

    if args.data is None:  # the validation text beside the training text
        args.data = str(Path(recorded(checkpoint["metrics"], "train", "export --data FILE --format ptb")["data"]) / "valid.txt")
    elif args.format != "ptb":
        raise SystemExit("a language-model checkpoint is checked on its validation text: --format ptb")
    args.format = "ptb"
    metrics = export_language_model(checkpoint, args.bundle, args.bundle.name, read_ptb(args.data),
                                    extra_metrics=export_record(args, args.metrics_from), storage=args.storage)
    print(json.dumps({"bundle": str(args.bundle), **{k: v for k, v in metrics.items() if k.startswith(("parity", "valid_perplexity", "weight_storage"))}}))


def export_classifier_bundle(args: argparse.Namespace, checkpoint: dict) -> None:
    from training.bundles.export_classifier import export_bundle

    if args.data is not None:
        texts = [example.text for example in read_examples(args)]
    elif checkpoint.get("parity_texts"):
        texts = checkpoint["parity_texts"]
    else:
        raise SystemExit(f"{args.checkpoint} predates kept parity texts: give export --data and --format "
                         "(the training file does)")
    metrics = export_bundle(checkpoint, args.bundle, args.bundle.name, texts, extra_metrics=export_record(args, args.metrics_from),
                            storage=args.storage)
    print(json.dumps({"bundle": str(args.bundle), **{k: v for k, v in metrics.items() if k.startswith(("parity", "weight_storage"))}}))


def add_export_image(commands) -> None:
    export_image = commands.add_parser("export-image", help="image CNN checkpoint -> ONNX with a parity check -> model bundle")
    export_image.add_argument("--checkpoint", required=True, type=Path)
    add_image_data_arguments(export_image)  # the parity images: the held-out test images
    export_image.add_argument("--bundle", required=True, type=Path, help="bundle folder, e.g. models/zoo/digits-cnn")
    export_image.add_argument("--metrics-from", type=Path, action="append", default=[], help="JSON file of extra metrics (e.g. cv-image output)")
    export_image.set_defaults(run=run_export_image)


def cv_image_figures(cv: dict) -> dict:
    """cv-image's result under the cv_ names a bundle's metrics use."""
    figures = {"cv_folds": cv["folds"], "cv_accuracy_mean": cv["mean_accuracy"], "cv_accuracy_std": cv["std_accuracy"],
               "cv_fold_accuracies": cv["fold_accuracies"], "cv_command": cv["command"]}
    if "mean_drawn_accuracy" in cv:
        figures.update(cv_drawn_accuracy_mean=cv["mean_drawn_accuracy"], cv_drawn_accuracies=cv["drawn_accuracies"])
    return figures


def run_export_image(args: argparse.Namespace) -> None:
    import torch

    from training.bundles.export_image import export_image_bundle

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    train_part, test_part, _ = read_image_data(args)
    parity_grids = (test_part or train_part)[0]  # parity is about the graph, any real images do
    extra = {"export_command": command_line(), "export_arguments": recorded_arguments(args)}
    for path in args.metrics_from:
        extra.update(cv_image_figures(json.loads(path.read_text())))
    metrics = export_image_bundle(checkpoint, args.bundle, args.bundle.name, parity_grids, extra)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "member_histories", "train_arguments", "export_arguments")}))


# --------------------------------------------------------------------------- import-onnx


def add_import_onnx(commands) -> None:
    imported = commands.add_parser(
        "import-onnx", help="a bundle from an ONNX text classifier trained elsewhere (checked, probed, with a manifest)",
        description="Make a model bundle (docs/bundle.md) from an ONNX text classifier trained elsewhere. The graph takes "
                    "a Hugging Face tokenizer's input_ids (and attention_mask, token_type_ids if it declares them), or "
                    "our encodings' token_ids (and lengths), int64 or int32, batch axis symbolic; one output holds the "
                    "class scores as logits (batch, labels). The bundle is checked as the service checks it and probed "
                    "on real texts before it is written.")
    imported.add_argument("--onnx", required=True, type=Path, help="the graph: one self-contained .onnx file")
    imported.add_argument("--labels", required=True, type=Path,
                          help="the labels in the order of the class scores: one per line, or a JSON list")
    imported.add_argument("--bundle", required=True, type=Path, help="bundle folder to write, e.g. models/zoo/NAME")
    imported.add_argument("--encoding", default=None, choices=("tokenizer", "words", "chars"),
                          help="how text becomes the graph's inputs (default: tokenizer with --tokenizer, words with --vocab)")
    imported.add_argument("--tokenizer", type=Path, default=None, help="tokenizer: a Hugging Face tokenizer.json (read with "
                          "the tokenizers package; its normaliser, pre-tokeniser and special tokens apply)")
    imported.add_argument("--max-length", type=int, default=None,
                          help="tokenizer: longer texts are truncated to this many tokens (default: tokenizer.json's own "
                               "truncation, else its folder's tokenizer_config.json model_max_length, else 512)")
    imported.add_argument("--vocab", type=Path, default=None, help="words: one token per line (id = line - 1) or a JSON "
                          "list; the first two are padding and unknown words (<pad>, <unk>)")
    imported.add_argument("--lowercase", action="store_true", help="words, chars: lower-case texts before encoding")
    imported.add_argument("--edge-padding", type=int, default=0, help="words: padding ids before and after each text")
    imported.add_argument("--alphabet", default="", help="chars: the alphabet, id = 1-based position (default: Zhang's 70)")
    imported.add_argument("--length", type=int, default=1014, help="chars: characters per text (the graph's fixed length)")
    imported.add_argument("--output", default=None, help="the output holding the class scores (default: logits, or the only one)")
    imported.add_argument("--probe", default=None, help="probe texts, one per line (default: five built-in questions and reviews)")
    imported.set_defaults(run=run_import_onnx)


def run_import_onnx(args: argparse.Namespace) -> None:
    from training.bundles.import_onnx import PROBE_TEXTS, ImportRefused, import_onnx

    kind = args.encoding or ("tokenizer" if args.tokenizer else "words" if args.vocab else None)
    if kind is None:
        raise SystemExit("import-onnx: give --tokenizer tokenizer.json, or --vocab FILE, or --encoding chars")
    probe_texts = [line for line in Path(args.probe).read_text().splitlines() if line.strip()] if args.probe else PROBE_TEXTS
    try:
        metrics = import_onnx(args.onnx, args.labels, args.bundle, kind, tokenizer=args.tokenizer, vocab=args.vocab,
                              output=args.output, max_length=args.max_length, lowercase=args.lowercase,
                              edge_padding=args.edge_padding, alphabet=args.alphabet, length=args.length,
                              probe_texts=probe_texts, command=command_line())
    except ImportRefused as error:
        raise SystemExit(f"python -m training import-onnx: refused: {error}") from None
    print(json.dumps({"bundle": str(args.bundle), **metrics}))


# --------------------------------------------------------------------------- attach-cv


CV_BOOKKEEPING = ("cv_settings", "cv_fold_progress", "cv_fold_curves", "cv_member_runs")  # cv's resume state and per-epoch curves, not figures
# Settings in which a cv run must agree with a bundle's training run to describe the same recipe.
# Patience may differ: it only stops a fold early once its dev accuracy has stopped improving.
RECIPE_SETTINGS = ("architecture", "preset", "overrides", "vectors", "vectors_format", "epochs", "min_count", "format",
                   "text_column", "label_column", "members", "data")


def add_attach_cv(commands) -> None:
    attach = commands.add_parser("attach-cv", help="add a finished cv run's figures to a released bundle of the same recipe")
    attach.add_argument("--bundle", required=True, type=Path)
    attach.add_argument("--cv", required=True, type=Path, help="the JSON written by `cv --out`")
    attach.set_defaults(run=run_attach_cv)


def check_same_recipe(cv_result: dict, bundle_metrics: dict, cv_path: Path, bundle: Path) -> None:
    """Refuse to attach a cv run to a bundle trained with another recipe or on other data."""
    from models.registry import architecture

    if "cv_settings" not in cv_result or "cv_accuracy_mean" not in cv_result:
        raise SystemExit(f"{cv_path}: not a finished `python -m training cv --out` result")
    trained = dict(recorded(bundle_metrics, "train", "a bundle exported from a `train` checkpoint"))
    cv_settings = dict(cv_result["cv_settings"])
    for settings in (trained, cv_settings):  # an omitted --preset means the architecture's first; --members, 1
        settings["preset"] = settings.get("preset") or next(iter(architecture(settings["architecture"]).presets))
        settings["members"] = settings.get("members") or 1
    for setting in RECIPE_SETTINGS:
        if cv_settings.get(setting) != trained.get(setting):
            raise SystemExit(f"{cv_path} was run with {setting}={cv_settings.get(setting)!r}, but {bundle} was trained "
                             f"with {setting}={trained.get(setting)!r} ({bundle_metrics.get('train_command')}); not the same recipe")


def run_attach_cv(args: argparse.Namespace) -> None:
    from training.bundles.writing import attach_metrics

    cv_result = json.loads(args.cv.read_text())
    check_same_recipe(cv_result, json.loads((args.bundle / "metrics.json").read_text()), args.cv, args.bundle)
    figures = {key: value for key, value in cv_result.items() if key.startswith("cv_") and key not in CV_BOOKKEEPING}
    attach_metrics(args.bundle, figures)
    print(json.dumps({"bundle": str(args.bundle), **{k: figures[k] for k in ("cv_accuracy_mean", "cv_accuracy_std")}}))


# --------------------------------------------------------------------------- optimize, quantize


def add_optimize(commands) -> None:
    optimize = commands.add_parser("optimize", help="apply the ONNX graph passes to released classifier bundles (parity with the original graph)")
    optimize.add_argument("--bundle", required=True, type=Path, action="append", help="bundle folder; repeat for several")
    optimize.set_defaults(run=run_optimize)


def run_optimize(args: argparse.Namespace) -> None:
    from training.bundles.export_classifier import optimize_bundle
    from training.bundles.quantize import training_split

    for bundle in args.bundle:
        metrics = json.loads((bundle / "metrics.json").read_text())
        train_part, dev_part = training_split(recorded(metrics, "train", "a bundle exported from a `train` checkpoint"))
        texts = [example.text for example in dev_part + train_part[:512]]
        metrics = optimize_bundle(bundle, texts)
        print(json.dumps({"bundle": str(bundle), **{k: v for k, v in metrics.items() if k.startswith("graph_pass")}}))


def add_quantize(commands) -> None:
    quantize = commands.add_parser("quantize", help="write NAME-int8 beside a released bundle, gated on its accuracy or perplexity")
    quantize.add_argument("--bundle", required=True, type=Path, action="append", help="bundle folder; repeat for several")
    quantize.set_defaults(run=run_quantize)


def run_quantize(args: argparse.Namespace) -> None:
    from training.bundles.quantize import QuantizationRefused, quantize_bundle

    refused = []
    for bundle in args.bundle:
        try:
            metrics = quantize_bundle(bundle, command_line())
        except QuantizationRefused as error:
            print(f"refused: {error}", file=sys.stderr)
            refused.append(bundle)
            continue
        keys = ("dev_accuracy", "fp32_dev_accuracy", "int8_accuracy_drop", "valid_perplexity_onnx", "fp32_valid_perplexity", "int8_perplexity_rise")
        print(json.dumps({"bundle": str(bundle) + "-int8", **{k: metrics[k] for k in keys if k in metrics}}))
    if refused:
        raise SystemExit(f"{len(refused)} of {len(args.bundle)} bundles refused: {', '.join(map(str, refused))}")


# --------------------------------------------------------------------------- record-arguments


MADE_BY = {"train": "train", "train-lm": "train", "train-image": "train", "export": "export", "export-image": "export"}


def add_record_arguments(commands) -> None:
    record = commands.add_parser(
        "record-arguments", help="give a bundle written before commands were kept as values the values of the command that made it",
        description="A bundle written before its commands were kept as values (train_arguments, export_arguments) serves as "
                    "it did; quantize, optimize and attach-cv need the values. Give them once, as the command that made it "
                    "after --, e.g. record-arguments --bundle models/zoo/NAME -- train --data FILE --format trec --out x.pt "
                    "(its metrics.json keeps that command line as train_command).")
    record.add_argument("--bundle", required=True, type=Path)
    record.add_argument("made_by", nargs=argparse.REMAINDER, help="-- then the train or export command's arguments")
    record.set_defaults(run=run_record_arguments)


def run_record_arguments(args: argparse.Namespace) -> None:
    from training.__main__ import parser
    from training.bundles.writing import attach_metrics

    words = args.made_by[1:] if args.made_by[:1] == ["--"] else args.made_by
    kind = MADE_BY.get(words[0]) if words else None
    if kind is None:
        raise SystemExit(f"record-arguments: after --, the command that made the bundle: one of {', '.join(MADE_BY)}")
    values = recorded_arguments(parser().parse_args(words))
    attach_metrics(args.bundle, {f"{kind}_arguments": values})
    print(json.dumps({"bundle": str(args.bundle), f"{kind}_arguments": values}))
