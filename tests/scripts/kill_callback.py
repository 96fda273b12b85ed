"""For the resume test: the run SIGKILLs itself when a given step starts (after that step's checkpoint is written),
so where it dies does not depend on timing or machine load."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(Callback):
    """SIGKILLs the run in the middle of writing the checkpoint of step `step`: after half of its bytes reached
    the file (every local file write goes through fsspec's LocalFileOpener, Lightning's included)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # runs before ModelCheckpoint's own on_train_batch_end: Lightning calls checkpoint callbacks last
        if trainer.global_step != self.step:
            return
        from fsspec.implementations.local import LocalFileOpener

        original = LocalFileOpener.write

        def half_then_die(self, data):
            original(self, data[: len(data) // 2])
            self.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        LocalFileOpener.write = half_then_die
