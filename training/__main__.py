"""Command line of the training jobs: `python -m training {train,cv,export,import-onnx,evaluate} ...`.

    python -m training train    --data ../shared/data/trec/train.txt --format trec --out checkpoints/kim-cnn-trec6.pt
    python -m training cv       --data ../shared/data/mr --format mr --folds 10 --out checkpoints/kim-cnn-mr-cv.json
    python -m training export   --checkpoint checkpoints/kim-cnn-trec6.pt --bundle models/zoo/kim-cnn-trec6
    python -m training import-onnx --onnx model.onnx --labels labels.txt --tokenizer tokenizer.json --bundle models/zoo/NAME
    python -m training evaluate --bundle models/zoo/kim-cnn-trec6 --data FILE --format trec
    python -m training predict  --bundle models/zoo/kim-cnn-trec6 --data FILE --out predictions.jsonl   (docs/training.md)
    python -m training optimize --bundle models/zoo/kim-cnn-trec6   (graph passes, parity with the old graph)
    python -m training quantize --bundle models/zoo/lstm-trec6      (writes models/zoo/lstm-trec6-int8)
    python -m training results  (regenerates docs/results.md from models/zoo)

`evaluate` prints one JSON object on its last line. `train`, `cv` and `train-lm` run unchanged under
`torchrun --nproc_per_node N` (or --nnodes): data-parallel, one share of every batch per rank
(training/distributed.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from training.datasets import (CLASSIFICATION_FORMATS, FORMAT_HELP, ColumnError, MalformedDataError, UnknownLabelError,
                               read_labelled, split_dev)
from training.export_onnx import STORAGE_CHOICES
from training.predict import add_predict_parser

CASED_FORMATS = ("trec", "trec50")  # Kim keeps case for TREC, lower-cases everything else


def command_line() -> str:
    return shlex.join(["python", "-m", "training", *sys.argv[1:]])


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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from models.registry import ARCHITECTURES

    presets = "; ".join(f"{name}: {', '.join(arch.presets)}" for name, arch in ARCHITECTURES.items())
    parser.add_argument("--architecture", default="kim-cnn", choices=tuple(ARCHITECTURES))
    parser.add_argument("--preset", default=None, help=f"the paper's settings to start from (default: the first). {presets}")
    parser.add_argument("--vectors", type=Path, default=None, help="pretrained word vectors for Kim's static, non-static, multichannel: a word2vec text/binary or GloVe file, or a char-lm bundle folder")
    parser.add_argument("--vectors-format", default="auto", choices=("auto", "word2vec-text", "word2vec-binary", "glove", "char-lm"),
                        help="auto: a folder is a char-lm bundle (vectors from its word encoder), a file is sniffed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a config value, e.g. --set length=256 --set recipe.epochs=10")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`--set NAME=VALUE` arguments as {name: value}."""
    overrides = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE")
        overrides[name.strip()] = value.strip()
    return overrides


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


CV_BOOKKEEPING = ("cv_settings", "cv_fold_progress", "cv_fold_curves", "cv_member_runs")  # cv's resume state and per-epoch curves, not figures
# Settings in which a cv run must agree with a bundle's training run to describe the same recipe.
# Patience may differ: it only stops a fold early once its dev accuracy has stopped improving.
RECIPE_SETTINGS = ("architecture", "preset", "overrides", "vectors", "vectors_format", "epochs", "min_count", "format",
                   "text_column", "label_column", "members")


