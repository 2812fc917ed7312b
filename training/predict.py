"""`python -m training predict`: a released classifier bundle over a file of any size, one JSON
line out per record in, in input order.

    python -m training predict --bundle models/zoo/kim-cnn-trec6 --data questions.txt --out predictions.jsonl
    python -m training predict --bundle models/zoo/kim-cnn-mr --data reviews.csv --format csv \
        --text-column review --id-column id --workers 2 --out predictions.jsonl

    records (the parent reads the file lazily, checks each record)
      -> batches of --batch-size (in the parent)
      -> TextClassifier.probabilities (services/backends/inference.py: the code /classify runs),
         in this process or in --workers spawned processes, each with its own session
      -> JSON lines, written in input order and flushed batch by batch

A rerun with the same --out resumes: the complete lines already there are counted and that many
records skipped (a partial last line, left by a kill mid-write, is cut off first). A malformed
record stops the run with `FILE:LINE: problem` (exit 2) once everything before it is written, or,
with --skip-malformed, becomes {"line": N, "error": "..."} and the run goes on.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import itertools
import json
import multiprocessing
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple


from services.backends.bundle_format import BundleError
from services.backends.inference import (IMAGE_ARCHITECTURE, LANGUAGE_MODEL_ARCHITECTURE, Bundle, TextClassifier,
                                         read_bundle, text_problem)
from services.config import SETTINGS, available_cores
from training.jobs import progress
from training.data.datasets import ColumnError, MalformedDataError, agnews_text, column_spec

INPUT_FORMATS = {
    "text": "one text per line, UTF-8",
    "jsonl": "one JSON object per line; --text-column names the text's key (default text)",
    "csv": "comma-separated, RFC 4180 quotes (a quoted field may hold commas and line breaks); --text-column by "
           "name (a header row) or 0-based index",
    "tsv": "tab-separated, no quoting; columns as for csv",
    "agnews": "AG News CSV as training reads it (class, title, description; no header): the text is the title and "
              "the description with the file's escaped line breaks as spaces",
}
# Batches in flight per worker: one being scored, one waiting in its queue, so a worker never
# idles while the parent writes; more would only hold more of the file in memory.
BATCHES_IN_FLIGHT_PER_WORKER = 2
# A lone surrogate from decoding with "surrogateescape": the byte that was not UTF-8 (0x80-0xff).
_UNDECODED_BYTE = re.compile("[\udc80-\udcff]")


class Record(NamedTuple):
    """One input record: where it starts in the file, and either its text or why it has none."""

    line: int               # 1-based line of the file where the record starts (a header is line 1)
    text: str | None        # None exactly when `problem` is set
    problem: str | None     # why the record cannot be scored, e.g. "text is empty or only whitespace"
    id: object = None       # the --id-column value, copied to the output as read


# --------------------------------------------------------------------------- reading


def decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based number, line) of a file read lazily, split on "\\n" only with one trailing "\\r"
    dropped (the conventions of training/data/datasets.py). Bytes that are not UTF-8 are decoded with
    "surrogateescape", so a bad byte becomes a problem of its record, not an exception that ends
    the file; a leading UTF-8 byte-order mark (spreadsheets write one) is dropped."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            yield number, raw.decode("utf-8", "surrogateescape")


def undecodable(text: str) -> str | None:
    """'invalid UTF-8: byte 0xff at column 7' for the first byte of `text` that was not UTF-8."""
    bad = _UNDECODED_BYTE.search(text)
    if bad is None:
        return None
    return f"invalid UTF-8: byte {ord(bad.group()) - 0xDC00:#04x} at column {bad.start() + 1}"


def checked(line: int, text: str, max_chars: int, record_id: object = None) -> Record:
    """The record of one text, checked as the service checks a request's (text_problem) and for bytes that were not UTF-8."""
    rule = text_problem(text, max_chars, "--max-text-chars, TEXTSERVE_MAX_TEXT_CHARS")
    problem = undecodable(text) or (f"text {rule[1]}" if rule else None)
    return Record(line, None if problem else text, problem, record_id)


def text_records(path: Path, max_chars: int) -> Iterator[Record]:
    """--format text: every line is a record, an empty one included (it is malformed)."""
    for number, line in decoded_lines(path):
        yield checked(number, line, max_chars)


