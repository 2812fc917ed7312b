"""Tests for training.data.datasets: small hand-written files, plus the real benchmark data when present."""

from __future__ import annotations

import os
import pickle
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import REPOSITORY, SAMPLE_DATA

from training.data.datasets import (
    AGNEWS_CLASSES,
    CLASSIFICATION_FORMATS,
    LabelledText,
    MalformedDataError,
    kfold,
    read_agnews,
    read_labelled,
    read_mr,
    read_mr_dir,
    read_ptb,
    read_table,
    read_trec,
    split_dev,
)


def write(folder: Path, name: str, data: bytes) -> Path:
    """Write raw bytes, so the tests control encodings and line endings exactly."""
    path = folder / name
    path.write_bytes(data)
    return path


def assert_malformed(read: Callable[[Path], object], path: Path, line: int | None, *words: str) -> None:
    with pytest.raises(MalformedDataError) as caught:
        read(path)
    message = str(caught.value)
    assert path.name in message
    if line is not None:
        assert f"line {line}:" in message
        assert caught.value.line == line
    for word in words:
        assert word in message


# --------------------------------------------------------------------------- LabelledText / errors


def test_labelled_text_is_frozen_and_comparable() -> None:
    example = LabelledText("How far ?", "NUM")
    assert example == LabelledText("How far ?", "NUM")
    with pytest.raises(AttributeError):
        example.label = "LOC"  # type: ignore[misc]


def test_malformed_error_is_value_error_and_pickles() -> None:
    error = MalformedDataError("data/trec.txt", 12, "expected 'LABEL:fine text', got 'hello'")
    assert isinstance(error, ValueError)
    assert str(error) == "data/trec.txt line 12: expected 'LABEL:fine text', got 'hello'"
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) and copy.line == 12


# --------------------------------------------------------------------------- TREC

TREC_BYTES = (
    b"NUM:dist How far is it from Denver to Aspen ?\n"
    b"\n"
    b"LOC:city Which city has the oldest relationship as a sister\xf0city with Los Angeles ?\r\n"
    b"   \n"
    b"HUM:ind Who killed Gandhi ?\n"
    b"ABBR:exp What does NASA stand for ?"  # no final newline
)


def test_trec_coarse_labels(tmp_path: Path) -> None:
    examples = read_trec(write(tmp_path, "trec.txt", TREC_BYTES))
    assert [e.label for e in examples] == ["NUM", "LOC", "HUM", "ABBR"]
    assert examples[0].text == "How far is it from Denver to Aspen ?"
    # 0xF0 decodes as latin-1 "ð"; the CRLF line loses its "\r".
    assert examples[1].text == "Which city has the oldest relationship as a sister\u00f0city with Los Angeles ?"
    assert examples[3].text == "What does NASA stand for ?"


def test_trec_fine_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "trec.txt", TREC_BYTES)
    fine = read_trec(path, labels="fine")
    assert [e.label for e in fine] == ["NUM:dist", "LOC:city", "HUM:ind", "ABBR:exp"]
    assert [e.text for e in fine] == [e.text for e in read_trec(path)]
    assert read_labelled(path, "trec50") == fine
    assert read_labelled(path, "trec") == read_trec(path)


def test_trec_0x85_does_not_split_line(tmp_path: Path) -> None:
    path = write(tmp_path, "trec.txt", b"DESC:def What is a\x85 ellipsis ?\nNUM:count How many ?\n")
    examples = read_trec(path)
    assert len(examples) == 2
    assert examples[0].text == "What is a\x85 ellipsis ?"


def test_trec_bad_labels_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="coarse"):
        read_trec(write(tmp_path, "trec.txt", TREC_BYTES), labels="medium")


@pytest.mark.parametrize(
    ("data", "line", "words"),
    [
        (b"NUM:dist How far ?\n\nhello\n", 3, ("expected 'LABEL:fine text'", "'hello'")),
        (b"NUM:dist How far ?\nnum:dist How far ?\n", 2, ("expected 'LABEL:fine text'",)),
        (b"NUM How far ?\n", 1, ("expected 'LABEL:fine text'",)),
        (b"NUM: How far ?\n", 1, ("expected 'LABEL:fine text'",)),
        (b"NUM:dist How far ?\nFOO:bar What ?\n", 2, ("unknown coarse label 'FOO'",)),
        (b"NUM:dist How far ?\nHUM:ind\n", 2, ("no question text",)),
        (b"NUM:dist How far ?\nHUM:ind   \r\n", 2, ("no question text",)),
    ],
)
def test_trec_malformed(tmp_path: Path, data: bytes, line: int, words: tuple[str, ...]) -> None:
    assert_malformed(read_trec, write(tmp_path, "trec.txt", data), line, *words)


