"""Progress for long work, on a terminal and in a log file alike.

tqdm redraws one line with carriage returns, which is right on a terminal and unreadable in a log (or silent, when
callers disable it off a terminal, as vggnet did: a 24-minute `eval` under `nohup` printed nothing). Off a terminal
:func:`progress_bar` keeps tqdm's counting and time-left estimate but writes a whole line at most every
``LOG_INTERVAL_S`` seconds, so `... 2>&1 | cat` and log collectors see steady progress.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

__all__ = ["LOG_FORMAT", "LOG_INTERVAL_S", "progress_bar"]

LOG_INTERVAL_S = 30.0
# done/total, share, elapsed<left, rate and tqdm's postfix (e.g. the training loss): no bar graphics in a log
LOG_FORMAT = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) "
              "[{elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}]")


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.out.write(line + "\n")
            self.out.flush()

    def flush(self) -> None:
        self.out.flush()


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", progress: bool | None = None, leave: bool = True, out: IO[str] | None = None,
                 **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal; off one, a line (count, rate, time left) every ``LOG_INTERVAL_S`` seconds and a
    last one at the end, the first after one interval unless ``progress=True`` asked for it. ``progress=False``
    disables it."""
    out = out or sys.stderr
    if progress is False:
        return tqdm(iterable, total=total, disable=True)
    if out.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=out, **kwargs)
    kwargs.pop("mininterval", None)
    kwargs.pop("dynamic_ncols", None)
    # unasked (None), the first line waits one interval: quick work (tests, demos) prints nothing extra
    kwargs.setdefault("delay", LOG_INTERVAL_S if progress is None else 0.0)
    kwargs.setdefault("bar_format", LOG_FORMAT)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=True, file=_Lines(out), mininterval=LOG_INTERVAL_S,
                miniters=1, **kwargs)