def check_same_recipe(parser: argparse.ArgumentParser, cv_result: dict, train_command: str, cv_path: Path,
                      bundle: Path) -> None:
    """Refuse to attach a cv run to a bundle trained with another recipe or on other data."""
    from models.registry import architecture

    if "cv_settings" not in cv_result or "cv_accuracy_mean" not in cv_result:
        raise SystemExit(f"{cv_path}: not a finished `python -m training cv --out` result")
    trained = vars(parser.parse_args(shlex.split(train_command)[3:]))
    trained = {key: (str(value) if isinstance(value, Path) else value) for key, value in trained.items()}
    cv_settings = dict(cv_result["cv_settings"])
    for settings in (trained, cv_settings):  # an omitted --preset means the architecture's first; --members, 1
        settings["preset"] = settings.get("preset") or next(iter(architecture(settings["architecture"]).presets))
        settings["members"] = settings.get("members") or 1
    for setting in RECIPE_SETTINGS + ("data",):
        if cv_settings.get(setting) != trained.get(setting):
            raise SystemExit(f"{cv_path} was run with {setting}={cv_settings.get(setting)!r}, but {bundle} was trained "
                             f"with {setting}={trained.get(setting)!r} ({train_command}); not the same recipe")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a classifier, early-stopped on a dev split")
    add_data_arguments(train)
    add_model_arguments(train)
    train.add_argument("--dev-fraction", type=float, default=0.1, help="share of the data held out as dev (Kim: 10 %%)")
    train.add_argument("--epochs", type=int, default=None, help="override the preset's epoch count (same as --set recipe.epochs=N)")
    train.add_argument("--seed", type=int, default=3435, help="seed for the split, the init and the batch order")
    train.add_argument("--patience", type=int, default=None, help="stop after this many epochs without a better dev accuracy (default: Kim's full run)")
    train.add_argument("--min-count", type=int, default=1, help="keep words seen this often in training; rarer ones become <unk>")
    train.add_argument("--members", type=member_count, default=1,
                       help="train this many seeds (--seed, --seed + 1000, ...) on the same split and export them as one "
                            "model, the mean of their logits (models/ensemble.py); 1: a single model")
    train.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: a CUDA GPU when one is usable")
    train.add_argument("--out", required=True, type=Path,
                       help="checkpoint file to write; the run in progress is kept in OUT.resume/ after every epoch, and a "
                            "rerun of the same command resumes it")

    cv = commands.add_parser("cv", help="k-fold cross-validation (Kim's protocol for MR); prints mean and std")
    add_data_arguments(cv)
    add_model_arguments(cv)
    cv.add_argument("--folds", type=int, default=10)
    cv.add_argument("--epochs", type=int, default=None)
    cv.add_argument("--seed", type=int, default=3435)
    cv.add_argument("--min-count", type=int, default=1)
    cv.add_argument("--patience", type=int, default=None)
    cv.add_argument("--members", type=member_count, default=1, help="an ensemble of this many seeds per fold, as train --members")
    cv.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: a CUDA GPU when one is usable")
    cv.add_argument("--out", type=Path, default=None, help="write the result as JSON here; each fold is saved as it ends and a rerun resumes")

    train_lm = commands.add_parser("train-lm", help="train (or resume) the character-aware language model on PTB")
    train_lm.add_argument("--data", required=True, type=Path, help="folder with train.txt and valid.txt (Mikolov's PTB layout)")
    train_lm.add_argument("--preset", default="small", choices=("small", "large"))
    train_lm.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                          help="override a config value, e.g. --set hidden_size=64 --set recipe.epochs=2")
    train_lm.add_argument("--out", required=True, type=Path, help="checkpoint: written every few minutes; an existing one is resumed")
    train_lm.add_argument("--curve", type=Path, default=None, help="JSON-lines file of per-epoch figures (default: OUT with .curve.jsonl)")
    train_lm.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: a CUDA GPU when one is usable")
    train_lm.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    train_lm.add_argument("--seed", type=int, default=3435)
    train_lm.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between mid-epoch checkpoints")
    train_lm.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this long; rerun to resume")

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

    attach = commands.add_parser("attach-cv", help="add a finished cv run's figures to a released bundle of the same recipe")
    attach.add_argument("--bundle", required=True, type=Path)
    attach.add_argument("--cv", required=True, type=Path, help="the JSON written by `cv --out`")

    optimize = commands.add_parser("optimize", help="apply the ONNX graph passes to released classifier bundles (parity with the original graph)")
    optimize.add_argument("--bundle", required=True, type=Path, action="append", help="bundle folder; repeat for several")

    quantize = commands.add_parser("quantize", help="write NAME-int8 beside a released bundle, gated on its accuracy or perplexity")
    quantize.add_argument("--bundle", required=True, type=Path, action="append", help="bundle folder; repeat for several")

    evaluate = commands.add_parser("evaluate", help="score a bundle through onnxruntime; last line is JSON")
    evaluate.add_argument("--bundle", required=True, type=Path)
    add_data_arguments(evaluate, (*CLASSIFICATION_FORMATS, "ptb"))  # ptb: a language-model bundle's perplexity
    evaluate.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    evaluate.add_argument("--out", type=Path, default=None,
                          help="a classifier: write one JSON line per example there (text, gold, predicted, probabilities)")

    results = commands.add_parser("results", help="regenerate docs/results.md from the zoo (measures speed on this machine)")
    results.add_argument("--zoo", type=Path, default=Path("models/zoo"))
    results.add_argument("--out", type=Path, default=Path("docs/results.md"))

    train_image = commands.add_parser("train-image", help="train an image CNN (models/image_cnn.py) on scikit-learn's digits, an IDX pair or a picture folder")
    add_image_data_arguments(train_image)
    add_image_model_arguments(train_image)
    train_image.add_argument("--epochs", type=int, default=None, help="override the preset's epoch count")
    train_image.add_argument("--out", required=True, type=Path, help="checkpoint file to write")

    cv_image = commands.add_parser("cv-image", help="k-fold cross-validation of an image preset over contiguous blocks (other writers) of the training images")
    add_image_data_arguments(cv_image)
    add_image_model_arguments(cv_image)
    cv_image.add_argument("--folds", type=int, default=5)
    cv_image.add_argument("--baseline", choices=("svm",), default=None,
                          help="svm: score scikit-learn's RBF SVC (C=10, gamma=0.001) on the same folds instead of a CNN, and on the held-out test images")
    cv_image.add_argument("--out", type=Path, default=None, help="JSON file for the fold accuracies")

    export_image = commands.add_parser("export-image", help="image CNN checkpoint -> ONNX with a parity check -> model bundle")
    export_image.add_argument("--checkpoint", required=True, type=Path)
    add_image_data_arguments(export_image)  # the parity images: the held-out test images
    export_image.add_argument("--bundle", required=True, type=Path, help="bundle folder, e.g. models/zoo/digits-cnn")
    export_image.add_argument("--metrics-from", type=Path, action="append", default=[], help="JSON file of extra metrics (e.g. cv-image output)")

    check_drawn = commands.add_parser("check-drawn", help="score an image bundle on digits drawn with a pen (training/drawn_digits.py); last line is JSON")
    check_drawn.add_argument("--bundle", required=True, type=Path)
    check_drawn.add_argument("--device", default="cpu", choices=("cpu", "cuda"))

    show_filters = commands.add_parser("show-filters", help="PNG of an image bundle's first-layer filters and their feature maps for one digit")
    show_filters.add_argument("--bundle", required=True, type=Path)
    show_filters.add_argument("--digit", type=int, default=0, help="which held-out digit image to show the feature maps of (index)")
    show_filters.add_argument("--out", type=Path, default=None, help="PNG to write (default: BUNDLE-filters.png under docs/)")
    add_predict_parser(commands)

    args = parser.parse_args(argv)
    if args.command == "train":
        from training import distributed
        from training.train_classifier import remove_resume_state, resume_folder, train_ensemble
        import torch

        examples = read_examples(args)
        train_part, dev_part = split_dev(examples, dev_fraction=args.dev_fraction, seed=args.seed)
        device = distributed.resolve_training_device(args.device)
        with distributed.job(device, str(resume_folder(args.out))) as ranks:
            checkpoint = train_ensemble(
                train_part, dev_part, args.members, **model_options(args), lowercase=args.format not in CASED_FORMATS,
                seed=args.seed, epochs=args.epochs, min_count=args.min_count, patience=args.patience, device=device,
                resume=resume_folder(args.out),
            )
        if not ranks.is_main:
            return
        checkpoint["metrics"]["train_command"] = command_line()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, args.out)
        remove_resume_state(resume_folder(args.out))
        keys = ("dev_accuracy", "best_epoch", "member_dev_accuracies", "member_best_epochs", "train_examples", "dev_examples")
        summary = {k: checkpoint["metrics"][k] for k in keys if k in checkpoint["metrics"]}
        print(json.dumps({"checkpoint": str(args.out), **summary}))
    elif args.command == "train-lm":
        from training import distributed
        from training.datasets import read_ptb
        from training.train_lm import set_threads, train_language_model

        set_threads(args.threads)
        overrides = dict(item.partition("=")[::2] for item in args.overrides)
        device = distributed.resolve_training_device(args.device)
        with distributed.job(device, str(args.out)) as ranks:
            checkpoint = train_language_model(
                read_ptb(args.data / "train.txt"), read_ptb(args.data / "valid.txt"), args.out, preset=args.preset,
                overrides=overrides, seed=args.seed, device=device, curve_path=args.curve,
                checkpoint_every_seconds=args.checkpoint_every, time_limit_seconds=args.minutes * 60 if args.minutes else None, command=command_line(),
            )
        if not ranks.is_main:
            return
        metrics = checkpoint["metrics"]
        print(json.dumps({"checkpoint": str(args.out), **{k: metrics[k] for k in ("valid_perplexity", "best_epoch", "epochs_run", "epochs")}}))
    elif args.command == "cv":
        from training import distributed
        from training.train_classifier import (CrossValidationMismatch, cross_validate, remove_resume_state, resume_folder,
                                               write_json_atomically)

        # Everything that defines the run; a rerun with the same settings resumes from --out. (--members 1 is
        # left out, so that files written before --members existed still resume.)
        settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in sorted(vars(args).items())
                    if key not in ("command", "out", "device") and not (key == "members" and value == 1)}
        device = distributed.resolve_training_device(args.device)
        try:
            with distributed.job(device, str(args.out) if args.out else None) as ranks:
                result = cross_validate(
                    read_examples(args), folds=args.folds, seed=args.seed, members=args.members, **model_options(args),
                    lowercase=args.format not in CASED_FORMATS, epochs=args.epochs, min_count=args.min_count,
                    patience=args.patience, progress_path=args.out, progress_key=settings, device=device,
                )
        except CrossValidationMismatch as error:
            raise SystemExit(str(error)) from None
        if not ranks.is_main:
            return
        result["cv_command"] = command_line()
        if args.out:
            progress = json.loads(args.out.read_text()) if args.out.exists() else {}
            kept = {key: progress[key] for key in ("cv_fold_curves", "cv_member_runs") if key in progress}
            write_json_atomically(args.out, {**result, "cv_settings": settings, **kept,
                                             "cv_fold_progress": dict(enumerate(result["cv_fold_accuracies"], start=1))})
            remove_resume_state(resume_folder(args.out))
        print(json.dumps(result))
    elif args.command == "export":
        from training.export_onnx import export_bundle
        from training.train_classifier import load_checkpoint

        extra = {"export_command": command_line()}
        for path in args.metrics_from:
            extra.update(json.loads(path.read_text()))
        checkpoint = load_checkpoint(args.checkpoint)
        if checkpoint.get("architecture") == "char-lm":
            from training.datasets import read_ptb
            from training.export_lm import export_language_model

            if args.data is None:
                valid_file = Path(training_data_argument(checkpoint, "export --data")) / "valid.txt"
            elif args.format != "ptb":
                raise SystemExit("a language-model checkpoint is checked on its validation text: --format ptb")
            else:
                valid_file = args.data
            metrics = export_language_model(checkpoint, args.bundle, args.bundle.name, read_ptb(valid_file),
                                            extra_metrics=extra, storage=args.storage)
            print(json.dumps({"bundle": str(args.bundle), **{k: v for k, v in metrics.items() if k.startswith(("parity", "valid_perplexity", "weight_storage"))}}))
            return
        if args.data is not None:
            texts = [example.text for example in read_examples(args)]
        elif checkpoint.get("parity_texts"):
            texts = checkpoint["parity_texts"]
        else:
            raise SystemExit(f"{args.checkpoint} predates kept parity texts: give export --data and --format "
                             "(the training file does)")
        metrics = export_bundle(checkpoint, args.bundle, args.bundle.name, texts, extra_metrics=extra, storage=args.storage)
        print(json.dumps({"bundle": str(args.bundle), **{k: v for k, v in metrics.items() if k.startswith(("parity", "weight_storage"))}}))
    elif args.command == "import-onnx":
        from training.import_onnx import PROBE_TEXTS, ImportRefused, import_onnx

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
    elif args.command == "attach-cv":
        from training.export_onnx import attach_metrics

        cv_result = json.loads(args.cv.read_text())
        bundle_metrics = json.loads((args.bundle / "metrics.json").read_text())
        check_same_recipe(parser, cv_result, bundle_metrics["train_command"], args.cv, args.bundle)
        figures = {key: value for key, value in cv_result.items() if key.startswith("cv_") and key not in CV_BOOKKEEPING}
        attach_metrics(args.bundle, figures)
        print(json.dumps({"bundle": str(args.bundle), **{k: figures[k] for k in ("cv_accuracy_mean", "cv_accuracy_std")}}))
    elif args.command == "optimize":
        from training.export_onnx import optimize_bundle
        from training.quantize import training_split

        for bundle in args.bundle:
            metrics = json.loads((bundle / "metrics.json").read_text())
            train_part, dev_part = training_split(metrics["train_command"])
            texts = [example.text for example in dev_part + train_part[:512]]
            metrics = optimize_bundle(bundle, texts)
            print(json.dumps({"bundle": str(bundle), **{k: v for k, v in metrics.items() if k.startswith("graph_pass")}}))
    elif args.command == "quantize":
        from training.quantize import QuantizationRefused, quantize_bundle

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
    elif args.command == "results":
        from training.results_table import write_results

        for row in write_results(args.zoo, args.out):
            if "quality" in row:  # an int8 bundle beside its fp32 source: (fp32, int8) pairs
                (l32, l8), (t32, t8) = row["latency_ms"], row["throughput"]
                print(f"{row['bundle']}: quality {row['quality'][0]:.2f} -> {row['quality'][1]:.2f}, "
                      f"batch-1 speed-up {l32 / l8:.2f}x, batch-64 speed-up {t8 / t32:.2f}x")
            elif "valid_perplexity" in row:
                print(f"{row['bundle']}: valid perplexity {row['valid_perplexity']:.1f}, {row['tokens_per_second']:,.0f} tokens/s")
            elif "test_accuracy" in row:
                print(f"{row['bundle']}: test accuracy {row['test_accuracy']:.1f}, {row['latency_ms']:.3f} ms/image, {row['throughput']:,.0f} images/s")
            else:
                print(f"{row['bundle']}: {row['accuracy']}, {row['latency_ms']:.2f} ms/text, {row['throughput']:,.0f} texts/s")
        print(f"wrote {args.out}")
    elif args.command == "evaluate":
        from training.evaluate import evaluate_classifier, evaluate_language_model

        if args.format == "ptb":
            from training.datasets import read_ptb

            print(json.dumps(evaluate_language_model(args.bundle, read_ptb(args.data), device=args.device)))
        else:
            print(json.dumps(evaluate_classifier(args.bundle, read_examples(args), device=args.device, out=args.out)))
    elif args.command == "train-image":
        import torch

        from training.train_image import train_image_ensemble

        train_part, test_part, label_names = read_image_data(args)
        checkpoint = train_image_ensemble(train_part, test_part, label_names, args.members, preset=args.preset, seed=args.seed,
                                          epochs=args.epochs, overrides=parse_overrides(args.overrides))
        checkpoint["metrics"]["train_command"] = command_line()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint, args.out)
        print(json.dumps({k: v for k, v in checkpoint["metrics"].items() if k not in ("history", "member_histories")}))
    elif args.command == "cv-image":
        from training.train_image import cv_image_cnn

        train_part, test_part, label_names = read_image_data(args)  # a CNN's test split is never looked at
        result = cv_image_cnn(train_part, label_names, args.preset, folds=args.folds, seed=args.seed,
                              overrides=parse_overrides(args.overrides), baseline=args.baseline, members=args.members)
        if args.baseline == "svm" and test_part is not None:  # a fixed baseline: it chooses nothing
            from training.train_image import svm_accuracy, svm_drawn_accuracy

            result["test_accuracy"] = svm_accuracy(train_part, test_part)
            if label_names == [str(digit) for digit in range(10)]:
                result["drawn_accuracy"] = svm_drawn_accuracy(train_part)
        result["command"] = command_line()
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
    elif args.command == "export-image":
        import torch

        from training.export_image import export_image_bundle

        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        train_part, test_part, _ = read_image_data(args)
        parity_grids = (test_part or train_part)[0]  # parity is about the graph, any real images do
        extra = {"export_command": command_line()}
        for path in args.metrics_from:  # cv-image's result: its figures under cv_ names
            cv = json.loads(path.read_text())
            extra.update({"cv_folds": cv["folds"], "cv_accuracy_mean": cv["mean_accuracy"], "cv_accuracy_std": cv["std_accuracy"],
                          "cv_fold_accuracies": cv["fold_accuracies"], "cv_command": cv["command"]})
            if "mean_drawn_accuracy" in cv:
                extra.update(cv_drawn_accuracy_mean=cv["mean_drawn_accuracy"], cv_drawn_accuracies=cv["drawn_accuracies"])
        metrics = export_image_bundle(checkpoint, args.bundle, args.bundle.name, parity_grids, extra)
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "member_histories")}))
    elif args.command == "check-drawn":
        from training.drawn_digits import check_bundle

        result = check_bundle(args.bundle, args.device)
        for miss in result["missed"]:
            print(f"misread: {miss}")
        print(json.dumps({key: value for key, value in result.items() if key != "missed"}))
    elif args.command == "show-filters":
        from training.show_filters import show_filters

        out = args.out or Path("docs") / f"{args.bundle.name}-filters.png"
        show_filters(args.bundle, args.digit, out)
        print(f"wrote {out}")
    elif args.command == "predict":
        from training.predict import run_predict

        run_predict(args)


