"""Progress of long loops: a tqdm bar on a terminal; in a log file, one line at a sane interval instead of
one per iteration (a redirected tqdm writes a line per refresh)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator

from tqdm import tqdm

INTERVAL_S = 30.0  # between progress lines when stderr is not a terminal


class _LogProgress:
    """The part of tqdm's interface the stages use, written as log lines."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, logger: logging.Logger, interval: float):
        self.iterable, self.desc, self.logger, self.interval = iterable, desc, logger, interval
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator:
        t0 = last = time.monotonic()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= self.interval or done == self.total:
                last = now
                of = f"/{self.total}" if self.total is not None else ""
                rate = done / (now - t0) if now > t0 else 0.0
                extra = f", {self.postfix}" if self.postfix else ""
                self.logger.info(f"{self.desc}: {done}{of} ({rate:.2f}/s{extra})")


def progress(iterable: Iterable, desc: str, total: int | None = None, disable: bool = False,
             logger: logging.Logger | None = None, interval: float = INTERVAL_S):
    """`iterable`, reporting its progress (a bar on a terminal, log lines every `interval` s otherwise)."""
    if disable:
        return _Quiet(iterable)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False, mininterval=1.0)
    return _LogProgress(iterable, desc, total, logger or logging.getLogger("qdistill"), interval)


class _Quiet:
    def __init__(self, iterable: Iterable):
        self.iterable = iterable

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator:
        return iter(self.iterable)
