"""One progress bar across the grid, in epochs, fed by each run's ``progress.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Progress:
    """One progress bar across the grid, in epochs, fed by each run's ``progress.json``."""

    def __init__(self, names: list[str], epochs: int) -> None:  # one name per run, repeated per seed
        from tqdm import tqdm

        self.epochs = epochs
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=len(names) * epochs,
            unit="epoch",
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not interactive,  # logs and pipes get one line per finished run instead
        )
        self.done = 0.0

    def update(self, tag: str, name: str, run_dir: Path) -> None:
        """Show the run ``tag`` (``[2/7]``, ``[seed 1 2/7]``) at the epoch its ``progress.json`` reports."""
        try:
            epoch = float(json.loads((run_dir / "progress.json").read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            epoch = 0.0
        self.bar.set_description(f"{tag} {name} epoch {min(epoch, self.epochs):.1f}/{self.epochs}")
        self._advance_to(self.done + min(epoch, self.epochs))

    def write(self, message: str) -> None:
        """Print a line above the bar (or on its own when there is no bar)."""
        if self.bar.disable:
            print(message, flush=True)
        else:
            self.bar.write(message)

    def finish_run(self) -> None:
        """Count a whole run as done."""
        self.done += self.epochs
        self._advance_to(self.done)

    def _advance_to(self, value: float) -> None:
        self.bar.n = round(value, 2)
        self.bar.refresh()

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()