def json_fields(line: str, text_key: str, id_key: str | None) -> tuple[str | None, object, str | None]:
    """(text, id, problem) of one jsonl line; the id is kept where it was read, even when the
    text cannot be."""
    if not line.strip():
        return None, None, "empty line"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        return None, None, f"invalid JSON: {error.msg} (column {error.colno})"
    if not isinstance(value, dict):
        return None, None, f"expected a JSON object, got {type(value).__name__}"
    record_id = value.get(id_key) if id_key is not None else None
    if text_key not in value:
        return None, record_id, f"no key {text_key!r}"
    if not isinstance(value[text_key], str):
        return None, record_id, f"{text_key!r} must be a string, got {type(value[text_key]).__name__}"
    if id_key is not None and id_key not in value:
        return None, None, f"no key {id_key!r}"
    return value[text_key], record_id, None


def jsonl_records(path: Path, text_key: str, id_key: str | None, max_chars: int) -> Iterator[Record]:
    """--format jsonl: every line is a record, an empty one included (it is malformed)."""
    for number, line in decoded_lines(path):
        problem = undecodable(line)
        text, record_id, problem = (None, None, problem) if problem else json_fields(line, text_key, id_key)
        yield Record(number, None, problem, record_id) if problem else checked(number, text, max_chars, record_id)


def has_header(text_column: str | None, id_column: str | None, header: bool | None) -> bool:
    """csv/tsv: whether the first row names the columns. Columns by name need one; by 0-based index
    the file has none unless --header says so (training/data/datasets.py reads tables the same way)."""
    if header is not None:
        return header
    return any(isinstance(column, str) for spec in (text_column or "text", id_column) if spec is not None
               for column in column_spec(spec))


def table_records(path: Path, kind: str, text_column: str, id_column: str | None, header: bool,
                  max_chars: int) -> Iterator[Record]:
    """--format csv or tsv: every row is a record, an empty line included (it is malformed). A
    quoted csv field may span lines; its row is numbered by its first line. Several text columns
    ("1,2") are joined by a space. Every row must have the header's column count: a row with
    more is most often a text with an unquoted comma."""
    text_columns = column_spec(text_column)
    id_columns = column_spec(id_column) if id_column is not None else []
    if len(id_columns) > 1:
        raise ColumnError(f"one id column, please: got {id_column!r}")
    if not header and any(isinstance(column, str) for column in (*text_columns, *id_columns)):
        raise ColumnError(f"--text-column {text_column!r} / --id-column {id_column!r}: a column is named, but --no-header "
                          "says the file has no header row: give 0-based column indices (e.g. --text-column 1)")
    fmt = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == "tsv" else {"strict": True}
    # The reader is fed one file line at a time, so its line_num is the file's line number.
    reader = csv.reader((line + "\n" for _, line in decoded_lines(path)), **fmt)
    width = None  # the header's column count
    if header:
        try:
            first = next(reader, None)
        except csv.Error as error:
            raise MalformedDataError(path, 1, f"header: bad CSV: {error}") from None
        if first is None:  # an empty file
            return
        if not first:
            raise MalformedDataError(path, 1, "the header row is empty (a file without one: --no-header and column indices)")
        names = [name.strip() for name in first]
        for wanted in (*text_columns, *id_columns):
            if isinstance(wanted, str) and wanted not in names:
                raise MalformedDataError(path, 1, f"no column {wanted!r} in the header (columns: {names})")
        index = {name: at for at, name in enumerate(names)}
        text_columns = [index.get(column, column) for column in text_columns]
        id_columns = [index.get(column, column) for column in id_columns]
        width = len(names)
    needed = max((*text_columns, *id_columns)) + 1  # columns a row must have
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield Record(start, None, f"bad CSV: {error}")
            continue
        record_id = row[id_columns[0]] if id_columns and len(row) > id_columns[0] else None  # kept on a bad row too
        if not row:
            problem = "empty line"
        elif width is not None and len(row) != width:
            problem = f"expected {width} columns (the header's), got {len(row)}"
        elif len(row) < needed:
            problem = f"{len(row)} column(s), but column {needed - 1} (0-based) is read"
        else:
            problem = undecodable("\t".join(row))
        if problem is not None:
            yield Record(start, None, problem, record_id)
        else:
            yield checked(start, " ".join(row[at] for at in text_columns), max_chars, record_id)


