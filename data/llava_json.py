"""LLaVA conversation JSON (the `llava_v1_5_mix665k.json` format) over an image folder.

Real instruction-tuning dumps contain broken records (missing files, truncated downloads, empty answers, text-only
samples). One bad record must not end a multi-hour run, so every problem is a counted skip, never an exception:
cheap checks run once at construction; decoding the image is deferred to `__getitem__`, which returns None for an
unreadable file (the collator drops Nones and reports how many in the batch).

A record's `image` is one path or a list of paths (multi-image records, as in LLaVA-NeXT-Interleave /
LLaVA-OneVision dumps): the i-th `<image>` of the conversation, in reading order, is the i-th image. Each `<image>`
becomes an `{"type": "image"}` item of the chat message, so the processor's own chat template renders it as its
image placeholder (`<image>` for LLaVA, `<|vision_start|><|image_pad|><|vision_end|>` for Qwen2-VL / Qwen2.5-VL /
Qwen3-VL), and the processor expands that to the image's tokens. Video records are not read.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

IMAGE_PLACEHOLDER = "<image>"

# Counter keys, in the order `summary()` lists them.
SKIP_KINDS = (
    "malformed",
    "text_only",
    "no_image_token",
    "extra_image_token",
    "empty_answer",
    "missing_image",
    "too_long",
    "unreadable_image",
)

_ROLES = {"human": "user", "gpt": "assistant"}


def load_records(json_path: str | os.PathLike) -> list:
    """Read a JSON list of records; a missing file or a non-list document is a user error (ValueError)."""
    path = os.fspath(json_path)
    if not os.path.isfile(path):
        raise ValueError(f"LLaVA JSON file not found: {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path!r} is not valid JSON: {err}") from err
    if not isinstance(records, list):
        raise ValueError(f"{path!r} must hold a JSON list of records, got {type(records).__name__}")
    return records


def _user_content(text: str) -> list[dict]:
    """Split a human turn at its `<image>`s so each image item sits where its placeholder was."""
    if IMAGE_PLACEHOLDER not in text:
        return [{"type": "text", "text": text.strip()}]
    content: list[dict] = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if part.strip():
            content.append({"type": "text", "text": part.strip()})
    return content


def record_to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA `conversations` (already validated) -> chat messages in the processor's format."""
    messages = []
    for turn in conversations:
        role = _ROLES[turn["from"]]
        if role == "user":
            messages.append({"role": "user", "content": _user_content(turn["value"])})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"].strip()}]})
    return messages


def record_images(record: dict) -> list[str] | None:
    """The record's image paths (one or a list), or None when `image` is neither a non-empty path nor a non-empty
    list of them."""
    image = record.get("image")
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        return None
    return paths


def check_record(record: Any, image_root: str) -> tuple[str | None, list[str] | None]:
    """(skip kind or None, absolute image paths or None). Touches the file system only with `os.path.isfile`.

    The first human turn must show an image; `<image>` placeholders (human turns only) must match the images one
    to one: fewer is `no_image_token`, more (or one in an answer) is `extra_image_token`."""
    if not isinstance(record, dict):
        return "malformed", None
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "malformed", None
    # Pairs of human,gpt: a trailing question without an answer has nothing to train on.
    if len(conv) % 2:
        return "malformed", None
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return "malformed", None
        if turn.get("from") != ("human" if i % 2 == 0 else "gpt"):
            return "malformed", None
    if "image" not in record:
        # Text-only samples are legitimate in LLaVA mixes; counted apart so they are not mistaken for corruption.
        return "text_only", None
    images = record_images(record)
    if images is None:
        return "malformed", None
    if IMAGE_PLACEHOLDER not in conv[0]["value"]:
        return "no_image_token", None
    # A placeholder beyond the images would ask the processor for an image that does not exist; an image without
    # its placeholder would have no place in the text.
    placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conv[0::2])
    if placeholders > len(images) or any(IMAGE_PLACEHOLDER in turn["value"] for turn in conv[1::2]):
        return "extra_image_token", None
    if placeholders < len(images):
        return "no_image_token", None
    if any(not turn["value"].strip() for turn in conv[1::2]):
        return "empty_answer", None
    paths = [os.path.join(image_root, p) for p in images]
    if not all(os.path.isfile(p) for p in paths):
        return "missing_image", None
    return None, paths


def format_skips(counter: Counter, total: int) -> str:
    skipped = sum(counter.values())
    if not skipped:
        return f"skipped 0 of {total} records"
    known = [k for k in SKIP_KINDS if counter.get(k)]
    other = sorted(k for k in counter if k not in SKIP_KINDS and counter[k])
    parts = ", ".join(f"{k}={counter[k]}" for k in known + other)
    return f"skipped {skipped} of {total} records: {parts}"


class LlavaJsonDataset(Dataset):
    """Items: {"images": [PIL RGB image, ...], "image_sizes": [(height, width), ...] (original sizes, in the
    order of the conversation's `<image>`s), "messages": chat messages, "id": record id}; a one-image record also
    has "image" and "image_size" (that image and its size).

    `max_length` (optional) drops records whose text alone, with each image placeholder unexpanded, already
    exceeds it; the collator's exact check after image-token expansion trims or drops what this lower bound lets
    through.
    """

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike, processor=None,
                 max_length: int | None = None):
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        self.json_path = os.fspath(json_path)
        self.image_root = os.fspath(image_root)
        if not os.path.isdir(self.image_root):
            raise ValueError(f"image_root is not a directory: {self.image_root!r}")
        self.processor = processor
        self.max_length = max_length
        self.skipped: Counter = Counter()

        records = load_records(self.json_path)
        self.total = len(records)
        self._items: list[tuple[Any, list[str], list[dict]]] = []
        for record in records:
            kind, paths = check_record(record, self.image_root)
            if kind is not None:
                self.skipped[kind] += 1
                continue
            self._items.append((record.get("id"), paths, record_to_messages(record["conversations"])))
        if max_length is not None and processor is not None and self._items:
            self._drop_too_long(max_length)
        # Snapshot for reporting: runtime counts may happen in DataLoader workers, whose counters are lost.
        self.init_skipped = Counter(self.skipped)

    def _drop_too_long(self, max_length: int) -> None:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        texts = [self.processor.apply_chat_template(m, tokenize=False) for _, _, m in self._items]
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        kept = []
        for item, n in zip(self._items, lengths):
            if n > max_length:
                self.skipped["too_long"] += 1
            else:
                kept.append(item)
        self._items = kept

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict | None:
        record_id, paths, messages = self._items[index]
        images = []
        for path in paths:
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                # PIL reports truncated/garbage files through all of these depending on the codec.
                self.skipped["unreadable_image"] += 1
                return None
        item = {
            "id": record_id,
            "images": images,
            "image_sizes": [(im.height, im.width) for im in images],
            "messages": messages,
        }
        if len(images) == 1:
            item["image"], item["image_size"] = images[0], item["image_sizes"][0]
        return item

    def summary(self) -> str:
        return format_skips(self.skipped, self.total)
