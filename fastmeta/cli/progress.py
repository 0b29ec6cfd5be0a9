"""One progress line on stderr: rewritten in place on a terminal, printed as a plain
line every `interval` seconds otherwise (logs, CI)."""

import sys
import time
from typing import TextIO


class Progress:
    """update(step, loss, accuracy, episodes_per_second) after each training step shows
    step/total, running means of loss and accuracy, and throughput; message(text)
    prints a line of its own; close() ends the in-place line. With enabled=False
    (distributed ranks other than 0) it prints nothing."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        interval: float = 10.0,
        smoothing: float = 0.9,
        enabled: bool = True,
    ):
        self.total, self.stream, self.enabled = total, stream or sys.stderr, enabled
        self.tty = self.stream.isatty()
        self.interval = 0.2 if self.tty else interval
        self.smoothing = smoothing
        self.loss = self.accuracy = None
        self._shown = time.monotonic()
        self._width = 0  # length of the in-place line on screen

    def update(self, step: int, loss: float, accuracy: float, episodes_per_second: float) -> None:
        s = self.smoothing
        self.loss = loss if self.loss is None else s * self.loss + (1 - s) * loss
        self.accuracy = (
            accuracy if self.accuracy is None else s * self.accuracy + (1 - s) * accuracy
        )
        now = time.monotonic()
        if now - self._shown < self.interval and step != self.total:
            return
        self._shown = now
        line = (
            f"step {step}/{self.total}  loss {self.loss:.4f}  acc {100 * self.accuracy:.2f}%"
            f"  {episodes_per_second:.1f} episodes/s"
        )
        if self.tty:
            self._write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self._write(line + "\n")

    def message(self, text: str) -> None:
        self.close()
        self._write(text + "\n")

    def close(self) -> None:
        if self._width:
            self._write("\n")
            self._width = 0

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()