def read_records(path: Path, fmt: str, text_column: str | None, id_column: str | None, header: bool,
                 max_chars: int) -> Iterator[Record]:
    """The records of `path` in `fmt` (INPUT_FORMATS), lazily. A problem of the whole file (a
    named column missing from the header) raises MalformedDataError or ColumnError; a problem of
    one record is that Record's `problem`."""
    if fmt == "text":
        if text_column is not None or id_column is not None:
            raise ColumnError("--format text has no columns: drop --text-column / --id-column")
        return text_records(path, max_chars)
    if fmt == "jsonl":
        return jsonl_records(path, text_column or "text", id_column, max_chars)
    if fmt == "agnews":
        if text_column is not None:
            raise ColumnError("--format agnews reads its title and description (columns 1 and 2): drop --text-column")
        return (record._replace(text=agnews_text(record.text)) if record.text is not None else record
                for record in table_records(path, "csv", "1,2", id_column, False, max_chars))
    return table_records(path, fmt, text_column or "text", id_column, header, max_chars)


def estimated_records(path: Path, header: bool) -> int:
    """The progress bar's total: the file's lines (one fast pass over its bytes), less a header.
    Exact for text and jsonl; for csv a quoted field over several lines makes it an overestimate,
    and the bar is closed at the true count."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"  # a last line without its newline
    return max(0, lines - header)


# --------------------------------------------------------------------------- scoring


class BatchScorer:
    """A classifier bundle in onnxruntime: a batch of records -> their output lines (bytes).
    The probabilities are TextClassifier.probabilities, what POST /classify answers, and the
    fields mirror its TextResult: `label` (the most probable; ties go to the earlier label),
    `probabilities` (every label's), plus `probability` (the label's) and the record's line."""

    def __init__(self, bundle: Bundle, device: str, threads: int, with_ids: bool) -> None:
        self.classifier = TextClassifier(bundle, device=device, threads=threads)
        self.labels = self.classifier.labels
        self.with_ids = with_ids  # --id-column given: every line has `id`, a JSON null included

    def __call__(self, batch: list[Record]) -> bytes:
        texts = [record.text for record in batch if record.problem is None]
        rows = iter(self.classifier.probabilities(texts).tolist() if texts else [])  # (len(texts), K) as floats
        lines = []
        for record in batch:
            answer = {"line": record.line}
            if self.with_ids:
                answer["id"] = record.id
            if record.problem is not None:
                answer["error"] = record.problem
            else:
                row = next(rows)
                best = max(range(len(row)), key=row.__getitem__)  # the first of equal maxima, as argmax
                answer.update(label=self.labels[best], probability=row[best], probabilities=dict(zip(self.labels, row)))
            lines.append(json.dumps(answer, separators=(",", ":")))
        return ("\n".join(lines) + "\n").encode()


_WORKER_SCORER: BatchScorer | None = None
_WORKER_FAILURE: BaseException | None = None


def _start_worker(bundle: Bundle, device: str, threads: int, with_ids: bool) -> None:
    """Pool initializer: the worker's own session, made once. A failure (no CUDA, say) is kept and
    raised by the first batch, so that it reaches the parent with its message: an initializer that
    raises only breaks the pool ("terminated abruptly")."""
    global _WORKER_SCORER, _WORKER_FAILURE
    try:
        _WORKER_SCORER = BatchScorer(bundle, device, threads, with_ids)
    except Exception as error:  # re-raised in _score_in_worker
        _WORKER_FAILURE = error


def _score_in_worker(batch: list[Record]) -> bytes:
    if _WORKER_FAILURE is not None:
        raise _WORKER_FAILURE
    return _WORKER_SCORER(batch)


def scored_in_order(batches: Iterable[list[Record]], bundle: Bundle, device: str, workers: int, threads: int,
                    with_ids: bool = False) -> Iterator[tuple[list[Record], bytes]]:
    """(batch, its output lines) in input order. One worker: in this process. More: spawned
    processes (a forked child would inherit onnxruntime's threads in an unknown state), fed
    through a bounded window of futures rather than Pool.imap, whose feeder thread would read
    the whole file ahead of the workers into memory; ProcessPoolExecutor also fails with an
    error, where a Pool hangs, when a worker dies."""
    if workers == 1:
        scorer = BatchScorer(bundle, device, threads, with_ids)
        for batch in batches:
            yield batch, scorer(batch)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(bundle, device, threads, with_ids))
    try:
        pending = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_score_in_worker, batch)))
            if len(pending) >= BATCHES_IN_FLIGHT_PER_WORKER * workers:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched(records: Iterator[Record], size: int, stop_at_malformed: bool, stopped: list[Record]) -> Iterator[list[Record]]:
    """`records` in lists of `size`. With `stop_at_malformed`, the last list ends just before the
    first malformed record, which is appended to `stopped`, so that everything before it is
    written before the run stops."""
    batch = []
    for record in records:
        if record.problem is not None and stop_at_malformed:
            stopped.append(record)
            break
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------- output and resume