def test_trec_empty_file(tmp_path: Path) -> None:
    assert_malformed(read_trec, write(tmp_path, "trec.txt", b"\n  \n"), None, "no examples in")


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_trec(missing)
    with pytest.raises(FileNotFoundError, match="rt-polarity.pos"):
        read_mr_dir(tmp_path)


# --------------------------------------------------------------------------- MR


def test_mr_labels_order_and_0x85(tmp_path: Path) -> None:
    pos = write(
        tmp_path,
        "rt-polarity.pos",
        b"a gorgeous film . \n"
        b"interwoven\x85 [the film] addresses race . \n"
        b"\n"
        b"not quite sure what the point is\x85\n",
    )
    neg = write(tmp_path, "rt-polarity.neg", b"\x85the maudlin way . \r\nsilly and tedious . \n")
    examples = read_mr(pos, neg)
    assert examples == [
        LabelledText("a gorgeous film .", "positive"),
        # 0x85 is kept inside the line (str.splitlines() would split here) ...
        LabelledText("interwoven\x85 [the film] addresses race .", "positive"),
        # ... and at the ends of a line (str.strip() would remove it).
        LabelledText("not quite sure what the point is\x85", "positive"),
        LabelledText("\x85the maudlin way .", "negative"),
        LabelledText("silly and tedious .", "negative"),
    ]
    assert read_mr_dir(tmp_path) == examples
    assert read_labelled(tmp_path, "mr") == examples


def test_mr_empty_polarity_file(tmp_path: Path) -> None:
    write(tmp_path, "rt-polarity.pos", b"good .\n")
    neg = write(tmp_path, "rt-polarity.neg", b"\n\n")
    assert_malformed(read_mr_dir, tmp_path, None, "no examples in", str(neg))


# --------------------------------------------------------------------------- PTB


def test_ptb_tokens_and_eos(tmp_path: Path) -> None:
    path = write(tmp_path, "ptb.txt", b" pierre <unk> N years old \n the end \n")
    assert read_ptb(path) == ["pierre", "<unk>", "N", "years", "old", "<eos>", "the", "end", "<eos>"]


def test_ptb_last_line_without_newline_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path, "ptb.txt", b" a b \r\n c")
    assert read_ptb(path) == ["a", "b", "<eos>", "c", "<eos>"]


@pytest.mark.parametrize(
    ("data", "line", "words"),
    [
        (b" a b \n c\td \n", 2, ("a tab", "column 3")),
        (b" a \n b \n caf\xc3\xa9 \n", 3, ("'\u00e9'",)),
        (b" a \n\xff b \n", 2, ("cannot decode",)),
    ],
)
def test_ptb_malformed(tmp_path: Path, data: bytes, line: int, words: tuple[str, ...]) -> None:
    assert_malformed(read_ptb, write(tmp_path, "ptb.txt", data), line, *words)


@pytest.mark.parametrize("data", [b"", b"\n \n"])
def test_ptb_empty_file(tmp_path: Path, data: bytes) -> None:
    assert_malformed(read_ptb, write(tmp_path, "ptb.txt", data), None, "no words in")


# --------------------------------------------------------------------------- AG News

AGNEWS_BYTES = (
    b'"3","Wall St. Bears Claw Back","Reuters - Short-sellers\\nare seeing green."\n'
    b'"1","Two lines","first line\\\n'
    b'second line"\n'
    b'"2","Say ""hi""","Team, wins"\n'
    b'"4","Tech","Chips"\n'
)


def test_agnews_classes_and_escapes(tmp_path: Path) -> None:
    examples = read_agnews(write(tmp_path, "train.csv", AGNEWS_BYTES))
    assert AGNEWS_CLASSES == ("World", "Sports", "Business", "Sci/Tech")
    assert examples == [
        LabelledText("Wall St. Bears Claw Back Reuters - Short-sellers are seeing green.", "Business"),
        LabelledText("Two lines first line second line", "World"),
        LabelledText('Say "hi" Team, wins', "Sports"),
        LabelledText("Tech Chips", "Sci/Tech"),
    ]
    assert read_labelled(tmp_path / "train.csv", "agnews") == examples


