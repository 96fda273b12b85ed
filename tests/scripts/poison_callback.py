"""For the non-finite guard tests: poison one training step, as a corrupt image decoded to NaN pixels or an
overflowing layer would."""

import torch
from lightning.pytorch.callbacks import Callback


class PoisonStep(Callback):
    """At global step `step`: NaN pixels in the batch (`what="input"`: the loss turns NaN) or an inf in one
    trainable gradient after backward (`what="gradient"`: the loss stays finite)."""

    def __init__(self, step: int, what: str = "input"):
        self.step, self.what = step, what

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.what == "input" and trainer.global_step == self.step:
            batch["pixel_values"][0] = float("nan")

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.what == "gradient" and trainer.global_step == self.step:
            param = next(p for p in pl_module.trainable_parameters() if p.grad is not None)
            param.grad.view(-1)[0] = torch.inf