def resume_point(out: Path) -> tuple[int, int | None]:
    """(complete lines in `out`, the input line of its last one). A partial last line, left by a
    kill in the middle of a write, is cut off here, so the rerun writes that record again."""
    if not out.exists():
        return 0, None
    count = end = size = 0  # end: the offset just after the last "\n"
    with open(out, "r+b") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
            if (at := block.rfind(b"\n")) >= 0:
                end = size + at + 1
            size += len(block)
        if end < size:
            handle.truncate(end)
        if count == 0:
            return 0, None
        handle.seek(max(0, end - (1 << 16)))
        last = handle.read(end - handle.tell()).rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        return count, int(json.loads(last)["line"])
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"{out}: its last line is not a predict output line ({last[:80]!r}); give another --out") from None


# --------------------------------------------------------------------------- command line


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def add_predict_parser(commands) -> argparse.ArgumentParser:
    """The `predict` subcommand on `python -m training`'s subparsers."""
    parser = commands.add_parser(
        "predict", help="a classifier bundle over a file: one JSON line per record, in order, resumable",
        description=__doc__.split("\n\n")[0] + " See docs/training.md, 'Batch prediction over a file'.")
    parser.add_argument("--bundle", required=True, type=Path, help="a classifier bundle folder, e.g. models/zoo/kim-cnn-trec6")
    parser.add_argument("--data", required=True, type=Path, help="the file of texts to classify (read lazily: any size)")
    parser.add_argument("--format", default="text", choices=tuple(INPUT_FORMATS),
                        help="; ".join(f"{name}: {what}" for name, what in INPUT_FORMATS.items()) + " (default: text)")
    parser.add_argument("--text-column", default=None,
                        help="jsonl: the text's key; csv/tsv: its column by name or 0-based index, several (1,2) joined "
                             "by a space (default: text)")
    parser.add_argument("--id-column", default=None,
                        help="jsonl: a key, csv/tsv: a column (name or index) whose value is copied into each output "
                             "line as `id` (default: none)")
    parser.add_argument("--header", action=argparse.BooleanOptionalAction, default=None,
                        help="csv/tsv: whether the first row names the columns (default: yes when a column is given by "
                             "name, no when by index)")
    parser.add_argument("--out", required=True, type=Path,
                        help="JSON-lines file to write; an existing one is resumed after its last complete line")
    parser.add_argument("--batch-size", type=positive, default=256, help="texts per onnxruntime run (default: 256)")
    parser.add_argument("--workers", type=positive, default=1,
                        help="processes scoring batches, each with its own session; 1 (default): in this process")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads per worker; 0 (default): cores / workers, at least 1")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: an error where onnxruntime cannot run CUDA, never a fall-back to the CPU")
    parser.add_argument("--skip-malformed", action="store_true",
                        help='write {"line": N, "error": "..."} for a malformed record and go on (default: stop at it, exit 2)')
    parser.add_argument("--max-text-chars", type=int, default=SETTINGS.max_text_chars,
                        help="a longer text is malformed, as the service answers it 413 (default: TEXTSERVE_MAX_TEXT_CHARS, "
                             f"now {SETTINGS.max_text_chars}); 0: no limit")
    parser.set_defaults(run=run_predict)
    return parser


def register(commands) -> None:
    add_predict_parser(commands)


def classifier_bundle(path: Path) -> Bundle:
    """The bundle at `path`, or an exit naming what it is when it is not a text classifier."""
    try:
        bundle = read_bundle(path)
    except BundleError as error:
        raise SystemExit(f"predict: {error}") from None
    what = {LANGUAGE_MODEL_ARCHITECTURE: "a language model", IMAGE_ARCHITECTURE: "an image classifier"}.get(bundle.architecture)
    if what is not None:
        raise SystemExit(f"predict: {path} is {what} ({bundle.architecture}), not a text classifier; predict scores "
                         "text classifier bundles (a language model's perplexity: python -m training evaluate --format ptb)")
    return bundle


