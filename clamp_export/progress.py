"""Progress bars for long work that suit both a terminal and a CI log.

On a terminal, tqdm as usual. When stderr is not a terminal (a CI job, ``make demo > log``), whole
lines at most every ``LOG_INTERVAL`` seconds instead of carriage-return updates, which a log
file keeps every one of.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL = 10.0


class _Lines:
    """A tqdm output for logs: each refresh is written as one complete line."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, throttled to lines when stderr is not a terminal.

    Callers update postfixes with ``refresh=False``, so the throttle holds.
    """
    stream = sys.stderr
    if not stream.isatty():
        kwargs = {
            "mininterval": LOG_INTERVAL,
            "file": _Lines(stream),
            "ascii": True,
            "ncols": 100,
            **kwargs,
        }
    return tqdm(iterable, **kwargs)