def member_count(text: str) -> int:
    """--members: how many networks of one recipe, 1 (a single model) or more."""
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"--members {count}: give 1 (a single model) or more")
    return count


def add_image_model_arguments(parser: argparse.ArgumentParser) -> None:
    from models.image_cnn import PRESETS

    parser.add_argument("--preset", default="digits", choices=tuple(PRESETS),
                        help="digits: the lecture notes' network (the released digits-cnn); digits-16: the same read at 16x16, "
                             "wider, shifted copies (docs/training.md); lenet5: LeNet-5 (models/image_cnn.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a config value, e.g. --set dropout=0.3 --set recipe.shift=2 --set recipe.epochs=60")
    parser.add_argument("--seed", type=int, default=3435)
    parser.add_argument("--members", type=member_count, default=1,
                        help="train this many seeds (--seed, --seed + 1000, ...) and serve the mean of their logits as one model")


def add_image_data_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--idx", nargs=2, type=Path, metavar=("IMAGES", "LABELS"), help="an MNIST-style IDX file pair (training images)")
    source.add_argument("--pictures", type=Path, help="a folder with one sub-folder of PNG/JPEG pictures per class")
    parser.add_argument("--test-idx", nargs=2, type=Path, metavar=("IMAGES", "LABELS"), help="with --idx: the held-out IDX pair")
    # Neither: scikit-learn's 8x8 digits, with their fixed split (training/image_data.py).


