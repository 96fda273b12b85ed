"""`load_processor`: AutoProcessor, except for Qwen-VL / LLaVA-OneVision processors whose video processor cannot be
built.

Qwen2-VL / Qwen2.5-VL / Qwen3-VL and LLaVA-OneVision processors carry a video processor, and their video processors
import torchvision, which learnprune does not depend on (it prunes images only). Without torchvision
`AutoProcessor.from_pretrained` of such a directory silently returns the bare tokenizer (no image processing at all)
or fails, and the images-only tiny processors of `data/tiny.py` (saved by `python -m data.tiny --family ...`, or
`tiny_llava_onevision_processor().save_pretrained`) name classes AutoProcessor does not know.
Both cases load here as the images-only processor class (`video_processor=None`); everything else goes through
AutoProcessor unchanged.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json")
_STOCK_QWEN = {"Qwen2VLProcessor": "qwen2_vl", "Qwen2_5_VLProcessor": "qwen2_5_vl", "Qwen3VLProcessor": "qwen3_vl"}


def _processor_class_name(name_or_path: str | Path, **kwargs) -> str | None:
    """The `processor_class` recorded in a processor directory or hub repo, or None."""
    for filename in _CONFIG_FILES:
        path = Path(name_or_path) / filename
        if not path.is_file():
            if Path(name_or_path).is_dir():
                continue
            from transformers.utils import cached_file

            resolved = cached_file(str(name_or_path), filename, _raise_exceptions_for_missing_entries=False,
                                   _raise_exceptions_for_connection_errors=False, **kwargs)
            if resolved is None:
                continue
            path = Path(resolved)
        name = json.loads(path.read_text()).get("processor_class")
        if name:
            return name
    return None


def images_only_processor_class(class_name: str | None):
    """The images-only processor class to load `class_name` with, or None when AutoProcessor can load it."""
    from data.tiny import _QWEN_PROCESSORS, TinyLlavaOnevisionProcessor

    by_name = {cls.__name__: cls for cls in (*_QWEN_PROCESSORS.values(), TinyLlavaOnevisionProcessor)}
    if class_name in by_name:
        return by_name[class_name]
    if importlib.util.find_spec("torchvision") is None:
        if class_name in _STOCK_QWEN:
            return _QWEN_PROCESSORS[_STOCK_QWEN[class_name]]
        if class_name == "LlavaOnevisionProcessor":
            return TinyLlavaOnevisionProcessor
    return None


def load_processor(name_or_path: str | Path, **kwargs):
    """`AutoProcessor.from_pretrained(name_or_path)`, or the images-only Qwen-VL processor (see the module doc)."""
    cls = images_only_processor_class(_processor_class_name(name_or_path))
    if cls is not None:
        return cls.from_pretrained(name_or_path, **kwargs)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name_or_path, **kwargs)
