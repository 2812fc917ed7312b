"""`python -m training predict` (training/predict.py), run as a user runs it: a subprocess on real
files, with a released bundle, checked against TextClassifier called directly.

The bundle is kim-cnn-mr-int8, the fastest classifier in the zoo (Kim's CNN, int8: about 12,000
texts/s on one core at batch 256; its figures are batch-invariant, so any batching must give
the same numbers). Its labels are positive/negative; TREC questions make fine inputs, since what
is checked is that every line gets the answer the service's code gives for that text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from services.backends.inference import TextClassifier, read_bundle, softmax
from tests.conftest import REPOSITORY, ZOO
from training.data.datasets import read_trec
from training.predict import add_predict_parser, read_records, run_predict

BUNDLE = ZOO / "kim-cnn-mr-int8"
TOLERANCE = 1e-6  # the probabilities are float32 printed as JSON doubles; the same session computes both


def predict(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", "predict", "--bundle", str(BUNDLE), *map(str, arguments)],
                          capture_output=True, text=True, cwd=REPOSITORY, timeout=300)


def summary_of(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def lines_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def questions(trec_path) -> list[str]:
    return [example.text for example in read_trec(trec_path)]  # 1,500 texts


@pytest.fixture(scope="module")
def classifier() -> TextClassifier:
    return TextClassifier(read_bundle(BUNDLE), threads=1)


def assert_answers(answers: list[dict], texts: list[str], classifier: TextClassifier) -> None:
    """Each answer is the bundle's for its text, by `evaluate`'s computation: logits in batches of
    256, argmax for the label, the service's softmax for the probabilities."""
    logits = np.concatenate([classifier.logits(texts[start:start + 256]) for start in range(0, len(texts), 256)])
    probabilities = softmax(logits)
    assert [answer["label"] for answer in answers] == [classifier.labels[i] for i in logits.argmax(axis=1)]
    for answer, row in zip(answers, probabilities):
        assert list(answer["probabilities"]) == list(classifier.labels)
        assert np.allclose(list(answer["probabilities"].values()), row, atol=TOLERANCE, rtol=0)
        assert answer["probability"] == answer["probabilities"][answer["label"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, questions):
    """The 1,500 questions, one per line, scored in one run with one worker."""
    folder = tmp_path_factory.mktemp("predict")
    data, out = folder / "questions.txt", folder / "predictions.jsonl"
    data.write_text("\n".join(questions) + "\n")
    return data, out, predict("--data", data, "--out", out)


def test_every_line_gets_the_service_answer_for_its_text(uninterrupted, questions, classifier):
    data, out, run = uninterrupted
    summary = summary_of(run)
    assert summary["bundle"] == str(BUNDLE)
    assert {key: summary[key] for key in ("lines", "written", "skipped_malformed", "resumed_from", "workers")} == {
        "lines": 1500, "written": 1500, "skipped_malformed": 0, "resumed_from": 0, "workers": 1}
    assert summary["texts_per_second"] > 0 and summary["seconds"] > 0
    answers = lines_of(out)
    assert [answer["line"] for answer in answers] == list(range(1, 1501))
    assert_answers(answers, questions, classifier)
    assert len({answer["label"] for answer in answers}) == 2  # both labels occur: a wrong row would show


def test_two_workers_keep_the_input_order(tmp_path, questions, classifier):
    # Batches of very different cost side by side: a batch of long texts (20 questions each) after
    # a batch of short ones, so the two workers finish them out of order.
    texts = []
    for start in range(0, 240, 8):
        chunk = questions[start:start + 8]
        texts += [" ".join([text] * 20) for text in chunk] if start % 16 else chunk
    data, out = tmp_path / "mixed.txt", tmp_path / "mixed.jsonl"
    data.write_text("\n".join(texts) + "\n")
    summary = summary_of(predict("--data", data, "--out", out, "--workers", 2, "--batch-size", 8, "--max-text-chars", 0))
    assert summary["workers"] == 2 and summary["lines"] == len(texts)
    answers = lines_of(out)
    assert [answer["line"] for answer in answers] == list(range(1, len(texts) + 1))
    assert_answers(answers, texts, classifier)


def test_a_killed_run_resumes_to_the_same_file(tmp_path, uninterrupted):
    data, complete, _ = uninterrupted
    whole = complete.read_bytes()
    lines = whole.splitlines(keepends=True)
    out = tmp_path / "predictions.jsonl"
    out.write_bytes(b"".join(lines[:700]) + lines[700][:25])  # what a kill in the middle of a write leaves
    run = predict("--data", data, "--out", out)
    summary = summary_of(run)
    assert "resuming: 700 lines already in" in run.stderr
    assert (summary["resumed_from"], summary["written"], summary["lines"]) == (700, 800, 1500)
    assert out.read_bytes() == whole

    again = predict("--data", data, "--out", out)  # nothing left to do
    assert "already has all 1500 lines" in again.stderr
    assert summary_of(again)["written"] == 0
    assert out.read_bytes() == whole


def test_an_output_of_another_file_is_not_resumed(tmp_path, uninterrupted, questions):
    """The last line already written must be the input's record at that place; in process, since
    the refusal comes before any model is loaded."""
    parser = argparse.ArgumentParser()
    add_predict_parser(parser.add_subparsers(dest="command"))
    _, complete, _ = uninterrupted
    out = tmp_path / "predictions.jsonl"
    out.write_bytes(b"".join(complete.read_bytes().splitlines(keepends=True)[:700]))
    shorter, table = tmp_path / "shorter.txt", tmp_path / "questions.csv"
    shorter.write_text("\n".join(questions[:600]) + "\n")
    table.write_text("text\n" + "\n".join(f'"{text}"' for text in questions) + "\n")  # record N on line N + 1
    for data, fmt, message in [(shorter, "text", "holds 700 lines, but"), (table, "csv", "starts at line 701")]:
        with pytest.raises(SystemExit, match=message):
            run_predict(parser.parse_args(["predict", "--bundle", str(BUNDLE), "--data", str(data), "--format", fmt,
                                           "--out", str(out)]))
    assert len(out.read_bytes().splitlines()) == 700  # left as it was


def test_a_malformed_line_stops_the_run_after_the_lines_before_it(tmp_path, questions, classifier):
    texts = questions[:5] + ["   "] + questions[5:7] + ["caf\udcffe au lait", "x" * 201] + questions[7:9]
    data, out = tmp_path / "questions.txt", tmp_path / "predictions.jsonl"
    data.write_bytes("\n".join(texts).encode("utf-8", "surrogateescape") + b"\n")  # line 9: the byte 0xff

    stopped = predict("--data", data, "--out", out, "--batch-size", 4, "--max-text-chars", 200)
    assert stopped.returncode == 2
    assert stopped.stderr.strip().splitlines()[-1].startswith(f"{data}:6: text is empty or only whitespace")
    answers = lines_of(out)
    assert [answer["line"] for answer in answers] == [1, 2, 3, 4, 5]  # the half batch before it too
    assert_answers(answers, questions[:5], classifier)

    run = predict("--data", data, "--out", out, "--batch-size", 4, "--max-text-chars", 200, "--skip-malformed")
    summary = summary_of(run)
    assert (summary["resumed_from"], summary["written"], summary["skipped_malformed"]) == (5, 7, 3)
    answers = lines_of(out)
    assert [answer["line"] for answer in answers] == list(range(1, 13))
    assert answers[5] == {"line": 6, "error": "text is empty or only whitespace"}
    assert answers[8] == {"line": 9, "error": "invalid UTF-8: byte 0xff at column 4"}
    assert answers[9]["line"] == 10 and answers[9]["error"].startswith("text has 201 characters; the limit is 200")
    good = [i for i, text in enumerate(texts) if "error" not in answers[i]]
    assert_answers([answers[i] for i in good], [texts[i] for i in good], classifier)


def test_jsonl_with_an_id_column(tmp_path, questions, classifier):
    records = [{"id": f"q{i}", "text": text, "source": "trec"} for i, text in enumerate(questions[:20])]
    records[3] = {"id": 3, "question": questions[3]}  # no "text" key
    lines = [json.dumps(record) for record in records]
    lines[7] = "{not json"
    data, out = tmp_path / "questions.jsonl", tmp_path / "predictions.jsonl"
    data.write_text("\n".join(lines) + "\n")
    summary = summary_of(predict("--data", data, "--format", "jsonl", "--id-column", "id", "--out", out, "--skip-malformed"))
    assert summary["skipped_malformed"] == 2
    answers = lines_of(out)
    assert answers[3] == {"line": 4, "id": 3, "error": "no key 'text'"}
    assert answers[7] == {"line": 8, "id": None, "error": "invalid JSON: Expecting property name enclosed in double quotes (column 2)"}
    good = [i for i in range(20) if i not in (3, 7)]
    assert [answers[i]["id"] for i in good] == [f"q{i}" for i in good]
    assert_answers([answers[i] for i in good], [questions[i] for i in good], classifier)


def test_csv_with_a_header_and_quoted_commas(tmp_path, classifier):
    texts = ["a gripping, beautifully acted film", 'he said "dull, dull, dull"', "flat\nand lifeless, sadly", "funny"]
    data, out = tmp_path / "reviews.csv", tmp_path / "predictions.jsonl"
    rows = ["id,review,stars"] + [f'r{i},"{text.replace(chr(34), chr(34) * 2)}",{i}' for i, text in enumerate(texts)]
    data.write_text("\n".join(rows) + "\n")  # the third review spans lines 4 and 5
    summary = summary_of(predict("--data", data, "--format", "csv", "--text-column", "review", "--id-column", "id",
                                 "--out", out))
    assert summary["lines"] == 4
    answers = lines_of(out)
    assert [(answer["line"], answer["id"]) for answer in answers] == [(2, "r0"), (3, "r1"), (4, "r2"), (6, "r3")]
    assert_answers(answers, texts, classifier)


def test_a_column_missing_from_the_header_is_an_error_of_the_file(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("id,text\n1,fine\n")
    run = predict("--data", data, "--format", "csv", "--text-column", "review", "--out", tmp_path / "out.jsonl")
    assert run.returncode == 2
    assert run.stderr.strip() == f"{data}:1: no column 'review' in the header (columns: ['id', 'text'])"


def test_tsv_by_column_index_without_a_header(tmp_path):
    data = tmp_path / "reviews.tsv"
    data.write_bytes(b'7\t"quoted" stays\n8\n\n9\tcaf\xc3\xa9\n')
    records = list(read_records(data, "tsv", "1", "0", header=False, max_chars=2000))
    assert records == [(1, '"quoted" stays', None, "7"), (2, None, "1 column(s), but column 1 (0-based) is read", "8"),
                       (3, None, "empty line", None), (4, "café", None, "9")]


def test_a_language_model_bundle_is_refused(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("the cat sat\n")
    run = subprocess.run([sys.executable, "-m", "training", "predict", "--bundle", str(ZOO / "char-lm-small-ptb"),
                          "--data", str(data), "--out", str(tmp_path / "out.jsonl")], capture_output=True, text=True,
                         cwd=REPOSITORY, timeout=120)
    assert run.returncode == 1
    assert "is a language model (char-lm), not a text classifier" in run.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_hundred_thousand_lines_over_two_workers(tmp_path, questions):
    data, out = tmp_path / "big.txt", tmp_path / "big.jsonl"
    with open(data, "w") as handle:
        for i in range(100_000):
            handle.write(questions[i % len(questions)] + "\n")
    started = time.perf_counter()
    run = predict("--data", data, "--out", out, "--workers", 2)
    seconds = time.perf_counter() - started
    summary = summary_of(run)
    print(f"100,000 lines, 2 workers: {seconds:.1f} s wall, {summary['texts_per_second']:,.0f} texts/s scoring")
    assert (summary["lines"], summary["written"], summary["workers"]) == (100_000, 100_000, 2)
    with open(out, "rb") as handle:
        count = sum(1 for _ in handle)
    assert count == 100_000
    assert json.loads(out.read_text().rsplit("\n", 2)[-2])["line"] == 100_000
    # stderr is a pipe (a log): no bar's carriage returns, the throughput line at the end
    assert "\r" not in run.stderr and "\x1b[" not in run.stderr and "scored 100000 texts in" in run.stderr and "texts/s" in run.stderr
    assert summary["texts_per_second"] > 0


def test_agnews_is_a_predict_format_with_the_training_readers_text(tmp_path, classifier):
    from training.data.datasets import read_agnews

    data, out = tmp_path / "test.csv", tmp_path / "predictions.jsonl"
    data.write_text('"3","Wall St. Bears Claw Back","Short-sellers are seeing green again.\\nMore at 11."\n'
                    '"2","Team wins final","The home side won the cup in extra time."\n')
    summary = summary_of(predict("--data", data, "--format", "agnews", "--out", out))
    assert summary["lines"] == 2
    texts = [example.text for example in read_agnews(data)]
    assert "\\n" not in texts[0] and "again. More at 11." in texts[0]  # the escaped break, unescaped as training reads it
    assert_answers(lines_of(out), texts, classifier)


def test_evaluate_writes_each_examples_text_gold_prediction_and_probabilities(tmp_path):
    data, out = tmp_path / "trec.txt", tmp_path / "evaluated.jsonl"
    data.write_text("".join((REPOSITORY / "training" / "sample_data" / "trec.txt").read_text().splitlines(keepends=True)[:40]))
    run = subprocess.run([sys.executable, "-m", "training", "evaluate", "--bundle", str(ZOO / "kim-cnn-trec6"), "--data", str(data),
                          "--format", "trec", "--out", str(out)], capture_output=True, text=True, cwd=REPOSITORY, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    examples = read_trec(data)
    assert summary["n"] == len(lines) == len(examples) == 40 and summary["out"] == str(out)
    assert [(line["text"], line["gold"]) for line in lines] == [(e.text, e.label) for e in examples]
    for line in lines:
        assert line["predicted"] == max(line["probabilities"], key=line["probabilities"].get)
        assert abs(sum(line["probabilities"].values()) - 1) < 1e-5
    assert summary["accuracy"] == sum(line["predicted"] == line["gold"] for line in lines) / 40
