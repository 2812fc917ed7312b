"""Batches by cost: a model runs its share of an adaptive batch as groups of texts of similar
length, sized by a budget of padded tokens, the budget measured per model at warm-up.

Why: the batcher (batching.py) takes what queued while the model was busy, up to
TEXTSERVE_MAX_BATCH_TEXTS texts, whatever their lengths. One padded batch costs its rows times
its longest row: 64 TREC questions of 3 to 39 tokens ran as 64 x 39, about twice the tokens
they hold, at half the texts/s of 64 texts of one length (docs/performance.md, "Batches by
cost"). Sorting the texts by length and cutting them into groups of at most `token_budget`
padded tokens (rows x the group's longest row) runs little padding, each group at a size the
model runs well; texts longer than the typical one still run as many together as the budget
gives at the typical length (`min_rows`). Answers go back in the texts' order. The groups run
one after another in the same call and answer together, so no text waits longer than it did
in one batch.

The budget is found per model when it loads (`measure_token_budget`): batches of 1, 2, 4, ...
rows of a typical length, timed on the model's own sessions and device; the smallest batch
whose cost per row is within NEAR_BEST of the cheapest, times that length. Not the cheapest
itself: rows of one length cost about the same from 16 to 64 of them, but real texts are of
many lengths, and a larger group pads more. `make bench` saw it: kim-cnn-trec6 measured at 128
tokens (8 rows) ran its 64 connections of one question each at 2,049-2,301 texts/s with 23 %
padding, and the cheapest at 512 (32 rows) at 1,640 with 29 %.
TEXTSERVE_BATCH_TOKENS overrides it. The processes of a machine agree on it (`agreed_budget`,
a folder in the temp directory, keyed by the model's version, device, threads and hardware):
the first to load a model measures it, the others read its figure, so two HTTP workers never
batch the same model differently, and a restart does not measure again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

NEAR_BEST = 1.10  # the smallest size within 10 % of the cheapest cost per row: see the module's docstring
TIMING_ROUNDS = 3  # each batch size timed this often, the fastest kept
LONGEST_TIMED_S = 0.03  # batches past one that takes this long are not tried: loading stays quick (kim-cnn-trec6: 0.15 s in all)


def length_groups(lengths: np.ndarray, token_budget: int | None, min_rows: int = 1) -> list[np.ndarray]:
    """Row indices of `lengths` (B,) sorted by length and cut into groups: a group whose
    longest row has L tokens (at least 1) holds up to max(min_rows, token_budget // L) rows.
    Short texts pack many rows; long ones still run `min_rows` together, not alone (an RNN
    reads a batch step by step, so its cost per row at 1 row is about six times that at 16,
    whatever the length). No budget: one group of every row, in order (one padded batch)."""
    if token_budget is None or len(lengths) <= 1:
        return [np.arange(len(lengths))]
    order = np.argsort(lengths, kind="stable")  # ascending: each row added is the group's longest so far
    groups, start = [], 0
    for position in range(1, len(order)):
        rows, longest = position - start + 1, max(int(lengths[order[position]]), 1)
        if rows > max(min_rows, token_budget // longest):
            groups.append(order[start:position])
            start = position
    groups.append(order[start:])
    return groups


def rows_at_typical_length(token_budget: int | None, typical_tokens: int) -> int:
    """The rows a budget gives at the length it was measured at: the least a group holds."""
    return max(1, (token_budget or 0) // typical_tokens)


def padded_tokens(lengths: np.ndarray, groups: list[np.ndarray]) -> int:
    """Tokens the groups run, padding included: each group's rows x its longest row."""
    return sum(len(group) * int(lengths[group].max(initial=0)) for group in groups)


def measure_token_budget(run_rows: Callable[[int], None], row_tokens: int, max_rows: int) -> int:
    """The padded-token budget for a model: `run_rows(r)` runs one batch of r rows of
    `row_tokens` tokens each. r = 1, 2, 4, ... up to `max_rows` (and no further once one run
    takes LONGEST_TIMED_S) are timed in TIMING_ROUNDS interleaved rounds, the fastest of each
    kept (noise only adds time, and a burst of it falls on every size alike); the budget is the
    smallest r whose time per row is within NEAR_BEST of the cheapest, times `row_tokens`."""
    sizes, rows = [], 1
    while rows <= max_rows:
        sizes.append(rows)
        if _seconds(run_rows, rows) > LONGEST_TIMED_S:  # this first run of the shape allocates; not kept
            break
        rows *= 2
    per_row = {rows: float("inf") for rows in sizes}
    for _ in range(TIMING_ROUNDS):
        for rows in sizes:
            per_row[rows] = min(per_row[rows], _seconds(run_rows, rows) / rows)
    cheapest = min(per_row.values())
    return min(rows for rows, cost in per_row.items() if cost <= NEAR_BEST * cheapest) * row_tokens


def agreed_budget(folder: Path | None, key: str, measure: Callable[[], int]) -> int:
    """`measure()`'s budget, measured once among the processes that share `folder` (the
    machine's): the first to ask measures under a lock on `key` and writes the figure; those
    that ask meanwhile wait for it, those that ask later read it. No folder: measured here."""
    if folder is None:
        return measure()
    folder.mkdir(parents=True, exist_ok=True)
    figure = folder / f"{key}.tokens"
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes, by the kernel if the process dies
        with contextlib.suppress(OSError, ValueError):  # none yet, or unreadable: measured again
            if (budget := int(figure.read_text())) >= 1:
                return budget
        budget = measure()
        partial = figure.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(str(budget))
        partial.replace(figure)  # whole or absent: a process killed while writing leaves no half figure
        return budget


def _seconds(run_rows: Callable[[int], None], rows: int) -> float:
    started = time.perf_counter()
    run_rows(rows)
    return time.perf_counter() - started
