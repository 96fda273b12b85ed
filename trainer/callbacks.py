"""Callbacks the CLI always installs."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class SkipSummary(L.Callback):
    """Report the data module's skipped/dropped records at the end of every epoch (train and validation)."""

    def _report(self, trainer: L.Trainer, stage: str) -> None:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "skip_summary") and stage in getattr(dm, "datasets", {}):
            rank_zero_info(f"[epoch {trainer.current_epoch}] {dm.skip_summary(stage, trainer.current_epoch)}")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "train")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, "validate")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "test")
