"""Serving a released pruner: a learned head, the plan it was trained for, and its LoRA adapters, on a model.

This sits above both the engine (`modules.pruned_vlm`) and the learned head (`modules.head`), which do not import
each other: the engine takes any stage-1 selector, the head is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from modules.head import (
    ADAPTER_DIR,
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    PrunerHead,
    load_safetensors,
    pickled_files,
    read_json,
)
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.vlm import get_adapter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# what `push_pruner` uploads from a pruner directory (never pickles, never stray files)
PRUNER_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, f"{ADAPTER_DIR}/{ADAPTER_CONFIG}",
                f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"]


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

    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        pickled = pickled_files(adapter_dir)
        hint = (f"; it has pickled weights {pickled}, which learnprune will not unpickle" if pickled else "")
        raise ValueError(f"LoRA adapter directory {str(adapter_dir)!r} has no {ADAPTER_WEIGHTS}{hint}")
    if not config_file.is_file():
        raise ValueError(f"LoRA adapter directory {str(adapter_dir)!r} has no {ADAPTER_CONFIG}")
    raw = read_json(config_file)
    state = load_safetensors(weights_file)  # read (and checked) before the model is touched
    fields = LoraConfig.__dataclass_fields__
    config = LoraConfig(**{k: v for k, v in raw.items() if k in fields and fields[k].init})
    inject_adapter_in_model(config, model)
    missing = [k for k in state if k not in dict(model.named_parameters())]
    if missing:
        raise ValueError(f"{adapter_dir} holds LoRA weights this model has no place for, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False)


def load_pruned(model: nn.Module, path: str | Path, processor=None, **hub_kwargs: Any) -> PrunedVLM:
    """A `PrunedVLM` serving `model` with a released pruner (a directory or hub id): the head, the plan it was
    trained for, and the LoRA adapters of the language model when the pruner has `adapter/` (domain fine-tuned
    pruners). `processor`: the one the inputs are made with (see `PrunedVLM`; needed with `image_sizes`).
    `hub_kwargs` (revision, token, cache_dir, ...) go to `PrunerHead.from_pretrained` for a hub id.

    A head trained for another model is refused (ValueError naming both) before any adapter touches `model`."""
    head = PrunerHead.from_pretrained(path, **hub_kwargs)
    head.check_compatible(get_adapter(model, processor))
    adapter_dir = head.directory / ADAPTER_DIR  # the downloaded snapshot for a hub id, not the id itself
    if adapter_dir.is_dir():
        load_lora(model, adapter_dir)
    return PrunedVLM(model, trained_plan(head), processor=processor)


def push_pruner(directory: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload learnprune pruner", branch: str | None = None,
                create_pr: bool | None = None) -> Any:
    """Upload a pruner directory (head, card and `adapter/` when present) to the hub repo `repo_id`, creating it
    if needed; returns `HfApi.upload_folder`'s commit info. The directory is loaded first, so a broken pruner is
    a ValueError before anything is uploaded; a missing model card is written (`PrunerHead.generate_model_card`).
    Only the pruner's own files are uploaded (`PRUNER_FILES`), never pickled weights.

    `PrunerHead.push_to_hub` uploads a head object; this uploads the whole pruner, with its LoRA adapters."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    head = PrunerHead.from_pretrained(directory)  # validates config and weights; a directory, never a hub id
    adapter_dir = directory / ADAPTER_DIR
    if adapter_dir.is_dir():
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (adapter_dir / name).is_file():
                raise ValueError(f"LoRA adapter directory {str(adapter_dir)!r} has no {name}")
        load_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    if not (directory / CARD_NAME).exists():
        head.generate_model_card(lora=adapter_dir.is_dir()).save(directory / CARD_NAME)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=directory,
                             commit_message=commit_message, revision=branch, create_pr=create_pr,
                             allow_patterns=list(PRUNER_FILES))
