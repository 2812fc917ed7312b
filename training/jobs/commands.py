"""The training commands: `train`, `cv`, `train-lm`, `train-image`, `cv-image`. Each registers its
parser and its `run(args)` on `python -m training`'s subcommands (training/__main__.py gathers
them); the jobs themselves are the modules beside this one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.arguments import (CASED_FORMATS, add_data_arguments, add_device_argument, add_image_data_arguments,
                                add_image_model_arguments, add_model_arguments, add_overrides_argument, command_line,
                                member_count, model_options, parse_overrides, read_examples, read_image_data,
                                recorded_arguments)


def register(commands) -> None:
    for add in (add_train, add_cv, add_train_lm, add_train_image, add_cv_image):
        add(commands)


# --------------------------------------------------------------------------- train


def add_train(commands) -> None:
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
    add_device_argument(train)
    train.add_argument("--out", required=True, type=Path,
                       help="checkpoint file to write; the run in progress is kept in OUT.resume/ after every epoch, and a "
                            "rerun of the same command resumes it")
    train.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> None:
    import torch

    from training.data.datasets import split_dev
    from training.jobs import distributed
    from training.jobs.classifier import remove_resume_state, resume_folder, train_ensemble

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
    checkpoint["metrics"].update(train_command=command_line(), train_arguments=recorded_arguments(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, args.out)
    remove_resume_state(resume_folder(args.out))
    keys = ("dev_accuracy", "best_epoch", "member_dev_accuracies", "member_best_epochs", "train_examples", "dev_examples")
    summary = {k: checkpoint["metrics"][k] for k in keys if k in checkpoint["metrics"]}
    print(json.dumps({"checkpoint": str(args.out), **summary}))


# --------------------------------------------------------------------------- cv


def add_cv(commands) -> None:
    cv = commands.add_parser("cv", help="k-fold cross-validation (Kim's protocol for MR); prints mean and std")
    add_data_arguments(cv)
    add_model_arguments(cv)
    cv.add_argument("--folds", type=int, default=10)
    cv.add_argument("--epochs", type=int, default=None)
    cv.add_argument("--seed", type=int, default=3435)
    cv.add_argument("--min-count", type=int, default=1)
    cv.add_argument("--patience", type=int, default=None)
    cv.add_argument("--members", type=member_count, default=1, help="an ensemble of this many seeds per fold, as train --members")
    add_device_argument(cv)
    cv.add_argument("--out", type=Path, default=None, help="write the result as JSON here; each fold is saved as it ends and a rerun resumes")
    cv.set_defaults(run=run_cv)


def cv_settings(args: argparse.Namespace) -> dict:
    """Everything that defines a cv run; a rerun with the same settings resumes from --out. (--members 1
    is left out, so that files written before --members existed still resume.)"""
    return {key: value for key, value in recorded_arguments(args).items()
            if key not in ("command", "out", "device") and not (key == "members" and value == 1)}


def run_cv(args: argparse.Namespace) -> None:
    from training.jobs import distributed
    from training.jobs.classifier import (CrossValidationMismatch, cross_validate, remove_resume_state, resume_folder,
                                          write_json_atomically)

    settings = cv_settings(args)
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


# --------------------------------------------------------------------------- train-lm


def add_train_lm(commands) -> None:
    train_lm = commands.add_parser("train-lm", help="train (or resume) the character-aware language model on PTB")
    train_lm.add_argument("--data", required=True, type=Path, help="folder with train.txt and valid.txt (Mikolov's PTB layout)")
    train_lm.add_argument("--preset", default="small", choices=("small", "large"))
    add_overrides_argument(train_lm, "--set hidden_size=64 --set recipe.epochs=2")
    train_lm.add_argument("--out", required=True, type=Path, help="checkpoint: written every few minutes; an existing one is resumed")
    train_lm.add_argument("--curve", type=Path, default=None, help="JSON-lines file of per-epoch figures (default: OUT with .curve.jsonl)")
    add_device_argument(train_lm)
    train_lm.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    train_lm.add_argument("--seed", type=int, default=3435)
    train_lm.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between mid-epoch checkpoints")
    train_lm.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this long; rerun to resume")
    train_lm.set_defaults(run=run_train_lm)


def run_train_lm(args: argparse.Namespace) -> None:
    from training.data.datasets import read_ptb
    from training.jobs import distributed
    from training.jobs.language_model import set_threads, train_language_model

    set_threads(args.threads)
    device = distributed.resolve_training_device(args.device)
    with distributed.job(device, str(args.out)) as ranks:
        checkpoint = train_language_model(
            read_ptb(args.data / "train.txt"), read_ptb(args.data / "valid.txt"), args.out, preset=args.preset,
            overrides=parse_overrides(args.overrides), seed=args.seed, device=device, curve_path=args.curve,
            checkpoint_every_seconds=args.checkpoint_every,
            time_limit_seconds=args.minutes * 60 if args.minutes is not None else None,
            command=command_line(), arguments=recorded_arguments(args),
        )
    if not ranks.is_main:
        return
    metrics = checkpoint["metrics"]
    print(json.dumps({"checkpoint": str(args.out), **{k: metrics[k] for k in ("valid_perplexity", "best_epoch", "epochs_run", "epochs")}}))


# --------------------------------------------------------------------------- the image CNNs


def add_train_image(commands) -> None:
    train_image = commands.add_parser("train-image", help="train an image CNN (models/image_cnn.py) on scikit-learn's digits, an IDX pair or a picture folder")
    add_image_data_arguments(train_image)
    add_image_model_arguments(train_image)
    train_image.add_argument("--epochs", type=int, default=None, help="override the preset's epoch count")
    train_image.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    train_image.set_defaults(run=run_train_image)


def run_train_image(args: argparse.Namespace) -> None:
    import torch

    from training.jobs.image import train_image_ensemble

    train_part, test_part, label_names = read_image_data(args)
    checkpoint = train_image_ensemble(train_part, test_part, label_names, args.members, preset=args.preset, seed=args.seed,
                                      epochs=args.epochs, overrides=parse_overrides(args.overrides))
    checkpoint["metrics"].update(train_command=command_line(), train_arguments=recorded_arguments(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, args.out)
    print(json.dumps({k: v for k, v in checkpoint["metrics"].items() if k not in ("history", "member_histories", "train_arguments")}))


def add_cv_image(commands) -> None:
    cv_image = commands.add_parser("cv-image", help="k-fold cross-validation of an image preset over contiguous blocks (other writers) of the training images")
    add_image_data_arguments(cv_image)
    add_image_model_arguments(cv_image)
    cv_image.add_argument("--folds", type=int, default=5)
    cv_image.add_argument("--baseline", choices=("svm",), default=None,
                          help="svm: score scikit-learn's RBF SVC (C=10, gamma=0.001) on the same folds instead of a CNN, and on the held-out test images")
    cv_image.add_argument("--out", type=Path, default=None, help="JSON file for the fold accuracies")
    cv_image.set_defaults(run=run_cv_image)


def run_cv_image(args: argparse.Namespace) -> None:
    from training.jobs.image import cv_image_cnn

    train_part, test_part, label_names = read_image_data(args)  # a CNN's test split is never looked at
    result = cv_image_cnn(train_part, label_names, args.preset, folds=args.folds, seed=args.seed,
                          overrides=parse_overrides(args.overrides), baseline=args.baseline, members=args.members)
    if args.baseline == "svm" and test_part is not None:  # a fixed baseline: it chooses nothing
        from training.jobs.image import svm_accuracy, svm_drawn_accuracy

        result["test_accuracy"] = svm_accuracy(train_part, test_part)
        if label_names == [str(digit) for digit in range(10)]:
            result["drawn_accuracy"] = svm_drawn_accuracy(train_part)
    result["command"] = command_line()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
