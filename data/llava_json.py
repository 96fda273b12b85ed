"""LLaVA conversation JSON (the `llava_v1_5_mix665k.json` format) or JSON Lines over an image folder.

Real instruction-tuning dumps contain broken records (missing files, truncated downloads, empty answers, text-only
samples, a line cut short by a crashed writer). One bad record must not end a multi-hour run, so every problem of a
single record or image is a skip counted by kind, never an exception: cheap checks run once at construction;
decoding the image is deferred to `__getitem__`, which returns None for an image it cannot use (the collator drops
Nones and reports how many in the batch, by kind when it is given the dataset). Every skip also has a message
naming the file, the record (index or JSONL line, and id) and the field or image at fault: the first few of each
kind are kept in `skip_examples` and logged.

Problems that make the whole file unusable (not UTF-8, not JSON, not a list of records, empty, a JSON Lines file
none of whose lines is JSON) raise ValueError naming the file and the position (line/column, byte).

Files: `*.jsonl` / `*.ndjson` are JSON Lines (one record per line; blank lines are ignored; a line that is not
UTF-8 or not JSON is a `bad_json_line` skip and the other lines load), anything else is one JSON list. A leading
UTF-8 byte-order mark is accepted. Raw control characters inside JSON strings are accepted, and control characters
(C0 and C1, except tab and newline; CR and CRLF become newline) are removed from the text, so the model never sees
them; an answer that was only control characters is an `empty_answer`.

Images: the EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), so the model sees the picture upright
(sizes are the upright sizes); 16-bit grayscale (PIL mode I;16) is scaled to 8 bits (PIL's own conversion clips
it to white); images with transparency (RGBA, LA, palette with tRNS) are composited over white; CMYK, grayscale
and palette images are converted to RGB. An image whose header declares more than `max_image_pixels` pixels is
an `image_too_large` skip decided from the header alone, before any pixel is decoded (decompression bombs;
independent of PIL's global `Image.MAX_IMAGE_PIXELS`, which training code often disables).

A record's `image` is one path or a list of paths (multi-image records, as in LLaVA-NeXT-Interleave /
LLaVA-OneVision dumps): the i-th `<image>` of the conversation, in reading order, is the i-th image. Each `<image>`
becomes an `{"type": "image"}` item of the chat message, so the processor's own chat template renders it as its
image placeholder (`<image>` for LLaVA, `<|vision_start|><|image_pad|><|vision_end|>` for Qwen2-VL / Qwen2.5-VL /
Qwen3-VL), and the processor expands that to the image's tokens. Video records are not read.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
import stat
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

IMAGE_PLACEHOLDER = "<image>"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Decompression-bomb guard: 8192 x 8192. PIL's own guard (Image.MAX_IMAGE_PIXELS, 89.5 M, an error only above
# twice that) is a process-wide setting that LLaVA-style training code commonly sets to None.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
MAX_EXAMPLES = 5  # skip messages kept (and logged) per kind

# Counter keys, in the order `summary()` lists them.
SKIP_KINDS = (
    "malformed",  # a record of the wrong shape or types (not an object, conversations not a list, ...)
    "bad_json_line",  # JSON Lines: a line that is not UTF-8 or not JSON
    "text_only",
    "no_image_token",  # fewer `<image>` than images (or none in the first question)
    "extra_image_token",  # more `<image>` than images, or one in an answer
    "no_answer",  # the last question has no answer
    "empty_answer",
    "missing_image",
    "too_long",
    "unreadable_image",  # empty file, truncated, not an image, undecodable
    "image_too_large",  # decompression-bomb guard (max_image_pixels)
    "rejected_by_processor",  # the processor raised for this item alone (collator)
)

_ROLES = {"human": "user", "gpt": "assistant"}
# C0 controls except tab and newline (CR is normalised to newline first), DEL and the C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BadLine:
    """Stands in for a JSON Lines line that could not be read as JSON (a `bad_json_line` skip)."""

    line: int
    reason: str


class ImageSkip(Exception):
    """An image the dataset cannot use: `kind` is its skip kind, the message names the file."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def clean_text(text: str) -> str:
    """`text` with CR / CRLF as newline and every other control character (C0, DEL, C1; tab and newline stay)
    removed."""
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind_of(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _utf8_error(path: str, raw: bytes, err: UnicodeDecodeError, offset: int = 0) -> str:
    at = err.start
    line = raw.count(b"\n", 0, at) + 1
    column = at - (raw.rfind(b"\n", 0, at) + 1) + 1
    return (f"byte {at + offset} (line {line}, column {column}) is 0x{raw[at]:02x}, not UTF-8 ({err.reason}); "
            "re-encode the file as UTF-8")


def _parse_json(text: str) -> Any:
    """json.loads that accepts raw control characters inside strings; every failure is a ValueError (a
    JSONDecodeError with a position when the syntax is wrong)."""
    try:
        return json.loads(text, strict=False)
    except RecursionError:
        raise ValueError("nesting too deep") from None


def _json_error(err: ValueError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno} column {err.colno} (char {err.pos})"
    return str(err)


def read_records(json_path: str | os.PathLike) -> tuple[list, list[int] | None]:
    """(records, their line numbers for JSON Lines else None) of a JSON list file or a JSON Lines file
    (`*.jsonl`, `*.ndjson`). A JSON Lines line that is not UTF-8 or not JSON becomes a `BadLine` (a counted skip);
    a file that cannot be used at all is a ValueError naming it and the position."""
    path = os.fspath(json_path)
    if not os.path.isfile(path):
        raise ValueError(f"LLaVA JSON file not found: {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    raw = raw[bom:]
    jsonl = path.lower().endswith(JSONL_SUFFIXES)
    if not raw.strip():
        expected = "JSON Lines records (one JSON object per line)" if jsonl else "a JSON list of records"
        raise ValueError(f"{path!r} is empty ({len(raw) + bom} bytes): expected {expected}")
    if jsonl:
        return _read_jsonl(path, raw, bom)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path!r} is not valid JSON text: {_utf8_error(path, raw, err, bom)}") from None
    try:
        records = _parse_json(text)
    except ValueError as err:
        hint = ""
        if isinstance(err, json.JSONDecodeError) and err.msg == "Extra data":
            hint = " (one JSON record per line? name the file *.jsonl)"
        raise ValueError(f"{path!r} is not valid JSON: {_json_error(err)}{hint}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path!r} must hold a JSON list of records, got {_kind_of(records)} at its top level "
                         f"(line 1 column 1): {_short(records)}")
    return records, None


def _read_jsonl(path: str, raw: bytes, bom: int) -> tuple[list, list[int]]:
    records, lines, first_error = [], [], None
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = _parse_json(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            record = BadLine(number, f"byte {err.start + 1} of the line is 0x{line[err.start]:02x}, not UTF-8 "
                                     f"({err.reason})")
        except ValueError as err:
            reason = _json_error(err).replace(" at line 1 column", " at column")
            record = BadLine(number, f"not JSON: {reason}")
        if isinstance(record, BadLine) and first_error is None:
            first_error = record
        records.append(record)
        lines.append(number)
    if first_error is not None and all(isinstance(r, BadLine) for r in records):
        hint = " (a JSON list? name the file *.json)" if raw.lstrip()[:1] == b"[" else ""
        raise ValueError(f"{path!r} is not JSON Lines: none of its {len(records)} non-blank lines is JSON; line "
                         f"{first_error.line}: {first_error.reason}{hint}")
    return records, lines


def load_records(json_path: str | os.PathLike) -> list:
    """The records of a JSON list or JSON Lines file (see `read_records`); a missing file, a file that is not
    JSON, or a non-list document is a user error (ValueError naming the file and the position)."""
    return read_records(json_path)[0]


def _user_content(text: str) -> list[dict]:
    """Split a human turn at its `<image>`s so each image item sits where its placeholder was."""
    text = clean_text(text)
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
    """LLaVA `conversations` (already validated) -> chat messages in the processor's format (control characters
    removed, see `clean_text`)."""
    messages = []
    for turn in conversations:
        role = _ROLES[turn["from"]]
        if role == "user":
            messages.append({"role": "user", "content": _user_content(turn["value"])})
        else:
            messages.append({"role": "assistant",
                             "content": [{"type": "text", "text": clean_text(turn["value"]).strip()}]})
    return messages


def record_images(record: dict) -> list[str] | None:
    """The record's image paths (one or a list), or None when `image` is neither a non-empty path nor a non-empty
    list of them."""
    image = record.get("image")
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        return None
    return paths


def _check_conversations(record: dict) -> tuple[str, str] | None:
    conv = record.get("conversations")
    if "conversations" not in record:
        return "malformed", "no 'conversations' field"
    if not isinstance(conv, list):
        return "malformed", f"'conversations' is {_kind_of(conv)} ({_short(conv)}), expected a list of turns"
    if not conv:
        return "malformed", "'conversations' is an empty list"
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            return "malformed", f"conversations[{i}] is {_kind_of(turn)} ({_short(turn)}), expected an object"
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            return "malformed", (f"conversations[{i}]['from'] is {_short(turn.get('from'))}, expected "
                                 f"{expected!r} (turns alternate human, gpt)")
        if not isinstance(turn.get("value"), str):
            return "malformed", (f"conversations[{i}]['value'] is {_kind_of(turn.get('value'))} "
                                 f"({_short(turn.get('value'))}), expected a string")
    # Pairs of human,gpt: a trailing question without an answer has nothing to train on.
    if len(conv) % 2:
        return "no_answer", f"the last question, conversations[{len(conv) - 1}], has no answer"
    return None


def diagnose_record(record: Any, image_root: str) -> tuple[str | None, list[str] | None, str]:
    """(skip kind or None, absolute image paths or None, what is wrong: names the field or file). Touches the file
    system only with `os.stat`.

    The first human turn must show an image; `<image>` placeholders (human turns only) must match the images one
    to one: fewer is `no_image_token`, more (or one in an answer) is `extra_image_token`."""
    if isinstance(record, BadLine):
        return "bad_json_line", None, record.reason
    if not isinstance(record, dict):
        return "malformed", None, f"a record must be a JSON object, got {_kind_of(record)} ({_short(record)})"
    problem = _check_conversations(record)
    if problem is not None:
        return problem[0], None, problem[1]
    if "image" not in record:
        # Text-only samples are legitimate in LLaVA mixes; counted apart so they are not mistaken for corruption.
        return "text_only", None, "no 'image' field (a text-only record)"
    images = record_images(record)
    if images is None:
        return "malformed", None, (f"'image' is {_kind_of(record['image'])} ({_short(record['image'])}), expected "
                                   "a path or a non-empty list of paths")
    values = [clean_text(turn["value"]) for turn in record["conversations"]]
    n = len(images)
    if IMAGE_PLACEHOLDER not in values[0]:
        return "no_image_token", None, (f"the first question (conversations[0]) has no {IMAGE_PLACEHOLDER} but "
                                        f"the record has {n} image(s) {_short(images)}")
    # A placeholder beyond the images would ask the processor for an image that does not exist; an image without
    # its placeholder would have no place in the text.
    placeholders = sum(v.count(IMAGE_PLACEHOLDER) for v in values[0::2])
    for i in range(1, len(values), 2):
        if IMAGE_PLACEHOLDER in values[i]:
            return "extra_image_token", None, f"the answer conversations[{i}] contains {IMAGE_PLACEHOLDER}"
    if placeholders > n:
        return "extra_image_token", None, (f"{placeholders} {IMAGE_PLACEHOLDER} in the questions for {n} image(s) "
                                           f"{_short(images)}")
    if placeholders < n:
        return "no_image_token", None, (f"{placeholders} {IMAGE_PLACEHOLDER} in the questions for {n} images "
                                        f"{_short(images)}")
    for i in range(1, len(values), 2):
        if not values[i].strip():
            raw = record["conversations"][i]["value"]
            return "empty_answer", None, (f"the answer conversations[{i}] is {_short(raw)}: nothing but whitespace "
                                          "or control characters")
    paths = []
    for image in images:
        path = os.path.join(image_root, image)
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # ValueError: a NUL byte in the path
            return "missing_image", None, f"image {_short(image)} not found (looked for {_short(path, 200)})"
        if not stat.S_ISREG(st.st_mode):
            return "missing_image", None, f"image {path!r} is not a file"
        if st.st_size == 0:
            return "unreadable_image", None, f"image {path!r} is empty (0 bytes)"
        paths.append(path)
    return None, paths, ""


def check_record(record: Any, image_root: str) -> tuple[str | None, list[str] | None]:
    """(skip kind or None, absolute image paths or None): `diagnose_record` without the message."""
    kind, paths, _ = diagnose_record(record, image_root)
    return kind, paths


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of `image`: 16-bit grayscale (mode I;16, or I holding values above 255, as older Pillow opens
    16-bit PNGs) scaled to 8 bits, round(v / 257) (PIL's own conversion clips it to 255), transparency composited
    over white, every other mode through PIL's conversion."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if mode != "I" or values.max(initial=0) > 255:
            values = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at `path` as the model should see it: upright (EXIF orientation applied) and RGB (`to_rgb`).
    Raises `ImageSkip` (kind `image_too_large` from the header alone, before decoding; `missing_image`;
    `unreadable_image`) with a message naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageSkip("image_too_large", (
                        f"image {path!r} declares {width}x{height} = {width * height:,} pixels, above "
                        f"max_image_pixels={max_pixels:,} (decompression-bomb guard): not decoded"))
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except ImageSkip:
        raise
    except Image.DecompressionBombError as err:
        raise ImageSkip("image_too_large", f"image {path!r}: {err}") from None
    except FileNotFoundError:
        raise ImageSkip("missing_image", f"image {path!r} disappeared after the dataset was built") from None
    except MemoryError:
        raise
    except Exception as err:  # PIL reports truncated/garbage files through many exception types, by codec
        raise ImageSkip("unreadable_image", f"image {path!r} cannot be decoded: {type(err).__name__}: {err}"
                        ) from None


def format_skips(counter: Counter, total: int) -> str:
    skipped = sum(counter.values())
    if not skipped:
        return f"skipped 0 of {total} records"
    known = [k for k in SKIP_KINDS if counter.get(k)]
    other = sorted(k for k in counter if k not in SKIP_KINDS and counter[k])
    parts = ", ".join(f"{k}={counter[k]}" for k in known + other)
    return f"skipped {skipped} of {total} records: {parts}"


class LlavaJsonDataset(Dataset):
    """Items: {"images": [PIL RGB image, ...], "image_sizes": [(height, width), ...] (original upright sizes, in
    the order of the conversation's `<image>`s), "image_paths": [path, ...], "source": where the record is (file and
    index or line, for messages), "messages": chat messages, "id": record id}; a one-image record also has "image"
    and "image_size" (that image and its size). An item whose image cannot be used is None (its skip is counted in
    `skipped` and queued for `take_load_skips`).

    `max_length` (optional) drops records whose text alone, with each image placeholder unexpanded, already
    exceeds it; the collator's exact check after image-token expansion trims or drops what this lower bound lets
    through. `max_image_pixels` (None: no limit) is the decompression-bomb guard.

    `skipped` counts skips by kind (load-time ones only in the process that decoded: DataLoader workers keep
    theirs), `init_skipped` is the construction-time snapshot; `skip_examples` holds the first messages of each
    kind (`init_examples`: those of construction).
    """

    def __init__(self, json_path: str | os.PathLike, image_root: str | os.PathLike, processor=None,
                 max_length: int | None = None, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        limit = max_image_pixels
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ValueError(f"max_image_pixels must be a positive int or None, got {max_image_pixels!r}")
        self.json_path = os.fspath(json_path)
        self.image_root = os.fspath(image_root)
        if not os.path.isdir(self.image_root):
            raise ValueError(f"image_root is not a directory: {self.image_root!r}")
        self.processor = processor
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self.skipped: Counter = Counter()
        self.skip_examples: dict[str, list[str]] = {}
        # load-time skips (kind, message) not yet reported by a collator; bounded in case none drains them
        self._load_skips: deque[tuple[str, str]] = deque(maxlen=4096)

        records, self._lines = read_records(self.json_path)
        self.total = len(records)
        self._items: list[tuple[Any, list[str], list[dict], int]] = []
        for index, record in enumerate(records):
            kind, paths, detail = diagnose_record(record, self.image_root)
            if kind is not None:
                self._skip(kind, f"{self.where(index, record)}: {detail}")
                continue
            self._items.append((record.get("id"), paths, record_to_messages(record["conversations"]), index))
        if max_length is not None and processor is not None and self._items:
            self._drop_too_long(max_length)
        # Snapshot for reporting: runtime counts may happen in DataLoader workers, whose counters are lost.
        self.init_skipped = Counter(self.skipped)
        self.init_examples = {kind: list(messages) for kind, messages in self.skip_examples.items()}
        if any(kind != "text_only" for kind in self.skipped):
            examples = "; ".join(msgs[0] for kind, msgs in self.skip_examples.items() if kind != "text_only")
            log.warning("%s: %s; e.g. %s", self.json_path, self.summary(), examples)

    def where(self, index: int, record: Any = None) -> str:
        """Where record `index` is: the file and its index (JSON) or line (JSON Lines), and its id when known."""
        place = f"record {index}" if self._lines is None else f"line {self._lines[index]}"
        rid = record.get("id") if isinstance(record, dict) else None
        return f"{self.json_path} {place}" + (f" (id {_short(rid)})" if rid is not None else "")

    def _skip(self, kind: str, message: str, load_time: bool = False) -> None:
        self.skipped[kind] += 1
        examples = self.skip_examples.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(message)
        if load_time:
            self._load_skips.append((kind, message))

    def take_load_skips(self) -> list[tuple[str, str]]:
        """The (kind, message) of the load-time skips since the previous call (in this process), oldest first;
        the collator reports them with the batch whose items they were."""
        taken = list(self._load_skips)
        self._load_skips.clear()
        return taken

    def _drop_too_long(self, max_length: int) -> None:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        texts = [self.processor.apply_chat_template(item[2], tokenize=False) for item in self._items]
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        kept = []
        for item, n in zip(self._items, lengths):
            if n > max_length:
                rid = item[0]
                place = self.where(item[3], {"id": rid})
                self._skip("too_long", f"{place}: {n} text tokens before image expansion > max_length={max_length}")
            else:
                kept.append(item)
        self._items = kept

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict | None:
        record_id, paths, messages, position = self._items[index]
        images = []
        for path in paths:
            try:
                images.append(load_image(path, self.max_image_pixels))
            except ImageSkip as skip:
                self._skip(skip.kind, f"{self.where(position, {'id': record_id})}: {skip.detail}", load_time=True)
                return None
        item = {
            "id": record_id,
            "images": images,
            "image_sizes": [(im.height, im.width) for im in images],
            "image_paths": list(paths),
            "source": self.where(position, {"id": record_id}),
            "messages": messages,
        }
        if len(images) == 1:
            item["image"], item["image_size"] = images[0], item["image_sizes"][0]
        return item

    def summary(self) -> str:
        return format_skips(self.skipped, self.total)

    def skip_report(self) -> str:
        """`summary()` and, per kind, the first messages naming the offending record, field or file."""
        lines = [self.summary()]
        for kind in [k for k in SKIP_KINDS if k in self.skip_examples] + sorted(set(self.skip_examples) -
                                                                               set(SKIP_KINDS)):
            lines += [f"  {kind}: {msg}" for msg in self.skip_examples[kind]]
        return "\n".join(lines)