@pytest.mark.parametrize(
    ("data", "line", "words"),
    [
        # The second record spans lines 2-3, so the bad last row is on line 5.
        (AGNEWS_BYTES.replace(b'"4","Tech"', b'"5","Tech"'), 5, ("class must be 1..4", "'5'")),
        (b'"1","a","b"\n"0","a","b"\n', 2, ("class must be 1..4",)),
        (b'"1","a","b"\n"x","a","b"\n', 2, ("class must be 1..4",)),
        (b'"1","a","b"\n"2","only title"\n', 2, ("expected 3 columns", "got 2")),
        (b'"1","a","b"\n"2","a","b","c"\n', 2, ("expected 3 columns", "got 4")),
        (b'"1","a","b"\n"2","a","b"x\n', 2, ("bad CSV",)),
        (b'"1","a","b"\n  \n""\n', 3, ("expected 3 columns", "got 1")),
        (b'"1","a","b"\n"2","a","two\nlines","c"\n', 2, ("expected 3 columns", "got 4")),
        (b'"1","a","b"\n"2","a","unterminated\n', 2, ("bad CSV",)),
    ],
)
def test_agnews_malformed(tmp_path: Path, data: bytes, line: int, words: tuple[str, ...]) -> None:
    assert_malformed(read_agnews, write(tmp_path, "train.csv", data), line, *words)


def test_agnews_empty_file(tmp_path: Path) -> None:
    assert_malformed(read_agnews, write(tmp_path, "train.csv", b""), None, "no examples in")


# --------------------------------------------------------------------------- CSV / TSV / JSONL


def test_csv_columns_and_quotes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "data.csv",
        b'\xef\xbb\xbfid,label,text\n1,pos,"great, really"\n\n2,0,"two\nlines"\n',
    )
    assert read_table(path) == [
        LabelledText("great, really", "pos"),
        LabelledText("two\nlines", "0"),
    ]
    assert read_labelled(path, "csv") == read_table(path)


def test_csv_custom_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "data.csv", b"sentence,y\nhello,1\n")
    assert read_table(path, text_column="sentence", label_column="y") == [LabelledText("hello", "1")]
    assert read_labelled(path, "csv", text_column="sentence", label_column="y") == [LabelledText("hello", "1")]


def test_tsv_columns_without_quoting(tmp_path: Path) -> None:
    path = write(tmp_path, "data.tsv", b'text\tlabel\n"quoted" start, a\tpos\nplain\tneg\r\n')
    assert read_table(path) == [LabelledText('"quoted" start, a', "pos"), LabelledText("plain", "neg")]
    # read_labelled uses the named format whatever the suffix.
    other = write(tmp_path, "data.txt", path.read_bytes())
    assert read_labelled(other, "tsv") == read_table(path)


def test_jsonl_labels_become_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "data.jsonl",
        b'{"text": "caf\xc3\xa9 ok", "label": 3}\n\n{"text": "bad", "label": "neg", "extra": null}\n',
    )
    assert read_table(path) == [LabelledText("caf\u00e9 ok", "3"), LabelledText("bad", "neg")]
    assert read_labelled(path, "jsonl") == read_table(path)


