"""The optimiser recipe shared by every LightningModule of the project."""

from __future__ import annotations

import math

import torch


def adamw_warmup_cosine(params, lr: float, weight_decay: float, warmup_steps: int, total_steps: int) -> dict:
    """AdamW with linear warm-up over `warmup_steps`, then cosine decay to 0 at `total_steps`; stepped per batch.
    Returns what `LightningModule.configure_optimizers` returns."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, total_steps)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
