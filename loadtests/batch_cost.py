"""What one onnxruntime batch costs, by its rows and its padded length, for each model family;
what padding a batch of real texts carries; and the budget the service would measure.

    python -m loadtests.batch_cost [--threads 1] [--rounds 5] [--seconds 0.3]
                                   [--models kim-cnn-trec6,char-cnn-small-trec6,lstm-trec6,char-lm-small-ptb]

In process, no server: each model's own session (`threads` intra-op threads: 1 is what each of
the two HTTP workers of a 2-core machine has). For every (rows, padded length) the batch runs
for `seconds`, in `rounds` interleaved rounds (a burst of the machine's noise falls on every
shape alike), and the fastest round is kept. A character CNN reads a fixed number of characters
(its encoder's length), so only its rows vary. Then 64 TREC questions as they come (or 64 news sentences for the
language model): one padded batch against the length groups of the measured budget
(services/backends/cost_batching.py), padded tokens and texts/s.

Prints the tables as markdown (docs/performance.md quotes them).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from loadtests.bench import NEWS_SENTENCES, ZOO, machine, sample_questions
from services.backends.cost_batching import length_groups, padded_tokens, rows_at_typical_length
from services.backends.inference import TextClassifier, read_bundle
from services.backends.language_model import CharLanguageModel

ROWS = (1, 4, 16, 64)
WORD_LENGTHS = (8, 16, 32, 64)
MODELS = "kim-cnn-trec6,char-cnn-small-trec6,lstm-trec6,char-lm-small-ptb"


def per_call_seconds(run: Callable[[], object], seconds: float) -> float:
    """Mean seconds of one `run()` over about `seconds` (after one untimed call)."""
    run()
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        run()
        calls += 1
    return elapsed / calls


def shape_runner(model: TextClassifier | CharLanguageModel, rows: int, length: int) -> Callable[[], object]:
    """One batch of `rows` rows of `length` tokens (ids of 1: the cost does not depend on which)."""
    if isinstance(model, CharLanguageModel):
        char_ids = np.ones((rows, length, model.chars.word_width), np.int64)
        return lambda: model.step(char_ids, *model.initial_state(rows))
    feeds = model.feeds(np.ones((rows, length), np.int64), np.full(rows, length, np.int64))
    return lambda: model.session.run([model.output_name], feeds)


def lengths_of(model: TextClassifier | CharLanguageModel) -> tuple[int, ...]:
    if isinstance(model, TextClassifier) and model.bundle.config["encoding"]["kind"] == "chars":
        return (model.encoder.length,)
    return WORD_LENGTHS


def cost_table(model, rounds: int, seconds: float) -> dict[tuple[int, int], float]:
    """(rows, length) -> fastest seconds per batch over the rounds."""
    shapes = [(rows, length) for length in lengths_of(model) for rows in ROWS]
    runners = {shape: shape_runner(model, *shape) for shape in shapes}
    best = {shape: float("inf") for shape in shapes}
    for _ in range(rounds):
        for shape in shapes:
            best[shape] = min(best[shape], per_call_seconds(runners[shape], seconds))
    return best


def real_texts_table(model, rounds: int, seconds: float) -> list[tuple[str, int, int, int, float]]:
    """64 real texts: (how, groups, padded tokens, text tokens, texts/s) as one padded batch and
    in the length groups of the budget the service would measure."""
    if isinstance(model, CharLanguageModel):
        texts = (NEWS_SENTENCES * 64)[:64]
        lengths = np.array([len(model.tokenize(text)) + 1 for text in texts])  # <eos> included
        run, typical = (lambda: model.score(texts)), model.TYPICAL_TOKENS
    else:
        texts = sample_questions(64)
        lengths = model.encoder.encode_batch(texts)[1]
        run, typical = (lambda: model.logits(texts)), model.typical_width
    budget = model.measure_token_budget(64)
    rows = []
    for how, chosen in (("one padded batch", None), (f"length groups, budget {budget}", budget)):
        model.token_budget = chosen
        groups = length_groups(lengths, chosen, rows_at_typical_length(chosen, typical))
        fastest = min(per_call_seconds(run, seconds) for _ in range(rounds))
        rows.append((how, len(groups), padded_tokens(lengths, groups), int(lengths.sum()), len(texts) / fastest))
    model.token_budget = None
    return rows


def load(name: str, threads: int):
    bundle = read_bundle(ZOO / name)
    if bundle.architecture == "char-lm":
        return CharLanguageModel(bundle, threads=threads)
    return TextClassifier(bundle, threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--models", default=MODELS)
    args = parser.parse_args()
    print(f"`python -m loadtests.batch_cost --threads {args.threads} --rounds {args.rounds} --seconds {args.seconds}` "
          f"on {machine()}, {time.strftime('%Y-%m-%d')}\n")
    for name in args.models.split(","):
        model = load(name, args.threads)
        table = cost_table(model, args.rounds, args.seconds)
        print(f"**{name}**: µs per row (µs per padded token), by rows and padded length\n")
        print("| padded length | " + " | ".join(f"{rows} rows" for rows in ROWS) + " |")
        print("|---" * (len(ROWS) + 1) + "|")
        for length in lengths_of(model):
            cells = [f"{table[rows, length] / rows * 1e6:,.0f} ({table[rows, length] / rows / length * 1e6:.1f})" for rows in ROWS]
            print(f"| {length} | " + " | ".join(cells) + " |")
        print("\n| 64 real texts | groups | padded tokens | text tokens | texts/s |\n|---|---|---|---|---|")
        for how, groups, padded, tokens, per_s in real_texts_table(model, args.rounds, args.seconds):
            print(f"| {how} | {groups} | {padded:,} | {tokens:,} | {per_s:,.0f} |")
        print(flush=True)


if __name__ == "__main__":
    main()