@pytest.mark.parametrize(
    ("name", "data", "line", "words"),
    [
        ("d.csv", b"text,label\na,1\n", None, ()),  # control: valid file (checked below)
        ("d.csv", b"words,label\na,1\n", 1, ("no column 'text'",)),
        ("d.csv", b"text,label\na,1\n,2\n", 3, ("empty text",)),
        ("d.csv", b"text,label\na,1\nb,\n", 3, ("empty label",)),
        ("d.csv", b"text,label\na,1\nb,2,3\n", 3, ("expected 2 columns", "got 3")),
        ("d.tsv", b"text\tlabel\na\t1\nb\n", 3, ("expected 2 columns", "got 1")),
        ("d.tsv", b"text\tcategory\na\t1\n", 1, ("no column 'label'",)),
        ("d.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": 1\n', 2, ("invalid JSON",)),
        ("d.jsonl", b'{"text": "a", "label": 1}\n\n["b", 1]\n', 3, ("expected a JSON object",)),
        ("d.jsonl", b'{"text": "a"}\n', 1, ("no key 'label'",)),
        ("d.jsonl", b'{"text": "a", "label": 1}\n{"text": "  ", "label": 1}\n', 2, ("empty text",)),
        ("d.jsonl", b'{"text": 5, "label": 1}\n', 1, ("must be a string",)),
        ("d.jsonl", b'{"text": "a", "label": 1.5}\n', 1, ("string or integer",)),
        ("d.jsonl", b'{"text": "a", "label": true}\n', 1, ("string or integer",)),
        ("d.jsonl", b'{"text": "a", "label": null}\n', 1, ("string or integer",)),
        ("d.jsonl", b'{"text": "a", "label": ["x"]}\n', 1, ("string or integer",)),
    ],
)
def test_table_malformed(tmp_path: Path, name: str, data: bytes, line: int | None, words: tuple[str, ...]) -> None:
    path = write(tmp_path, name, data)
    if line is None:
        assert read_table(path) == [LabelledText("a", "1")]
    else:
        assert_malformed(read_table, path, line, *words)


@pytest.mark.parametrize(("name", "data"), [("e.csv", b""), ("e.csv", b"text,label\n"), ("e.jsonl", b"\n")])
def test_table_without_examples(tmp_path: Path, name: str, data: bytes) -> None:
    assert_malformed(read_table, write(tmp_path, name, data), None, "no examples in")


def test_table_unknown_suffix(tmp_path: Path) -> None:
    path = write(tmp_path, "data.json", b'{"text": "a", "label": 1}\n')
    with pytest.raises(ValueError, match=r"\.jsonl"):
        read_table(path)


def test_read_labelled_unknown_format(tmp_path: Path) -> None:
    assert CLASSIFICATION_FORMATS == ("trec", "trec50", "mr", "agnews", "csv", "jsonl", "tsv")
    with pytest.raises(ValueError) as caught:
        read_labelled(tmp_path / "x", "sst2")
    for known in CLASSIFICATION_FORMATS:
        assert known in str(caught.value)


# --------------------------------------------------------------------------- splits


def test_split_dev_is_deterministic_and_disjoint() -> None:
    items = list(range(95))
    train, dev = split_dev(items, dev_fraction=0.1, seed=3)
    assert len(dev) == 10 and len(train) == 85  # round(9.5) == 10
    assert sorted(train + dev) == items
    assert split_dev(items, dev_fraction=0.1, seed=3) == (train, dev)
    assert split_dev(items, dev_fraction=0.1, seed=4) != (train, dev)
    assert items == list(range(95))  # the input is not shuffled in place


def test_split_dev_order_follows_shuffle() -> None:
    items = list(range(20))
    shuffled = items[:]
    random.Random(7).shuffle(shuffled)
    assert split_dev(items, dev_fraction=0.25, seed=7) == (shuffled[5:], shuffled[:5])


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_split_dev_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError):
        split_dev([1, 2, 3], dev_fraction=fraction)


def test_kfold_partitions_examples() -> None:
    items = list(range(23))
    pairs = kfold(items, folds=5, seed=1)
    assert len(pairs) == 5
    assert [len(test) for _, test in pairs] == [5, 5, 5, 4, 4]
    tests = [x for _, test in pairs for x in test]
    assert sorted(tests) == items  # each example in exactly one test fold
    for train, test in pairs:
        assert set(train).isdisjoint(test)
        assert sorted(train + test) == items
    assert kfold(items, folds=5, seed=1) == pairs
    assert kfold(items, folds=5, seed=2) != pairs


@pytest.mark.parametrize("folds", [1, 0, 24])
def test_kfold_rejects_bad_fold_count(folds: int) -> None:
    with pytest.raises(ValueError):
        kfold(list(range(23)), folds=folds)


# --------------------------------------------------------------------------- real data

DATA_DIR = Path(
    os.environ.get("TEXTSERVE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def data_file(relative: str) -> Path:
    path = DATA_DIR / relative
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path} (set TEXTSERVE_DATA_DIR)")
    return path


def test_real_trec_counts() -> None:
    path = data_file("trec/train.txt")
    coarse = read_trec(path)
    assert len(coarse) == 5452
    assert Counter(e.label for e in coarse) == {
        "ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896,
    }
    fine = read_labelled(path, "trec50")
    assert [e.label.split(":")[0] for e in fine] == [e.label for e in coarse]
    assert sum("\u00f0" in e.text for e in coarse) == 1  # the one 0xF0 byte
    train, dev = split_dev(coarse, dev_fraction=0.1, seed=0)
    assert (len(train), len(dev)) == (4907, 545)


def test_real_mr_counts() -> None:
    folder = data_file("mr")
    examples = read_mr_dir(folder)
    assert Counter(e.label for e in examples) == {"positive": 5331, "negative": 5331}
    assert examples[0].label == "positive" and examples[-1].label == "negative"
    # 0x85 occurs 23 times on 22 lines; none of them split a line or is stripped.
    assert sum(e.text.count("\x85") for e in examples) == 23
    assert [len(test) for _, test in kfold(examples, folds=10)] == [1067, 1067] + [1066] * 8


def test_real_ptb_counts() -> None:
    train = read_ptb(data_file("ptb/train.txt"))
    assert len(train) == 929_589
    assert len(set(train)) == 10_000  # 9,999 words plus <eos>
    assert train.count("<eos>") == 42_068
    assert len(read_ptb(data_file("ptb/valid.txt"))) == 73_760


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such file. Check --data"),
    ("NUM:dist How far is it ?\nbroken line without a label\n", "line 2: expected 'LABEL:fine text'"),
])
def test_a_missing_or_malformed_data_file_is_one_line_and_exit_2_not_a_traceback(tmp_path, content, says):
    data = tmp_path / "trec.txt"
    if content is not None:
        data.write_text(content)
    result = subprocess.run([sys.executable, "-m", "training", "train", "--data", str(data), "--format", "trec",
                             "--out", str(tmp_path / "run.pt")], capture_output=True, text=True, cwd=REPOSITORY)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert says in result.stderr and str(data) in result.stderr


