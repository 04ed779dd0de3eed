"""Terminal output shared by ``hyper-parallel demo`` and ``hyper-parallel bench``: one progress line, one table
formatter.

Neutral code: the standard library only (no framework, no third-party package), so the CLI's output costs no import.

>>> print(format_table([["torch", "1.5"]], ["run", "loss"]))
run    loss
-----  ----
torch   1.5
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

__all__ = ["Progress", "format_table"]

_ERASE = "\r\033[K"  # back to column 0, then clear to the end of the line


class Progress:
    """A one-line progress bar: ``label [#####.......] done/total  [elapsed]  detail``.

    On a terminal the line is redrawn in place, at most once per ``min_redraw_s`` (the last step always, so the bar
    ends full). Elsewhere (CI logs, pipes) nothing can be redrawn, so whole lines are printed: one per update with
    ``log_lines=None``, else the first one and then ``log_lines`` more spread over the run, which keeps long logs
    short.

    Args:
        label: text before the bar.
        total: number of steps, at least 1.
        stream: where to draw; default ``sys.stderr`` (stdout stays for the results).
        enabled: False draws nothing; the steps are still counted.
        width: characters of the bar, at least 1.
        show_elapsed: print the seconds since the bar was created after the count.
        log_lines: off a terminal, a line at the first update and whenever ``log_lines * done // total`` grows;
            ``None``: a line per update.
        min_redraw_s: on a terminal, the least time between two redraws (0: redraw at every update).
        keep: on :meth:`close`, a terminal keeps the last line (True) or erases it (False: the results follow on
            their own).

    Raises:
        ValueError: ``total`` or ``width`` under 1, or ``log_lines`` neither None nor at least 1.
    """

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, enabled: bool = True,
                 width: int = 24, show_elapsed: bool = False, log_lines: int | None = 10,
                 min_redraw_s: float = 0.1, keep: bool = True):
        for name, value in (("total", total), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Progress: {name} must be an int >= 1, got {value!r}")
        if log_lines is not None and (not isinstance(log_lines, int) or log_lines < 1):
            raise ValueError(f"Progress: log_lines must be None (a line per update) or an int >= 1, "
                             f"got {log_lines!r}")
        self.label, self.total, self.width = label, total, width
        self.stream = stream or sys.stderr
        self.enabled, self.show_elapsed, self.keep = enabled, show_elapsed, keep
        self.log_lines, self.min_redraw_s = log_lines, min_redraw_s
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done, self.detail = 0, ""
        self._t0 = time.monotonic()
        self._last_draw, self._last_logged, self._drawn = 0.0, -1, False

    def update(self, done: int, detail: str = "") -> None:
        """Set the steps done (``done`` of ``total``) and the text after the count, then draw if it is time."""
        self.done, self.detail = done, detail
        if self.enabled:
            self._draw()

    def step(self, detail: str = "") -> None:
        """One more step done; ``detail`` says what runs now."""
        self.update(self.done + 1, detail)

    def line(self) -> str:
        """The current line, without control characters."""
        filled = min(self.width, int(round(self.done / self.total * self.width)))
        parts = [f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                 f"{self.done:>{len(str(self.total))}}/{self.total}"]
        if self.show_elapsed:
            parts.append(f"{time.monotonic() - self._t0:5.1f}s")
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)

    def clear_line(self) -> None:
        """Make room for a message above the bar (terminal only; the next update draws the bar again)."""
        if self.tty and self._drawn:
            self.stream.write(_ERASE)

    def close(self) -> None:
        """End the bar: on a terminal, the last line stays (``keep``) or is erased."""
        if self.tty and self._drawn:
            self.stream.write(_ERASE + (self.line() + "\n" if self.keep else ""))
            self.stream.flush()

    def _draw(self) -> None:
        now = time.monotonic()
        if self.tty:
            if self.done < self.total and now - self._last_draw < self.min_redraw_s:
                return
            self.stream.write(_ERASE + self.line())
            self._drawn = True
        else:
            if self.log_lines is not None:
                mark = self.log_lines * self.done // self.total
                if mark == self._last_logged:
                    return
                self._last_logged = mark
            self.stream.write(self.line() + "\n")
        self._last_draw = now
        self.stream.flush()


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str], *, align: str | None = None,
                 markdown: bool = False) -> str:
    """``rows`` under ``header``, each column as wide as its widest cell.

    Plain (default): cells joined by two spaces, a rule of dashes under the header. ``markdown=True``: a Markdown
    table (pipes, and a rule whose colons carry the alignment), which reads in a terminal and pastes into docs.

    Args:
        rows: the cells of each row (turned into text with ``str``), as many as ``header`` has.
        header: the column titles.
        align: one letter per column, ``l`` (left) or ``r`` (right); default the first column left, the others
            right (labels, then numbers).
        markdown: draw a Markdown table.

    Raises:
        ValueError: a row with a different number of cells than ``header``, or a bad ``align``.
    """
    header = [str(h) for h in header]
    n = len(header)
    text = [[str(c) for c in r] for r in rows]
    for i, r in enumerate(text):
        if len(r) != n:
            raise ValueError(f"format_table: every row must have {n} cells like the header {header}, "
                             f"row {i} has {len(r)}: {r}")
    align = align if align is not None else "l" + "r" * (n - 1)
    if len(align) != n or set(align) - {"l", "r"}:
        raise ValueError(f"format_table: align must be {n} letters, each 'l' (left) or 'r' (right), got {align!r}")
    widths = [max(len(r[i]) for r in [header, *text]) for i in range(n)]

    def cells(r: list[str]) -> list[str]:
        return [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)]

    if markdown:
        def line(r: list[str]) -> str:
            return "| " + " | ".join(cells(r)) + " |"

        # the rule's cells span the padding too: a colon on the aligned side, the rest dashes
        rule = "|" + "|".join(":" + "-" * (w + 1) if a == "l" else "-" * (w + 1) + ":"
                              for w, a in zip(widths, align)) + "|"
    else:
        def line(r: list[str]) -> str:
            return "  ".join(cells(r))

        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, text)])
