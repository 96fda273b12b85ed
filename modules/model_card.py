"""The model card (`README.md`) of a pruner directory, built with huggingface_hub's `ModelCard` / `ModelCardData`.

The YAML metadata carries what the Hub indexes (`base_model` when it is a hub id, `library_name: learnprune`,
tags) plus a `learnprune` block with the budgets, the stage-2 scorer and the measured retention; the body says the
same in prose and tables. This module reads plain mappings (a pruner_config.json dict, a metrics dict) and imports
nothing from learnprune, so the head, the exporter and the serving side can all use it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

LIBRARY_NAME = "learnprune"
DEFAULT_TAGS = ("learnprune", "visual-token-pruning", "token-pruning", "vision-language-model")
# metric names as `modules.metrics.distill_metrics` logs them (optionally prefixed "test/" or "val/")
RETENTION_METRICS = ("accuracy", "teacher_accuracy", "retention", "kept_ratio")
SPLITS = ("", "test/", "val/")


def is_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a hub model id ("org/name" or "name") rather than a local path: the Hub rejects
    cards whose `base_model` is not a model id."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def retention(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """`accuracy` (pruned), `teacher_accuracy` (unpruned), `retention` (their ratio, unless given) and
    `kept_ratio` from `metrics`, keyed plainly or with a split prefix (plain, then "test/", then "val/" wins).
    Values may be numbers or 0-d tensors; others are a ValueError naming the key."""
    out: dict[str, float] = {}
    for name in RETENTION_METRICS:
        for split in SPLITS:
            key = split + name
            if metrics and metrics.get(key) is not None:
                out[name] = _number(key, metrics[key])
                break
    if "retention" not in out and "accuracy" in out and out.get("teacher_accuracy"):
        out["retention"] = round(out["accuracy"] / out["teacher_accuracy"], 6)
    return out


def other_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric metrics besides those `retention` reads (kl, teacher_agreement, ...), as given."""
    used = {split + name for name in RETENTION_METRICS for split in SPLITS}
    return {k: _number(k, v) for k, v in (metrics or {}).items() if k not in used and v is not None}


def _number(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"metric {key!r}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"metric {key!r}={value!r} is not a finite number")
    return number


def describe_budget(n: int | float | None, num_tokens: int | None) -> str:
    if n is None:
        return "-"
    if isinstance(n, float) and 0 < n <= 1:
        of = f" (~{round(n * num_tokens)} of {num_tokens} at training)" if num_tokens else ""
        return f"{n:g} of the visual tokens{of}"
    of = f" of {num_tokens}" if num_tokens else ""
    return f"{n} tokens{of}"


def describe_scorer(stage2: Mapping[str, Any] | str | None) -> str:
    if stage2 is None:
        return "none"
    if isinstance(stage2, str):
        return f"`{stage2}`"
    params = {k: v for k, v in stage2.items() if k != "name"}
    return f"`{stage2.get('name', '?')}`" + (f" with `{json.dumps(params, sort_keys=True)}`" if params else "")


def pruner_model_card(config: Mapping[str, Any], *, metrics: Mapping[str, Any] | None = None,
                      training_data: str | None = None, lora: bool = False, tags: Iterable[str] = DEFAULT_TAGS,
                      library_name: str = LIBRARY_NAME) -> ModelCard:
    """The card of a pruner whose pruner_config.json mapping is `config`.

    metrics: measured on held-out data, e.g. `DistillPruner`'s test metrics: accuracy, teacher_accuracy (their
        ratio is the retention) and kept_ratio; further numeric entries are listed as given.
    training_data: what the head was trained on (e.g. the data config's train path).
    lora: the pruner has `adapter/` (LoRA adapters of the language model)."""
    base_model = config.get("base_model")
    model_type = config.get("model_type")
    num_tokens = config.get("num_tokens")
    kept = retention(metrics)
    extra = other_metrics(metrics)
    record = {
        "format_version": config.get("format_version"),
        "model_type": model_type,
        "n1": config.get("n1"),
        "n2": config.get("n2"),
        "layer": config.get("layer"),
        "stage2": config.get("stage2"),
        "question_aware": bool(config.get("question")),
        "lora_adapter": lora,
    }
    if training_data:
        record["training_data"] = training_data
    if kept or extra:
        record["metrics"] = {**kept, **extra}
    data = ModelCardData(base_model=base_model if is_hub_id(base_model) else None, library_name=library_name,
                         tags=sorted(set(tags)), learnprune=record)

    target = f"`{base_model}`" if base_model else "an unrecorded base model"
    kind = "question-aware " if config.get("question") else ""
    lines = [
        f"# Visual-token pruner for {base_model or model_type or 'a vision-language model'}",
        "",
        f"A learned {kind}stage-1 visual-token pruning head (learnprune) for {target}"
        + (f" (model type `{model_type}`)" if model_type else "")
        + ". It ranks the visual tokens after the vision encoder and keeps the top n1; optionally a stage-2 scorer "
        "keeps n2 of those in decoder layer K."
        + (" The pruner also carries LoRA adapters of the language model (`adapter/`, peft format)." if lora else ""),
        "",
        "## Budgets (as trained)",
        "",
        "| | value |",
        "|---|---|",
        f"| base model | {'`' + base_model + '`' if base_model else 'unknown'} |",
        f"| stage 1 (learned head, `{config.get('features', 'pre')}`-projector features): n1 | "
        f"{describe_budget(config.get('n1'), num_tokens)} |",
        f"| stage 2: n2 | {describe_budget(config.get('n2'), None)} |",
        f"| stage 2: layer K | {config.get('layer') if config.get('layer') is not None else '-'} |",
        f"| stage 2: scorer | {describe_scorer(config.get('stage2'))} |",
        "",
        "## Training data",
        "",
        training_data if training_data else "Not recorded.",
        "",
    ]
    if kept or extra:
        lines += ["## Measured retention", "", "| metric | value |", "|---|---|"]
        labels = {"accuracy": "accuracy (pruned)", "teacher_accuracy": "accuracy (teacher, unpruned)",
                  "retention": "retention (pruned / teacher accuracy)",
                  "kept_ratio": "kept ratio (visual tokens kept, FLOPs-equivalent)"}
        for name, label in labels.items():
            if name in kept:
                shown = f"{kept[name]:.4f}" + (f" ({kept[name]:.1%})" if name in ("retention", "kept_ratio") else "")
                lines.append(f"| {label} | {shown} |")
        lines += [f"| {k} | {v:.4g} |" for k, v in sorted(extra.items())]
        lines.append("")
    lines += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "from modules.serve import load_pruned",
        "",
        f'model = AutoModelForImageTextToText.from_pretrained("{base_model or "BASE_MODEL"}")',
        f'processor = AutoProcessor.from_pretrained("{base_model or "BASE_MODEL"}")',
        'pruned = load_pruned(model, "THIS_REPO_ID_OR_DIRECTORY", processor=processor)',
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
