"""Regenerates docs/results.md from the zoo: `python -m training results`.

Accuracy comes from each bundle's metrics.json (written by the train/cv/export commands it
names); parameters and size are read from model.onnx; latency and throughput are measured
here, through services.backends.inference (the service's own onnxruntime path, encoding included),
on the machine that runs the command.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from models.dilated_cnn import receptive_field_table
from models.text_encoding import scoring_stream, tokenize
from services.backends.inference import IMAGE_ARCHITECTURE, LANGUAGE_MODEL_ARCHITECTURE, TextClassifier, read_bundle
from services.backends.language_model import STEP_GRAPH, WORD_ENCODER_GRAPH, CharLanguageModel
from training.data.datasets import read_mr_dir, read_trec

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
LATENCY_RUNS = 200
THROUGHPUT_RUNS = 20
THROUGHPUT_BATCH = 64

# Published figures for these sets (TREC: test set; MR: 10-fold CV). Kim 2014 Table 2; Zhang
# et al. 2015 and the RNN baselines report none for TREC or MR.
PAPER = {
    ("kim-cnn", "trec6"): "91.2 (CNN-rand; static 92.8, non-static 93.6, multichannel 92.2)",
    ("kim-cnn", "mr"): "76.1 (CNN-rand; static 81.0, non-static 81.5, multichannel 81.1)",
}


# Kim, Jernite, Sontag & Rush 2016, Table 3 (PTB test), and what the authors' code reaches on
# validation (shared/docs/models.md).
LM_PAPER = {
    "small": "92.3 test (LSTM-Char-Small, 5 M); the authors' code about 96 valid",
    "large": "78.9 test (LSTM-Char-Large, 19 M); the authors' code about 82 valid",
}
LM_STREAM_TOKENS = 2000
LM_STEP_RUNS = 200
# Kim et al. 2016 Table 6: words in PTB's vocabulary, then words it never saw; their nearest
# vocabulary words by cosine, before the highway layers (the CNN's output) and after them.
TABLE6_WORDS = ("while", "his", "you", "richard", "trading", "computer-aided", "misinformed", "looooook")
TABLE6_NEIGHBORS = 4


def parameter_count(onnx_path: Path) -> int:
    return sum(int(np.prod(init.dims)) for init in onnx.load(str(onnx_path)).graph.initializer)


def sample_texts(data_set: str) -> list[str]:
    if data_set == "mr":
        return [e.text for e in read_mr_dir(SAMPLE_DATA / "mr")]
    return [e.text for e in read_trec(SAMPLE_DATA / "trec.txt")]


def measure_speed(classifier: TextClassifier, texts: list[str]) -> tuple[float, float]:
    """(median ms per text at batch 1, median texts/s at batch 64)."""
    for text in texts[:20]:
        classifier.logits([text])  # warm-up
    single = []
    for run in range(LATENCY_RUNS):
        started = time.perf_counter()
        classifier.logits([texts[run % len(texts)]])
        single.append(time.perf_counter() - started)
    batched = []
    for run in range(THROUGHPUT_RUNS):
        start = (run * THROUGHPUT_BATCH) % (len(texts) - THROUGHPUT_BATCH)
        started = time.perf_counter()
        classifier.logits(texts[start : start + THROUGHPUT_BATCH])
        batched.append(time.perf_counter() - started)
    return 1000 * statistics.median(single), THROUGHPUT_BATCH / statistics.median(batched)


def bundle_row(path: Path) -> dict:
    bundle = read_bundle(path)
    data_set = "mr" if bundle.name.endswith("-mr") else "trec6"
    classifier = TextClassifier(bundle)
    latency_ms, throughput = measure_speed(classifier, sample_texts(data_set))
    metrics = bundle.metrics
    if "cv_accuracy_mean" in metrics:
        accuracy = (f"{100 * metrics['cv_accuracy_mean']:.1f} ± {100 * metrics['cv_accuracy_std']:.1f} "
                    f"({metrics.get('cv_folds', 10)}-fold CV" + (f"; dev {100 * metrics['dev_accuracy']:.1f})" if data_set != "mr" else ")"))
    elif data_set == "mr":
        accuracy = f"{100 * metrics['dev_accuracy']:.1f} (dev; CV not run yet)"
    else:
        accuracy = f"{100 * metrics['dev_accuracy']:.1f} (dev)"
    return {
        "bundle": bundle.name,
        "architecture": f"{bundle.architecture} {bundle.config.get('preset', '')}".strip()
        + (f" (vectors: {metrics['vectors_file']})" if metrics.get("vectors_file") else ""),
        "data": data_set,
        "accuracy": accuracy,
        # The model's own count; the graph's initializers can hold a weight twice (Kim's
        # evidence outputs reuse the output layer), so they are only the fall-back.
        "parameters": metrics.get("parameters") or parameter_count(path / "model.onnx"),
        "onnx_mb": (path / "model.onnx").stat().st_size / 2**20,
        "latency_ms": latency_ms,
        "throughput": throughput,
        "paper": PAPER.get((bundle.architecture, data_set), "none published"),
        "commands": {k: v for k, v in metrics.items() if k.endswith("_command")},
    }


def lm_speed(language_model: CharLanguageModel) -> tuple[float, float]:
    """(tokens/s scoring, ms per next-word step): the committed MR sample read as one stream,
    scored at batch 1 in chunks of 35 words; one step is one word in with the state carried, as
    generation runs it."""
    tokens = [t for e in read_mr_dir(SAMPLE_DATA / "mr") for t in (*tokenize(e.text), "<eos>")][:LM_STREAM_TOKENS]
    input_chars, targets = scoring_stream(tokens, language_model.vocab, language_model.chars)
    language_model.stream_log_probs(input_chars[:200], targets[:200], chunk=35)  # warm-up
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        language_model.stream_log_probs(input_chars, targets, chunk=35)
        runs.append(time.perf_counter() - started)
    h, c = language_model.initial_state(1)
    steps = []
    for run in range(LM_STEP_RUNS):
        word = input_chars[None, run : run + 1]  # (1, 1, W)
        started = time.perf_counter()
        _, h, c = language_model.step(word, h, c)
        steps.append(time.perf_counter() - started)
    return len(targets) / statistics.median(runs), 1000 * statistics.median(steps)


def lm_row(path: Path) -> dict:
    bundle = read_bundle(path)
    language_model = CharLanguageModel(bundle)
    metrics = bundle.metrics
    tokens_per_second, step_ms = lm_speed(language_model)
    neighbors = {layer: dict(zip(TABLE6_WORDS, language_model.neighbors(TABLE6_WORDS, TABLE6_NEIGHBORS, layer)))
                 for layer in ("cnn", "highway")}
    return {
        "bundle": bundle.name,
        "preset": bundle.config["preset"],
        "neighbors": neighbors,
        "valid_perplexity": metrics["valid_perplexity_onnx"],
        "valid_tokens": metrics["valid_tokens_scored"],
        "best_epoch": metrics["best_epoch"],
        "best_weights": metrics.get("best_weights", "raw"),
        "epochs_run": metrics["epochs_run"],
        "epochs": metrics["epochs"] + metrics.get("tail_epochs", 0),
        "parameters": metrics["parameters"],
        "onnx_mb": sum((path / graph).stat().st_size for graph in (STEP_GRAPH, WORD_ENCODER_GRAPH)) / 2**20,
        "tokens_per_second": tokens_per_second,
        "step_ms": step_ms,
        "train_hours": metrics["train_seconds"] / 3600,
        "device": metrics.get("device", "cpu"),
        "paper": LM_PAPER.get(bundle.config["preset"], "none published"),
        "history": metrics.get("history", []),
        "commands": {k: v for k, v in metrics.items() if k.endswith("_command")},
    }


def render_language_models(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "## Character-aware language models (Kim et al. 2016) on PTB",
        "",
        "Validation perplexity of the released bundle through onnxruntime, the whole validation file",
        "read as one stream with the state carried (exp of the mean NLL over every token, as",
        "`python -m training evaluate --format ptb` prints it; the test file is held out).",
        "",
        "| bundle | preset | valid perplexity | tokens | best epoch / run / planned | parameters | ONNX MB (2 graphs) | tokens/s scoring (batch 1) | ms per next-word step | training | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['bundle']}` | {row['preset']} | {row['valid_perplexity']:.1f} | {row['valid_tokens']:,} | "
            f"{row['best_epoch']} / {row['epochs_run']} / {row['epochs']} | {row['parameters']:,} | {row['onnx_mb']:.1f} | "
            f"{row['tokens_per_second']:,.0f} | {row['step_ms']:.2f} | {row['train_hours']:.1f} h on {row['device']} | {row['paper']} |"
        )
    for row in rows:
        averaged = any("valid_perplexity_averaged" in entry for entry in row["history"])
        lines += ["", f"Validation curve of `{row['bundle']}` (from its metrics.json; PyTorch, the same stream):", ""]
        tail = any("cycle" in entry for entry in row["history"])
        if averaged:  # recipe.average_from_halving: the running mean of the weights, validated beside the raw ones
            lines += ["The averaged column is the running mean of the weights: in the recipe's epochs over every step",
                      "since the halving `recipe.average_from_halving` names (Polyak averaging)" + (
                          "; in the tail's cycles (rate falling from the value shown to 0 within the epoch) over the"
                          " recipe's last weights and each cycle's last weights (SWA, `recipe.tail_epochs`)" if tail else "") + ";",
                      f"the bundle holds the {row['best_weights']} weights of epoch {row['best_epoch']}.", ""]
        lines += ["| epoch | learning rate | train perplexity | valid perplexity |" + (" valid, averaged weights |" if averaged else ""),
                  "|---|---|---|---|" + ("---|" if averaged else "")]
        for entry in row["history"]:
            cell = (f" {entry['valid_perplexity_averaged']:.1f} |" if "valid_perplexity_averaged" in entry else " |") if averaged else ""
            rate = f"{entry['learning_rate']:g} → 0" if "cycle" in entry else f"{entry['learning_rate']:g}"
            lines.append(f"| {entry['epoch']} | {rate} | {entry['train_perplexity']:.1f} | {entry['valid_perplexity']:.1f} |{cell}")
        lines += ["", f"Nearest vocabulary words of `{row['bundle']}` by cosine (the paper's Table 6; the last",
                  "three words are not in PTB's vocabulary, their vectors come from their characters):", "",
                  "| word | before the highway layers | after the highway layers |", "|---|---|---|"]
        for word in TABLE6_WORDS:
            cells = [", ".join(f"{neighbor} ({similarity:.2f})" for neighbor, similarity in row["neighbors"][layer][word])
                     for layer in ("cnn", "highway")]
            lines.append(f"| {word} | {cells[0]} | {cells[1]} |")
        lines += ["", f"Commands of `{row['bundle']}`:"]
        for key, command in sorted(row["commands"].items()):
            lines.append(f"- {key.removesuffix('_command')}: `{command}`")
    return lines


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def image_row(path: Path) -> dict:
    """An image classifier: its held-out accuracy re-measured through onnxruntime, and its speed."""
    from services.backends.inference import ImageClassifier
    from training.data.image_data import digits

    bundle = read_bundle(path)
    classifier = ImageClassifier(bundle)
    train_part, (grids, labels), _ = digits()
    accuracy = float((classifier.probabilities(grids).argmax(axis=1) == labels).mean())
    images = classifier.encoder.encode(grids)
    for image in images[:20]:
        classifier.logits_of_images(image[None])  # warm-up
    single, batched = [], []
    for run in range(LATENCY_RUNS):
        started = time.perf_counter()
        classifier.logits_of_images(images[run % len(images)][None])
        single.append(time.perf_counter() - started)
    for run in range(THROUGHPUT_RUNS):
        start = (run * THROUGHPUT_BATCH) % (len(images) - THROUGHPUT_BATCH)
        started = time.perf_counter()
        classifier.logits_of_images(images[start: start + THROUGHPUT_BATCH])
        batched.append(time.perf_counter() - started)
    from training.evaluation.drawn_digits import check_bundle
    from training.jobs.image import SVM_BASELINE, svm_accuracy, svm_drawn_accuracy

    metrics = bundle.metrics
    cv = (f"{100 * metrics['cv_accuracy_mean']:.1f} ± {100 * metrics['cv_accuracy_std']:.1f} ({metrics['cv_folds']} folds)"
          if "cv_accuracy_mean" in metrics else f"{100 * metrics['dev_accuracy']:.1f} (dev)")
    members = bundle.config.get("ensemble", {}).get("members")
    preset = bundle.config.get("preset", "") + (f" × {members} seeds" if members else "")
    return {"bundle": bundle.name, "preset": preset, "test_accuracy": 100 * accuracy,
            "recorded_test_accuracy": 100 * metrics["test_accuracy"], "selection": cv,
            "svm_test_accuracy": 100 * svm_accuracy(train_part, (grids, labels)), "svm": SVM_BASELINE,
            "drawn_accuracy": 100 * check_bundle(path)["drawn_accuracy"], "svm_drawn_accuracy": 100 * svm_drawn_accuracy(train_part),
            "parameters": metrics["parameters"], "onnx_kb": (path / "model.onnx").stat().st_size / 1024,
            "latency_ms": 1000 * statistics.median(single), "throughput": THROUGHPUT_BATCH / statistics.median(batched),
            "commands": {k: v for k, v in metrics.items() if k.endswith("_command")}}


def render_images(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Image classifiers (the lecture notes' CNN example)", "",
             "scikit-learn's 8x8 digits (1,797 images shipped inside the package): the last 360 are the held-out",
             "test set, the first 1,437 train. Recipes are compared by cross-validation over contiguous blocks of",
             "the 1,437 (`python -m training cv-image`: other writers, as the held-out 360 are; docs/training.md has",
             "the table and why a shuffled dev split misled). Test accuracy re-measured here through onnxruntime (`services/backends/inference.py`",
             "ImageClassifier), next to the figure the training recorded; beside it, scikit-learn's RBF SVM on the",
             "same split (re-measured here) and LeNet-5's paper figure, which is on MNIST (60,000 28x28 digits), not these.",
             "Drawn: the share of the 396 pen-drawn digits of training/evaluation/drawn_digits.py read correctly (`python -m training",
             "check-drawn --bundle ...`: every digit in two or three styles, three pens, three slants, two widths), the SVM's beside it.", "",
             "| bundle | preset | test accuracy (re-measured / recorded) | CV accuracy | RBF SVM, same split | drawn digits (bundle / SVM) | LeNet-5 (paper, MNIST) | parameters | ONNX KB | ms per image, batch 1 (median) | images/s, batch 64 (median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| `{row['bundle']}` | {row['preset']} | {row['test_accuracy']:.1f} / {row['recorded_test_accuracy']:.1f} | "
                     f"{row['selection']} | {row['svm_test_accuracy']:.1f} (C={row['svm']['C']:g}, gamma={row['svm']['gamma']:g}) | "
                     f"{row['drawn_accuracy']:.1f} / {row['svm_drawn_accuracy']:.1f} | "
                     f"99.05 (0.95 % error; 99.2 with distortions) | "
                     f"{row['parameters']:,} | {row['onnx_kb']:.0f} | {row['latency_ms']:.3f} | {row['throughput']:,.0f} |")
    for row in rows:
        lines.append(f"- `{row['bundle']}`: " + "; ".join(f"{k.removesuffix('_command')}: `{v}`" for k, v in sorted(row["commands"].items())))
    return lines


def render(rows: list[dict], language_models: list[dict] | None = None, int8_rows: list[dict] | None = None,
           image_rows: list[dict] | None = None) -> str:
    machine = f"{cpu_name()} ({platform.machine()}, {os.cpu_count()} cores); onnxruntime {ort.__version__} CPU, default threads"
    lines = [
        "# Results: every released classifier",
        "",
        "Generated by `python -m training results` (training/evaluation/results_table.py) from `models/zoo/`;",
        "do not edit by hand. Accuracy in %, as recorded by the commands listed below the table;",
        "TREC-6 figures are on the dev split (10 % of train, seed 3435; the test set is held out),",
        "MR figures are 10-fold cross-validation where it was run, else the dev split.",
        "The commands run in the virtual environment `make serve` builds (`. .venv/bin/activate`); the",
        "paper data sets are not in a clone (`../shared/data` on the development machine).",
        f"Speed measured by this command on: {machine}.",
        "",
        "| bundle | architecture | data | accuracy (train / cv command) | parameters | ONNX MB | ms per text, batch 1 (median) | texts/s, batch 64 (median) | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['bundle']}` | {row['architecture']} | {row['data']} | {row['accuracy']} | {row['parameters']:,} | "
            f"{row['onnx_mb']:.1f} | {row['latency_ms']:.2f} | {row['throughput']:,.0f} | {row['paper']} |"
        )
    lines += ["", "## Commands that produced each bundle", ""]
    for row in rows:
        lines.append(f"- `{row['bundle']}`:")
        for key, command in sorted(row["commands"].items()):
            lines.append(f"  - {key.removesuffix('_command')}: `{command}`")
    lines += [
        "",
        "## Dilated vs plain convolution stacks (kernel 3, 300 channels)",
        "",
        "Layers and convolution parameters needed for a receptive field of n words: dilations",
        "1, 2, 4, ... reach n with log2 layers, a plain stack needs (n - 1) / 2 (O(k m^2 log n)",
        "against O(k m^2 n)). Computed by `models.dilated_cnn.receptive_field_table`.",
        "",
        "| receptive field (words) | dilated layers | dilated parameters | plain layers | plain parameters |",
        "|---|---|---|---|---|",
    ]
    for entry in receptive_field_table():
        lines.append(
            f"| {entry['receptive_field']} | {entry['dilated_layers']} | {entry['dilated_parameters']:,} | "
            f"{entry['plain_layers']} | {entry['plain_parameters']:,} |"
        )
    lines += render_language_models(language_models or [])
    lines += render_int8(int8_rows or [])
    lines += render_images(image_rows or [])
    return "\n".join(lines) + "\n"


def int8_row(path: Path, zoo: Path) -> dict:
    """An int8 bundle against the fp32 bundle it was quantized from, both measured here, one
    right after the other (the speed-up is a ratio taken in one run)."""
    int8 = read_bundle(path)
    fp32_path = zoo / int8.config["quantization"]["of"]
    fp32 = read_bundle(fp32_path)
    row = {"bundle": int8.name, "of": fp32.name, "method": int8.config["quantization"]["method"],
           "onnx_mb": [sum(p.stat().st_size for p in folder.glob("*.onnx")) / 2**20 for folder in (fp32_path, path)],
           "command": int8.metrics["quantize_command"]}
    if int8.architecture == LANGUAGE_MODEL_ARCHITECTURE:
        speeds = [lm_speed(CharLanguageModel(bundle)) for bundle in (fp32, int8)]
        row.update(kind="language model", quality=[int8.metrics["fp32_valid_perplexity"], int8.metrics["valid_perplexity_onnx"]],
                   latency_ms=[speed[1] for speed in speeds], throughput=[speed[0] for speed in speeds])
    else:
        data_set = "mr" if fp32.name.endswith("-mr") else "trec6"
        speeds = [measure_speed(TextClassifier(bundle), sample_texts(data_set)) for bundle in (fp32, int8)]
        row.update(kind="classifier", quality=[100 * int8.metrics["fp32_dev_accuracy"], 100 * int8.metrics["dev_accuracy"]],
                   latency_ms=[speed[0] for speed in speeds], throughput=[speed[1] for speed in speeds])
    return row


def render_int8(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "## int8 variants (`python -m training quantize`)",
        "",
        "Each int8 bundle beside the fp32 bundle it was quantized from, measured by this command one",
        "right after the other. Quality through onnxruntime: classifiers' accuracy (%) on their",
        "training run's dev split (MR too: cross-validation would retrain), the language model's",
        "validation perplexity. The quantize gate refuses a drop over 0.5 points or a rise over 1 %.",
        "Language-model speed: tokens/s scoring at batch 1, ms per next-word step.",
        "",
        "| int8 bundle | method | quality fp32 → int8 | ms per text (LM: step), batch 1, fp32 → int8 | speed-up | texts/s batch 64 (LM: tokens/s), fp32 → int8 | speed-up | ONNX MB fp32 → int8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        (q32, q8), (l32, l8), (t32, t8), (m32, m8) = row["quality"], row["latency_ms"], row["throughput"], row["onnx_mb"]
        quality = f"{q32:.1f} → {q8:.1f}" if row["kind"] == "classifier" else f"{q32:.2f} → {q8:.2f} (+{100 * (q8 / q32 - 1):.2f} %)"
        lines.append(f"| `{row['bundle']}` | {row['method']} | {quality} | {l32:.2f} → {l8:.2f} | {l32 / l8:.2f}x | "
                     f"{t32:,.0f} → {t8:,.0f} | {t8 / t32:.2f}x | {m32:.1f} → {m8:.1f} |")
    lines += ["", "Commands: " + "; ".join(f"`{row['command']}`" for row in rows[:1]) + " (one per bundle, same form)."]
    return lines


def write_results(zoo: Path, out: Path) -> list[dict]:
    """Write the tables; returns the classifier rows, the language-model rows, the int8 rows."""
    paths = [path for path in sorted(zoo.iterdir()) if (path / "manifest.json").is_file() and not path.name.startswith(".")]
    bundles = {path: read_bundle(path) for path in paths}
    quantized = [path for path in paths if "quantization" in bundles[path].config]
    released = [path for path in paths if path not in quantized]
    text = [path for path in released if bundles[path].architecture not in (LANGUAGE_MODEL_ARCHITECTURE, IMAGE_ARCHITECTURE)]
    rows = [bundle_row(path) for path in text]
    language_models = [lm_row(path) for path in released if bundles[path].architecture == LANGUAGE_MODEL_ARCHITECTURE]
    image_rows = [image_row(path) for path in released if bundles[path].architecture == IMAGE_ARCHITECTURE]
    int8_rows = [int8_row(path, zoo) for path in quantized]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, language_models, int8_rows, image_rows))
    return rows + language_models + int8_rows + image_rows
