"""services/backends/cost_batching.py: groups of similar length within a padded-token budget,
the budget measured from a cost curve, agreed on by a server's processes; and the real
bundles answering the same, in the same order, whether their texts run as one padded batch or
as groups."""

import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

from services.backends.cost_batching import LONGEST_TIMED_S, agreed_budget, length_groups, measure_token_budget, padded_tokens
from services.backends.inference import TextClassifier, read_bundle
from services.backends.language_model import CharLanguageModel
from services.config import REPOSITORY_ROOT

ZOO = REPOSITORY_ROOT / "models" / "zoo"
QUESTIONS = [line.split(" ", 1)[1] for line in (REPOSITORY_ROOT / "training" / "sample_data" / "trec.txt")
             .read_text(encoding="latin-1").splitlines()[:48]]
SENTENCES = ["the company said it would buy the shares", "stocks fell", "the federal reserve is expected to cut interest rates next month",
             "mr. smith declined to comment", "N", "the board approved a plan to sell its unit for $ N million in cash and stock"]


def test_rows_are_grouped_by_length_within_the_budget_by_hand():
    lengths = np.array([5, 1, 3, 9, 2])
    # Sorted: row 1 (1), row 4 (2), row 2 (3), row 0 (5), row 3 (9). Budget 6: a group whose
    # longest row has L tokens holds 6 // L rows: rows 1 and 4 (2 x 2 = 4; adding row 2 makes
    # 3 x 3 = 9); row 2 alone (row 0 would make 2 x 5); row 0 alone; row 3 (9 tokens) alone.
    groups = length_groups(lengths, 6)
    assert [list(group) for group in groups] == [[1, 4], [2], [0], [3]]
    assert padded_tokens(lengths, groups) == 2 * 2 + 3 + 5 + 9
    assert padded_tokens(lengths, length_groups(lengths, None)) == 5 * 9  # one padded batch: every row as long as the longest


def test_texts_longer_than_the_typical_one_still_run_min_rows_together():
    lengths = np.array([300, 12, 250, 400, 280, 10, 11])
    # Budget 64 tokens, min_rows 4 (4 rows at a typical 16): at 10-12 tokens a group holds
    # 64 // 12 = 5 rows, at 250-400 tokens still 4: sorted, 10, 11, 12, 250 | 280, 300, 400.
    groups = length_groups(lengths, 64, min_rows=4)
    assert [list(group) for group in groups] == [[5, 6, 1, 2], [4, 0, 3]]
    assert [list(group) for group in length_groups(lengths, 64)] == [[5, 6, 1], [2], [4], [0], [3]]  # min_rows 1: alone
    assert [len(group) for group in length_groups(np.full(20, 4), 64, min_rows=4)] == [16, 4]  # short texts pack more rows


def test_without_a_budget_or_with_one_row_the_batch_stays_whole_and_in_order():
    lengths = np.array([7, 2, 4])
    assert [list(group) for group in length_groups(lengths, None)] == [[0, 1, 2]]
    assert [list(group) for group in length_groups(np.array([40]), 8)] == [[0]]
    assert [list(group) for group in length_groups(lengths, 1000)] == [[1, 2, 0]]  # all fit: one group, sorted


def test_equal_lengths_fill_groups_up_to_the_budget():
    groups = length_groups(np.full(10, 4), 16)
    assert [len(group) for group in groups] == [4, 4, 2]
    assert sorted(np.concatenate(groups).tolist()) == list(range(10))  # every row once


def test_the_budget_is_the_smallest_batch_near_the_cheapest_cost_per_row():
    # A model whose batch of r rows takes 4 ms + 0.5 ms per row up to 16 rows and 2 ms per row
    # beyond: per row 4.5, 2.5, 1.5, 1.0, 0.75, then 2.1 ms at 32. The cheapest is 16 rows; 8
    # rows (1.0) is not within 10 % of it, so the budget is 16 rows x 12 tokens.
    ran = []

    def run_rows(rows: int) -> None:
        ran.append(rows)
        time.sleep(0.004 + (0.0005 if rows <= 16 else 0.002) * rows)

    assert measure_token_budget(run_rows, row_tokens=12, max_rows=32) == 16 * 12
    assert set(ran) == {1, 2, 4, 8, 16, 32} and max(ran) <= 32


