"""Serving a released pruner: a learned head, the plan it was trained for, and its LoRA adapters, on a model.

This sits above both the engine (`modules.pruned_vlm`) and the learned head (`modules.head`), which do not import
each other: the engine takes any stage-1 selector, the head is one.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from modules.head import PrunerHead
from modules.pruned_vlm import PrunedVLM, PruningPlan


def trained_plan(head: PrunerHead) -> PruningPlan:
    """The PruningPlan `head` was trained for (its config's budgets, stage-2 layer and scorer with debias values);
    n1 defaults to 0.25 when the config records none."""
    cfg = head.config
    return PruningPlan(stage1=head, n1=cfg.n1 if cfg.n1 is not None else 0.25, stage2=cfg.stage2,
                       n2=cfg.n2 if cfg.stage2 is not None else None,
                       layer=cfg.layer if cfg.stage2 is not None else None)


def load_lora(model: nn.Module, adapter_dir: Path) -> None:
    """Inject and load the LoRA adapters a pruner saved in `adapter_dir` (peft format) into `model`."""
    from peft import LoraConfig, inject_adapter_in_model

    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    fields = LoraConfig.__dataclass_fields__
    config = LoraConfig(**{k: v for k, v in raw.items() if k in fields and fields[k].init})
    inject_adapter_in_model(config, model)
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    missing = [k for k in state if k not in dict(model.named_parameters())]
    if missing:
        raise ValueError(f"{adapter_dir} holds LoRA weights this model has no place for, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False)


def load_pruned(model: nn.Module, path: str | Path, processor=None) -> PrunedVLM:
    """A `PrunedVLM` serving `model` with a released pruner (a directory or hub id): the head, the plan it was
    trained for, and the LoRA adapters of the language model when the pruner has `adapter/` (domain fine-tuned
    pruners). `processor`: the one the inputs are made with (see `PrunedVLM`; needed with `image_sizes`)."""
    head = PrunerHead.from_pretrained(path)
    adapter_dir = head.directory / "adapter"  # the downloaded snapshot for a hub id, not the id itself
    if adapter_dir.is_dir():
        load_lora(model, adapter_dir)
    return PrunedVLM(model, trained_plan(head), processor=processor)
