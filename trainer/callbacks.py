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
            # collective under ZeRO-3; writes on rank 0. The card records what was just measured.
            pl_module.export_head(self.export_dir, metrics=values, training_data=_training_data(trainer.datamodule))
            trainer.strategy.barrier("report-accuracy-export")
            rank_zero_info(f"pruner head written to {self.export_dir}")


class KeptTokenOverlays(L.Callback):
    """At the end of validation (every `every_n_epochs` epochs, never in the sanity check): the kept visual tokens
    of the first `num_samples` validation samples (fixed: the validation dataset's first records, in order),
    drawn per stage over their original images by `modules.overlay` (see there what each pixel shows) and logged
    to TensorBoard as images `kept_tokens/sample_<i>` at the current global step.

    Works with `modules.distill.DistillPruner` (its `pruned` PrunedVLM) over a `LlavaDataModule`: each sample is
    collated alone by the validation loader's own collate function and run as `predict_step` runs it (teacher-
    forced prompt + answer, `prompt_end`), in the module's current (validation) mode. The forward pass runs on
    every rank (ZeRO-3 gathers weights collectively); only rank 0's TensorBoard writer records the images. With no
    TensorBoard logger it does nothing and warns once.
    """

    TAG = "kept_tokens/sample_{}"

    def __init__(self, num_samples: int = 4, every_n_epochs: int = 1, max_side: int = 448):
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 1")
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.max_side = max_side
        self._warned = False

    def _writer(self, trainer: L.Trainer):
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        if not self._warned:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"KeptTokenOverlays logs images to TensorBoard, but the trainer's loggers are "
                           f"{[type(x).__name__ for x in trainer.loggers]}: no overlays will be logged",
                           category=UserWarning)
            self._warned = True
        return None

    @staticmethod
    def _loader(trainer: L.Trainer):
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        return loaders

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        writer = self._writer(trainer)
        loader = self._loader(trainer)
        if writer is None or loader is None or not hasattr(loader, "dataset"):
            return
        import torch

        from modules.distill import MODEL_INPUTS
        from trainer.visualize import run_and_draw

        dataset, collate = loader.dataset, loader.collate_fn
        shown = 0
        for index in range(len(dataset)):
            if shown >= self.num_samples:
                break
            item = dataset[index]
            if item is None:  # unreadable: the loader skips it too
                continue
            batch = collate([item])
            if "input_ids" not in batch:
                continue
            batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            images = list(item.get("images") or [item["image"]])
            inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
            array, _, _ = run_and_draw(pl_module.pruned, inputs, images, max_side=self.max_side,
                                       title=f"epoch {trainer.current_epoch} step {trainer.global_step} "
                                             f"sample {index} ({item.get('id')})",
                                       prompt_end=batch.get("prompt_end"))
            writer.add_image(self.TAG.format(shown), array, global_step=trainer.global_step, dataformats="HWC")
            shown += 1


def _training_data(datamodule) -> str | None:
    """A one-line description of the data a pruner was trained on, for its model card."""
    source = getattr(datamodule, "root", None) or getattr(datamodule, "paths", {}).get("train")
    return f"{type(datamodule).__name__}: {source}" if source else type(datamodule).__name__
