"""Progress of the training and prediction commands, on stderr: tqdm's bars where a person
watches (stderr is a terminal), plain lines where it is a log (a file or a pipe, where tqdm's
nested bars wrote their cursor-up escape codes, `[A`), and one line per epoch with its time and
an estimate of the whole run in both."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # a log gets a progress line at most this often


def on_terminal() -> bool:
    return sys.stderr.isatty()


def bar(iterable=None, enabled: bool = True, **options):
    """A tqdm bar on a terminal; in a log, a PlainProgress (a line now and then); nothing when
    not `enabled`."""
    if not enabled:
        return tqdm(iterable, disable=True, **options)
    if on_terminal():
        return tqdm(iterable, **options)
    return PlainProgress(iterable, options.get("desc", ""), options.get("total"), options.get("initial", 0), options.get("unit", ""))


class PlainProgress:
    """What a log gets instead of a bar: 'epoch 3: 120/400 (30 %), 41 it/s' as one line at most
    every LOG_INTERVAL_S, no carriage return or escape code. The parts of tqdm's interface the
    commands use: iteration, update, set_postfix, close, n and total."""

    def __init__(self, iterable=None, desc: str = "", total: int | None = None, initial: int = 0, unit: str = "",
                 interval_s: float = LOG_INTERVAL_S) -> None:
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = initial
        self.unit = unit.strip() or "it"
        self.postfix = ""
        self.interval_s = interval_s
        self.started = self.last_line = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.monotonic()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        done = f"{self.n:,}/{self.total:,} ({self.n / self.total:.0%})" if self.total else f"{self.n:,}"
        rate = self.n / max(1e-9, now - self.started)
        return f"{self.desc + ': ' if self.desc else ''}{done}, {rate:,.0f} {self.unit}/s{self.postfix}"

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {name} {value}" for name, value in values.items())

    def close(self) -> None:
        pass


def duration(seconds: float) -> str:
    """41.2 s, 11 min 48 s, 2 h 5 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def epoch_line(epoch: int, epochs: int, epoch_seconds: float, elapsed_seconds: float, details: str = "") -> str:
    """'epoch 3/25: 28.1 s, train loss 0.4102, dev 0.8730; 1 min 25 s so far, about 10 min 18 s
    left (the whole run about 11 min 43 s)': the estimate is the epochs so far's mean time
    times the epochs left (early stopping can end the run sooner)."""
    left = (elapsed_seconds / epoch) * (epochs - epoch) if epoch else 0.0
    return (f"epoch {epoch}/{epochs}: {duration(epoch_seconds)}{', ' + details if details else ''}; "
            f"{duration(elapsed_seconds)} so far, about {duration(left)} left (the whole run about {duration(elapsed_seconds + left)})")


def report(line: str, enabled: bool = True) -> None:
    """One line on stderr, above a bar that is running (tqdm.write), or plainly."""
    if enabled:
        tqdm.write(line, file=sys.stderr)
