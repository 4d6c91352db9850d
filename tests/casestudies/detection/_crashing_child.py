"""A grid child that dies like a killed process, injected by the tests in place of the real one.

``python -m tests.casestudies.detection._crashing_child "<run>:<epoch>,..." SPEC_JSON`` trains the run of
``SPEC_JSON`` as :mod:`casestudies.detection.grid.child` does, except that the named runs exit hard
(``os._exit(3)``) at the second batch of that epoch, after the previous epoch's checkpoint: the state a
``kill -9`` leaves, for the resume tests.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch.callbacks import Callback

from casestudies.detection.grid import child
from casestudies.detection.grid.spec import RunSpec
from casestudies.detection.offline import configure_offline


class CrashAt(Callback):
    """Exit hard at batch 1 of ``epoch`` (a Lightning variant run)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            os._exit(3)


def ultralytics_crash_at(epoch: int) -> dict[str, list[Any]]:
    """Ultralytics callbacks that exit hard at batch 1 of ``epoch`` (the baseline run)."""
    batches = {"seen": 0}

    def epoch_start(trainer: Any) -> None:
        batches["seen"] = 0

    def batch_end(trainer: Any) -> None:
        if trainer.epoch == epoch and batches["seen"] == 1:
            os._exit(3)
        batches["seen"] += 1

    return {"on_train_epoch_start": [epoch_start], "on_train_batch_end": [batch_end]}


def main(argv: list[str]) -> int:
    crashes = {name: int(epoch) for name, _, epoch in (item.partition(":") for item in argv[0].split(","))}
    configure_offline()
    spec = RunSpec.load(argv[1])
    epoch = crashes.get(spec.name)
    if epoch is None:
        child.run(spec)
    else:
        child.run(spec, callbacks=[CrashAt(epoch)], ultralytics_callbacks=ultralytics_crash_at(epoch))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
