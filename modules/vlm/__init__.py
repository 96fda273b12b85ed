"""Model-family adapters. The only place in learnprune with model-specific code."""

from __future__ import annotations

from torch import nn

from modules.vlm.base import Spliced, VisionTokens, VLMAdapter
from modules.vlm.llava import LlavaAdapter
from modules.vlm.llava_next import AnyResAdapter
from modules.vlm.qwen import QwenVLAdapter

ADAPTERS: dict[str, type[VLMAdapter]] = {}


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


register_adapter(LlavaAdapter)
register_adapter(QwenVLAdapter)
register_adapter(AnyResAdapter)


def get_adapter(model: nn.Module, processor=None) -> VLMAdapter:
    """The adapter for a transformers VLM, chosen by `model.config.model_type`; `processor` is the one the inputs
    are made with (it tells which visual tokens show padding)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no learnprune adapter for model_type {model_type!r}; supported: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[model_type](model, processor)


__all__ = ["ADAPTERS", "Spliced", "VLMAdapter", "VisionTokens", "get_adapter", "register_adapter"]
