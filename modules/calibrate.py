"""Fit the data-dependent values of a plan (positional trends, dataset means, priors) on a dataloader.

    plan = PruningPlan(stage1={"name": "debiased", "inner": "fastervlm"}, n1=64,
                       stage2={"name": "debiased", "inner": "fastv"}, n2=16)
    calibrate(model, plan, train_loader, max_batches=50)
    plan.save("plan.yaml")          # the fitted values are saved with it

Calibrate on training data, never on the evaluation set.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.selectors.base import Calibrated

TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


@torch.no_grad()
def calibrate(model: nn.Module, plan: PruningPlan, batches: Iterable[dict], max_batches: int | None = None,
              processor=None) -> PruningPlan:
    """Run the plan over `batches` (processor-style dicts) and fit every `Calibrated` component in place.
    `processor`: the one that made the batches (needed when they carry `image_sizes`; see `PrunedVLM`)."""
    pruned = PrunedVLM(model, plan, processor=processor)
    targets = [(stage, c) for stage, c in plan.components() if isinstance(c, Calibrated)]
    if not targets:
        raise ValueError(f"nothing in plan {plan} needs calibration")
    for stage, component in targets:
        component.start_calibration()
        pruned.observers[stage].append(component)
    seen = 0
    for batch in batches:
        if max_batches is not None and seen >= max_batches:
            break
        # the text inputs plus whatever visual inputs this family's adapter reads (grids, sizes, image counts)
        pruned(**{k: v for k, v in batch.items() if k in TEXT_INPUTS or k in pruned.adapter.vision_inputs})
        seen += 1
    for _, component in targets:
        component.finish_calibration()
    return plan