AG_NEWS_LIKE = ('"3","Wall St. Bears Claw Back","Short-sellers are seeing green again."\n'
                '"2","Team wins final","The home side won the cup in extra time."\n')


def test_a_csv_without_a_header_takes_columns_by_0_based_index_and_joins_several(tmp_path):
    data = tmp_path / "news.csv"
    data.write_text(AG_NEWS_LIKE)
    joined = read_labelled(data, "csv", text_column="1,2", label_column="0")
    assert [(e.text, e.label) for e in joined] == [
        ("Wall St. Bears Claw Back Short-sellers are seeing green again.", "3"),
        ("Team wins final The home side won the cup in extra time.", "2")]
    assert read_labelled(data, "csv", text_column="2", label_column="0")[1].text == "The home side won the cup in extra time."
    with_header = tmp_path / "named.tsv"
    with_header.write_text("label\ttext\npos\ta fine film\n")
    assert read_labelled(with_header, "tsv", text_column="1", label_column="0", header=True)[0] == LabelledText("a fine film", "pos")
    assert read_labelled(with_header, "tsv")[0] == LabelledText("a fine film", "pos")


def test_columns_that_cannot_describe_the_file_say_how_to_name_them(tmp_path):
    data = tmp_path / "news.csv"
    data.write_text(AG_NEWS_LIKE)
    with pytest.raises(MalformedDataError, match="no column 'text' in header.*0-based column indices and --no-header"):
        read_labelled(data, "csv")  # named columns: the first row is taken as the header
    with pytest.raises(MalformedDataError, match="column index 5 is past the row's 3 columns"):
        read_labelled(data, "csv", text_column="5", label_column="0")
    with pytest.raises(ValueError, match="named, but --no-header"):
        read_labelled(data, "csv", text_column="title", label_column="0", header=False)


def test_help_says_what_each_format_reads():
    result = subprocess.run([sys.executable, "-m", "training", "train", "--help"], capture_output=True, text=True, cwd=REPOSITORY)
    flat = " ".join(result.stdout.split())
    for fragment in ("trec: Li & Roth TREC", "mr: Pang & Lee", "agnews: AG News CSV, no header", "0-based indices", "--no-header"):
        assert fragment in flat, fragment


def test_training_into_a_log_writes_each_epoch_with_its_time_and_an_estimate_and_no_bar_codes(tmp_path):
    # stderr is a pipe here, as in a redirected log: plain lines, no tqdm cursor-up codes ("[A")
    result = subprocess.run([sys.executable, "-m", "training", "train", "--data", str(SAMPLE_DATA / "trec.txt"), "--format", "trec",
                             "--epochs", "2", "--out", str(tmp_path / "run.pt")], capture_output=True, text=True, cwd=REPOSITORY,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(re.search(r"\d s, train loss [\d.]+, dev [\d.]+; .* so far, about .* left \(the whole run about .*\)$", line)
               for line in lines), lines
    assert "\x1b[" not in result.stderr and "\r" not in result.stderr


def test_a_log_gets_a_plain_progress_line_now_and_then(capsys):
    from training.jobs.progress import PlainProgress

    plain = PlainProgress(range(5), desc="epoch 1", unit=" batches", interval_s=0.0)  # a line at every step
    plain.set_postfix(loss="0.41")
    assert list(plain) == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5 and lines[-1].startswith("epoch 1: 5/5 (100%), ") and lines[-1].endswith("batches/s, loss 0.41")
    quiet = PlainProgress(total=10, interval_s=3600.0)
    quiet.update(10)
    assert capsys.readouterr().err == "" and quiet.n == 10  # nothing before its interval has passed