def test_no_batch_past_max_rows_or_past_one_that_takes_too_long_is_tried():
    ran = []

    def slow(rows: int) -> None:
        ran.append(rows)
        time.sleep(0.7 * LONGEST_TIMED_S * rows)  # 2 rows take longer than LONGEST_TIMED_S: 4 are not tried

    assert measure_token_budget(slow, row_tokens=5, max_rows=64) == 5  # one row is as cheap per row as two
    assert set(ran) == {1, 2}


def measure_in_another_process(folder: str, results) -> None:
    results.put(agreed_budget(Path(folder), "model-cpu", lambda: (time.sleep(0.5), 4242)[1]))


def test_the_processes_of_one_server_measure_once_and_agree(tmp_path):
    measured = []
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    other = context.Process(target=measure_in_another_process, args=(str(tmp_path), results))
    other.start()
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "model-cpu.lock").exists():  # the other process holds the lock, measuring
            assert time.monotonic() < deadline, "the other process never started measuring"
            time.sleep(0.01)
        mine = agreed_budget(tmp_path, "model-cpu", lambda: measured.append(1) or 17)
        assert mine == results.get(timeout=60) == 4242 and measured == []  # waited for its figure, measured nothing
    finally:
        other.join(timeout=60)
    assert agreed_budget(None, "model-cpu", lambda: 17) == 17  # no folder: measured in place
    assert agreed_budget(tmp_path, "model-cpu", lambda: 17) == 4242  # a later process reads the figure
    (tmp_path / "model-cpu.tokens").write_text("")  # a figure that cannot be read is measured again
    assert agreed_budget(tmp_path, "model-cpu", lambda: 23) == 23 == int((tmp_path / "model-cpu.tokens").read_text())


@pytest.mark.parametrize("name", ["kim-cnn-trec6", "lstm-trec6", "char-cnn-small-trec6", "bilstm-mr"])
def test_a_classifier_answers_the_same_in_groups_as_in_one_padded_batch(name):
    classifier = TextClassifier(read_bundle(ZOO / name), threads=1)
    whole = classifier.logits(QUESTIONS)
    seen = []
    classifier.observe_batch = lambda padded, tokens: seen.append((padded, tokens))
    token_ids, lengths = classifier.encoder.encode_batch(QUESTIONS)
    classifier.token_budget = 4 * int(lengths.max())  # several groups whatever the encoding
    grouped = classifier.logits(QUESTIONS)
    assert np.abs(grouped - whole).max() <= 1e-5  # same texts, same order, padding never changes a text's answer
    assert seen == [(padded_tokens(lengths, length_groups(lengths, classifier.token_budget, classifier.budget_rows)), int(lengths.sum()))]
    if classifier.bundle.config["encoding"]["kind"] == "words":  # fixed-length characters have no padding to save
        assert seen[0][0] < len(QUESTIONS) * lengths.max()


def test_the_language_model_scores_the_same_in_groups_as_in_one_batch():
    model = CharLanguageModel(read_bundle(ZOO / "char-lm-small-ptb"), threads=1)
    whole = model.score(SENTENCES)
    model.token_budget = 12  # groups of a few short sentences; the longest alone
    seen = []
    model.observe_batch = lambda padded, tokens: seen.append((padded, tokens))
    grouped = model.score(SENTENCES)
    for one, other in zip(whole, grouped, strict=True):
        assert one.tokens == other.tokens
        assert np.abs(one.log_probs - other.log_probs).max() <= 1e-5
    lengths = np.array([len(text.tokens) for text in whole])
    assert seen == [(padded_tokens(lengths, length_groups(lengths, 12, 1)), int(lengths.sum()))]  # 12 // 24 typical words: min_rows 1
    assert seen[0][0] < len(SENTENCES) * lengths.max()


def test_a_measured_budget_is_whole_rows_of_the_typical_length_within_max_rows():
    for name in ["kim-cnn-trec6", "char-cnn-small-trec6"]:
        classifier = TextClassifier(read_bundle(ZOO / name), threads=1)
        budget = classifier.measure_token_budget(max_rows=64)
        row = classifier.encoder.length if name.startswith("char-cnn") else classifier.TYPICAL_TOKENS
        assert budget % row == 0 and 1 <= budget // row <= 64
