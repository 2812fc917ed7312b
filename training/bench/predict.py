"""How much of onnxruntime's speed `python -m training predict` keeps: texts/s of the same
bundle on the same texts, from the bare graph to the whole command.

    .venv/bin/python -m training.bench.predict --bundle models/zoo/kim-cnn-trec6 --lines 100000

Rows, each on the same --lines texts (TREC sample questions repeated, or --data), batches of
--batch-size:
- onnxruntime, encoded batches: session.run alone, the texts encoded beforehand (one session,
  intra-op threads = cores): the ceiling;
- TextClassifier, in process: encoding + session.run, what predict's workers run per batch;
- predict, N workers: the command as a user runs it (a subprocess); texts/s is its summary's,
  from the first session's load to the last line written (Python's start-up and imports left out).

Run it on a quiet machine: everything else on the cores shows up in every row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.backends.inference import TextClassifier, read_bundle
from services.config import available_cores
from training.data.datasets import read_trec

REPOSITORY = Path(__file__).resolve().parents[2]
SAMPLE_QUESTIONS = REPOSITORY / "training" / "sample_data" / "trec.txt"


def write_texts(path: Path, lines: int, source: Path | None) -> list[str]:
    """`lines` texts, one per line, cycling through --data's lines or the TREC sample's questions."""
    if source is not None:
        pool = [line for line in source.read_text(encoding="utf-8").split("\n") if line.strip()]
    else:
        pool = [example.text for example in read_trec(SAMPLE_QUESTIONS)]
    texts = [pool[i % len(pool)] for i in range(lines)]
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return texts


def bare_session_rate(classifier: TextClassifier, texts: list[str], batch_size: int) -> float:
    """texts/s of session.run over batches encoded beforehand (the encoding is not timed)."""
    batches = [classifier.encoder.encode_batch(texts[start:start + batch_size]) for start in range(0, len(texts), batch_size)]
    feeds = [classifier.feeds(token_ids, lengths) for token_ids, lengths in batches]
    classifier.session.run([classifier.output_name], feeds[0])  # warm-up: onnxruntime allocates on its first run
    started = time.perf_counter()
    for feed in feeds:
        classifier.session.run([classifier.output_name], feed)
    return len(texts) / (time.perf_counter() - started)


def in_process_rate(classifier: TextClassifier, texts: list[str], batch_size: int) -> float:
    """texts/s of TextClassifier.probabilities, encoding included, batch after batch."""
    classifier.probabilities(texts[:batch_size])
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        classifier.probabilities(texts[start:start + batch_size])
    return len(texts) / (time.perf_counter() - started)


def command_rate(bundle: Path, data: Path, out: Path, batch_size: int, workers: int) -> float:
    """texts/s that `python -m training predict` reports for a fresh run."""
    out.unlink(missing_ok=True)
    run = subprocess.run([sys.executable, "-m", "training", "predict", "--bundle", str(bundle), "--data", str(data),
                          "--out", str(out), "--batch-size", str(batch_size), "--workers", str(workers)],
                         capture_output=True, text=True, cwd=REPOSITORY)
    if run.returncode != 0:
        raise SystemExit(f"predict failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])["texts_per_second"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.bench.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPOSITORY / "models" / "zoo" / "kim-cnn-trec6",
                        help="classifier bundle (default: kim-cnn-trec6)")
    parser.add_argument("--lines", type=int, default=100_000, help="texts to score in each row (default: 100000)")
    parser.add_argument("--data", type=Path, default=None, help="a file of texts, one per line, cycled to --lines "
                        "(default: training/sample_data/trec.txt's questions)")
    parser.add_argument("--batch-size", type=int, default=256, help="texts per onnxruntime run (default: 256, predict's)")
    parser.add_argument("--workers", default="1,2", help="predict's --workers to measure, comma-separated (default: 1,2)")
    parser.add_argument("--rounds", type=int, default=2, help="measure every row this many times, one round after the other")
    args = parser.parse_args(argv)

    cores = available_cores()
    classifier = TextClassifier(read_bundle(args.bundle), threads=cores)
    print(f"{args.bundle.name}, {args.lines:,} texts, batches of {args.batch_size}, {cores} cores\n")
    print("| round | what runs | texts/s | share of bare onnxruntime |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        data, out = Path(folder) / "texts.txt", Path(folder) / "predictions.jsonl"
        texts = write_texts(data, args.lines, args.data)
        for round_number in range(1, args.rounds + 1):  # the same rows again: how much the figures move
            rows = [(f"onnxruntime, encoded batches ({cores} threads)", bare_session_rate(classifier, texts, args.batch_size)),
                    (f"TextClassifier, in process ({cores} threads)", in_process_rate(classifier, texts, args.batch_size))]
            for workers in (int(part) for part in args.workers.split(",")):
                rows.append((f"predict, {workers} worker(s)", command_rate(args.bundle, data, out, args.batch_size, workers)))
            ceiling = rows[0][1]
            for name, rate in rows:
                print(f"| {round_number} | {name} | {rate:,.0f} | {rate / ceiling:.0%} |", flush=True)

if __name__ == "__main__":
    main()
