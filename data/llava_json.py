"""LLaVA conversation JSON (the `llava_v1_5_mix665k.json` format) over an image folder.

Real instruction-tuning dumps contain broken records (missing files, truncated downloads, empty answers, text-only
samples). One bad record must not end a multi-hour run, so every problem is a counted skip, never an exception:
cheap checks run once at construction; decoding the image is deferred to `__getitem__`, which returns None for an
unreadable file (the collator drops Nones and reports how many in the batch).
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
    """Split a human turn at its `<image>` so the image item sits where the placeholder was."""
    if IMAGE_PLACEHOLDER not in text:
        return [{"type": "text", "text": text.strip()}]
    before, after = text.split(IMAGE_PLACEHOLDER, 1)
    content: list[dict] = []
    if before.strip():
        content.append({"type": "text", "text": before.strip()})
    content.append({"type": "image"})
    if after.strip():
        content.append({"type": "text", "text": after.strip()})
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


def check_record(record: Any, image_root: str) -> tuple[str | None, str | None]:
    """(skip kind or None, absolute image path or None). Touches the file system only with `os.path.isfile`."""
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
    if not isinstance(record["image"], str) or not record["image"]:
        return "malformed", None
    if IMAGE_PLACEHOLDER not in conv[0]["value"]:
        return "no_image_token", None
    # One image per record: any further placeholder would ask the processor for an image that does not exist.
    if sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in conv) != 1:
        return "extra_image_token", None
    if any(not turn["value"].strip() for turn in conv[1::2]):
        return "empty_answer", None
    path = os.path.join(image_root, record["image"])
    if not os.path.isfile(path):
        return "missing_image", None
    return None, path


def format_skips(counter: Counter, total: int) -> str:
    skipped = sum(counter.values())
    if not skipped:
        return f"skipped 0 of {total} records"
    known = [k for k in SKIP_KINDS if counter.get(k)]
    other = sorted(k for k in counter if k not in SKIP_KINDS and counter[k])
    parts = ", ".join(f"{k}={counter[k]}" for k in known + other)
    return f"skipped {skipped} of {total} records: {parts}"


class LlavaJsonDataset(Dataset):
    """Items: {"image": PIL RGB image, "image_size": (height, width), "messages": chat messages, "id": record id}.

    `max_length` (optional) drops records whose text alone, with `<image>` counted as one token, already exceeds
    it; the collator's exact check after image-token expansion trims or drops what this lower bound lets through.
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
        self._items: list[tuple[Any, str, list[dict]]] = []
        for record in records:
            kind, path = check_record(record, self.image_root)
            if kind is not None:
                self.skipped[kind] += 1
                continue
            self._items.append((record.get("id"), path, record_to_messages(record["conversations"])))
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
        record_id, path, messages = self._items[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            # PIL reports truncated/garbage files through all of these depending on the codec.
            self.skipped["unreadable_image"] += 1
            return None
        return {
            "id": record_id,
            "image": image,
            "image_size": (image.height, image.width),
            "messages": messages,
        }

    def summary(self) -> str:
        return format_skips(self.skipped, self.total)
