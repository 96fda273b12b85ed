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


class ReportAccuracy(L.Callback):
    """At the end of training: accuracy of the unpruned teacher vs the pruned student on the validation split,
    and optionally the head exported as a pruner directory. Works with `modules.distill.DistillPruner`.

    Runs on every rank, in `on_train_end` (Lightning's `on_fit_end` comes after the strategy's teardown, when
    the process group may be gone and, on GPUs, the model has been moved to the CPU): under ZeRO-3 each
    forward pass gathers the partitioned weights with collectives, so every rank evaluates the same batches
    (the whole validation loader, not a per-rank shard, capped at `max_batches`) and takes part in gathering
    the trained weights for the export; rank 0 alone prints and writes.
    """

    def __init__(self, export_dir: str | None = None, max_batches: int | None = None):
        self.export_dir = export_dir
        self.max_batches = max_batches

    @staticmethod
    def message(values: dict[str, float], n_tokens: int) -> str:
        """The report line for `DistillPruner.evaluate`'s values on a model with `n_tokens` visual tokens."""
        kept = values["kept_ratio"] * n_tokens
        return (
            f"Validation answer accuracy -- unpruned ({n_tokens} visual tokens): "
            f"{100 * values['teacher_accuracy']:.1f}% | pruned ({kept:.1f} tokens per layer, "
            f"{100 * values['kept_ratio']:.1f}%): {100 * values['accuracy']:.1f}% "
            f"(= {100 * values['accuracy'] / max(values['teacher_accuracy'], 1e-9):.1f}% of the teacher); "
            f"teacher agreement {100 * values['teacher_agreement']:.1f}%, KL {values['kl']:.4f}"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.datamodule is None:
            return
        values = pl_module.evaluate(trainer.datamodule.val_dataloader(), self.max_batches)
        rank_zero_info("\n" + self.message(values, pl_module.pruned.adapter.num_image_tokens))
        if self.export_dir is not None:
            pl_module.export_head(self.export_dir)  # collective under ZeRO-3; writes on rank 0
            trainer.strategy.barrier("report-accuracy-export")
            rank_zero_info(f"pruner head written to {self.export_dir}")
