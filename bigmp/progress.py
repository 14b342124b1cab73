"""Progress bars for long maps: ``pool.map(f, xs, progress=True)``.

tqdm draws the bar when it is installed; otherwise a one-line counter is rewritten in place
on stderr. Either way nothing is printed when stderr is not a terminal (logs, CI, pipes).
``progress`` may also be a string: it becomes the bar's label.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Optional, Union

__all__ = ["make_progress", "LineProgress"]


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False


class LineProgress:
    """A plain ``label: done/total [pct%] rate/s`` line, redrawn at most 10 times a second."""

    def __init__(self, total: Optional[int], desc: str, stream: Any):
        self.total = total
        self.desc = desc
        self.stream = stream
        self.n = 0
        self._began = time.monotonic()
        self._drawn = 0.0
        self._lock = threading.Lock()
        self._closed = False
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        elapsed = max(now - self._began, 1e-9)
        if self.total:
            text = f"{self.desc}: {self.n}/{self.total} [{100.0 * self.n / self.total:3.0f}%]"
        else:
            text = f"{self.desc}: {self.n}"
        text += f" {self.n / elapsed:.1f}/s {elapsed:.1f}s"
        try:
            self.stream.write("\r" + text)
            self.stream.flush()
        except Exception:
            pass

    def update(self, n: int = 1) -> None:
        with self._lock:
            if self._closed:
                return
            self.n += n
            self._draw(force=self.total is not None and self.n >= self.total)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._draw(force=True)
            try:
                self.stream.write("\n")
                self.stream.flush()
            except Exception:
                pass


class _Tqdm:
    def __init__(self, bar: Any):
        self.bar = bar
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.bar.update(n)

    def close(self) -> None:
        with self._lock:
            self.bar.close()


def make_progress(progress: Union[bool, str, None], total: Optional[int],
                  desc: str = "bigmp") -> Optional[Any]:
    """A progress bar (``update(n)``, ``close()``), or None when off or stderr is no terminal."""
    if not progress:
        return None
    stream = sys.stderr
    if not _is_tty(stream):
        return None
    if isinstance(progress, str):
        desc = progress
    try:
        from tqdm import tqdm
    except ImportError:
        return LineProgress(total, desc, stream)
    return _Tqdm(tqdm(total=total, desc=desc, file=stream, unit="task", dynamic_ncols=True))


class Counter:
    """Counts delivered items for a bar and closes it once everything is in."""

    def __init__(self, bar: Optional[Any], total: Optional[int] = None):
        self.bar = bar
        self.total = total
        self.done = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.bar is None:
            return
        with self._lock:
            self.done += n
            finished = self.total is not None and self.done >= self.total
        self.bar.update(n)
        if finished:
            self.bar.close()

    def set_total(self, total: int) -> None:
        """The total once a lazy input has been read to its end."""
        if self.bar is None:
            return
        with self._lock:
            self.total = total
            finished = self.done >= total
        if finished:
            self.bar.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