def run_predict(args: argparse.Namespace) -> None:
    """Score args.data into args.out; print one JSON summary line on stdout (progress on stderr).
    Exit 2 with `FILE:LINE: problem` at a malformed record (after writing everything before it)."""
    if args.out.resolve() == args.data.resolve():
        raise SystemExit("predict: --out is the --data file; give another path")
    if not args.data.is_file():
        raise SystemExit(f"predict: {args.data}: no such file")
    if args.threads < 0 or args.max_text_chars < 0:
        raise SystemExit("predict: --threads and --max-text-chars take 0 (automatic / no limit) or more")
    bundle = classifier_bundle(args.bundle)
    try:
        summary, stopped_at = predict_file(bundle, args)
    except MalformedDataError as error:  # the whole file's problem, e.g. a column missing from the header
        print(f"{error.path}:{error.line}: {error.problem}" if error.line else str(error), file=sys.stderr)
        raise SystemExit(2) from None
    except ColumnError as error:
        print(f"predict: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except BundleError as error:  # from a worker's session, e.g. --device cuda without CUDA
        raise SystemExit(f"predict: {error}") from None
    if stopped_at is not None:
        print(f"{args.data}:{stopped_at.line}: {stopped_at.problem} (the {summary['lines']} records before it are in "
              f"{args.out}; fix it, or add --skip-malformed, and rerun to resume there)", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(summary))


def skip_written(records: Iterator[Record], done: int, last_line: int, args: argparse.Namespace) -> None:
    """Advance `records` past the `done` already in args.out, refusing when the last of them does
    not start on the line that args.out's last line names (another file, or another --format)."""
    count, line = 0, None
    for record in itertools.islice(records, done):
        count, line = count + 1, record.line
    if count < done:
        raise SystemExit(f"predict: {args.out} holds {done} lines, but {args.data} has only {count} records: written "
                         "from another file; delete it or give another --out")
    if line != last_line:
        raise SystemExit(f"predict: {args.out}'s last line is for input line {last_line}, but record {done} of "
                         f"{args.data} starts at line {line}: written from another file or --format; delete it or "
                         "give another --out")


def predict_file(bundle: Bundle, args: argparse.Namespace) -> tuple[dict, Record | None]:
    """The run itself: resume, stream, score, write. Returns the summary, and the malformed record
    the run stopped at (None when it went to the end)."""
    header = has_header(args.text_column, args.id_column, args.header) if args.format in ("csv", "tsv") else False
    records = read_records(args.data, args.format, args.text_column, args.id_column, header, args.max_text_chars)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done, last_line = resume_point(args.out)
    if done:
        skip_written(records, done, last_line, args)
        print(f"resuming: {done} lines already in {args.out}", file=sys.stderr)
    summary = {"bundle": str(args.bundle), "lines": done, "written": 0, "skipped_malformed": 0, "resumed_from": done,
               "seconds": 0.0, "texts_per_second": 0.0, "workers": args.workers}
    upcoming = next(records, None)
    if upcoming is None:
        print(f"{args.out} already has all {done} lines of {args.data}: nothing to do" if done
              else f"{args.data} holds no records", file=sys.stderr)
        args.out.touch()
        return summary, None
    stopped: list[Record] = []
    threads = args.threads or max(1, available_cores() // args.workers)
    bar = progress.bar(total=estimated_records(args.data, header), initial=done, unit=" texts", file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    with open(args.out, "ab") as out:
        batches = batched(itertools.chain([upcoming], records), args.batch_size, not args.skip_malformed, stopped)
        for batch, lines in scored_in_order(batches, bundle, args.device, args.workers, threads, args.id_column is not None):
            out.write(lines)
            out.flush()  # a kill loses at most the batches in flight; resume_point cuts a partial line
            summary["written"] += len(batch)
            summary["skipped_malformed"] += sum(record.problem is not None for record in batch)
            bar.update(len(batch))
    seconds = time.perf_counter() - started
    bar.total = bar.n  # the true count, where the estimate was high
    bar.close()
    scored = summary["written"] - summary["skipped_malformed"]
    summary.update(lines=done + summary["written"], seconds=round(seconds, 3),
                   texts_per_second=round(scored / seconds, 1) if seconds else 0.0)
    print(f"scored {scored} texts in {seconds:.1f} s: {summary['texts_per_second']:,.0f} texts/s with {args.workers} "
          f"worker(s) of {threads} onnxruntime thread(s)", file=sys.stderr)
    return summary, (stopped[0] if stopped else None)
