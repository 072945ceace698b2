"""Progress bars and per-epoch lines of a training stage, on stderr.

On a terminal a bar follows the batches of the running epoch and disappears when the stage ends;
elsewhere (a log file, a pipe) only one plain line per epoch is written, so logs hold no stale
bar states.
"""

from __future__ import annotations

import sys

from rich.console import Console


class Progress:
    """A rich progress bar over the batches of every epoch (silent when disabled)."""

    def __init__(self, enabled: bool, epochs: int, batches: int, first_epoch: int = 1):
        self.enabled, self.epochs, self.batches = enabled, epochs, batches
        self.first_epoch = first_epoch
        self._progress = None

    def __enter__(self):
        self._console = Console(stderr=True, highlight=False, soft_wrap=True)
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"),
                                      TimeElapsedColumn(), transient=True,
                                      console=self._console)
            self._progress.__enter__()
            self._task = self._progress.add_task(f"epoch {self.first_epoch}",
                                                 total=self.batches)
        return self

    def advance(self):
        if self._progress is not None:
            self._progress.advance(self._task)

    def epoch_done(self, row: dict, k: int):
        if not self.enabled:
            return
        text = f"epoch {row['epoch']} loss {row['loss']:.4f}"
        if f"valid_P@{k}" in row:
            text += f" valid P@{k} {row[f'valid_P@{k}']:.4f}"
        self._console.print(text)
        if self._progress is not None:
            self._progress.reset(self._task, description=f"epoch {row['epoch'] + 1}")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
