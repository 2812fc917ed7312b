"""The commands that measure bundles: `evaluate`, `results`, `check-drawn`, `show-filters`. Each
registers its parser and its `run(args)` (training/__main__.py gathers them)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.arguments import add_data_arguments, add_device_argument, read_examples
from training.data.datasets import CLASSIFICATION_FORMATS


def register(commands) -> None:
    for add in (add_evaluate, add_results, add_check_drawn, add_show_filters):
        add(commands)


def add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="score a bundle through onnxruntime; last line is JSON")
    evaluate.add_argument("--bundle", required=True, type=Path)
    add_data_arguments(evaluate, (*CLASSIFICATION_FORMATS, "ptb"))  # ptb: a language-model bundle's perplexity
    add_device_argument(evaluate, auto=False)
    evaluate.add_argument("--out", type=Path, default=None,
                          help="a classifier: write one JSON line per example there (text, gold, predicted, probabilities)")
    evaluate.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> None:
    from training.evaluation.evaluate import evaluate_classifier, evaluate_language_model

    if args.format == "ptb":
        from training.data.datasets import read_ptb

        print(json.dumps(evaluate_language_model(args.bundle, read_ptb(args.data), device=args.device)))
    else:
        print(json.dumps(evaluate_classifier(args.bundle, read_examples(args), device=args.device, out=args.out)))


def add_results(commands) -> None:
    results = commands.add_parser("results", help="regenerate docs/results.md from the zoo (measures speed on this machine)")
    results.add_argument("--zoo", type=Path, default=Path("models/zoo"))
    results.add_argument("--out", type=Path, default=Path("docs/results.md"))
    results.set_defaults(run=run_results)


def result_line(row: dict) -> str:
    """One bundle's row of the results table as a line for the terminal."""
    if "quality" in row:  # an int8 bundle beside its fp32 source: (fp32, int8) pairs
        (l32, l8), (t32, t8) = row["latency_ms"], row["throughput"]
        return (f"{row['bundle']}: quality {row['quality'][0]:.2f} -> {row['quality'][1]:.2f}, "
                f"batch-1 speed-up {l32 / l8:.2f}x, batch-64 speed-up {t8 / t32:.2f}x")
    if "valid_perplexity" in row:
        return f"{row['bundle']}: valid perplexity {row['valid_perplexity']:.1f}, {row['tokens_per_second']:,.0f} tokens/s"
    if "test_accuracy" in row:
        return f"{row['bundle']}: test accuracy {row['test_accuracy']:.1f}, {row['latency_ms']:.3f} ms/image, {row['throughput']:,.0f} images/s"
    return f"{row['bundle']}: {row['accuracy']}, {row['latency_ms']:.2f} ms/text, {row['throughput']:,.0f} texts/s"


def run_results(args: argparse.Namespace) -> None:
    from training.evaluation.results_table import write_results

    for row in write_results(args.zoo, args.out):
        print(result_line(row))
    print(f"wrote {args.out}")


def add_check_drawn(commands) -> None:
    check_drawn = commands.add_parser("check-drawn", help="score an image bundle on digits drawn with a pen (training/evaluation/drawn_digits.py); last line is JSON")
    check_drawn.add_argument("--bundle", required=True, type=Path)
    add_device_argument(check_drawn, auto=False)
    check_drawn.set_defaults(run=run_check_drawn)


def run_check_drawn(args: argparse.Namespace) -> None:
    from training.evaluation.drawn_digits import check_bundle

    result = check_bundle(args.bundle, args.device)
    for miss in result["missed"]:
        print(f"misread: {miss}")
    print(json.dumps({key: value for key, value in result.items() if key != "missed"}))


def add_show_filters(commands) -> None:
    show_filters = commands.add_parser("show-filters", help="PNG of an image bundle's first-layer filters and their feature maps for one digit")
    show_filters.add_argument("--bundle", required=True, type=Path)
    show_filters.add_argument("--digit", type=int, default=0, help="which held-out digit image to show the feature maps of (index)")
    show_filters.add_argument("--out", type=Path, default=None, help="PNG to write (default: BUNDLE-filters.png under docs/)")
    show_filters.set_defaults(run=run_show_filters)


def run_show_filters(args: argparse.Namespace) -> None:
    from training.evaluation.show_filters import show_filters

    out = args.out or Path("docs") / f"{args.bundle.name}-filters.png"
    show_filters(args.bundle, args.digit, out)
    print(f"wrote {out}")