def read_image_data(args: argparse.Namespace):
    """((train grids, labels), (test grids, labels) or None, label names) from the chosen source."""
    from training import image_data

    if args.idx:
        grids, labels, names = image_data.read_idx(*args.idx)
        test = image_data.read_idx(*args.test_idx)[:2] if args.test_idx else None
        return (grids, labels), test, names
    if args.pictures:
        grids, labels, names = image_data.read_png_folder(args.pictures)
        return (grids, labels), None, names
    return image_data.digits()


def training_data_argument(checkpoint: dict, instead: str) -> str:
    """The --data of the command that trained `checkpoint`, or an exit saying to give `instead`."""
    command = checkpoint.get("metrics", {}).get("train_command", "")
    words = shlex.split(command)
    if "--data" not in words[:-1]:
        raise SystemExit(f"the checkpoint does not record its training data: give {instead}")
    return words[words.index("--data") + 1]


def data_error_line(error: Exception) -> str:
    """A data problem as the one line a user needs: which file (and line), what is wrong, what to do."""
    if isinstance(error, UnknownLabelError):
        return str(error)  # it says what to do
    if isinstance(error, FileNotFoundError):
        return (f"{error.filename}: no such file. Check --data; the benchmark data sets (PTB, TREC, MR) are not in a "
                "clone: give --data the path of your copy, or try training/sample_data's small samples")
    return f"{error}. `python -m training <command> --help` says what each --format reads"


def run(argv: list[str] | None = None) -> None:
    """main(), with a data file that is missing or malformed reported in one line (exit 2), not a traceback."""
    try:
        main(argv)
    except (MalformedDataError, FileNotFoundError, ColumnError) as error:
        print(f"python -m training: error: {data_error_line(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
