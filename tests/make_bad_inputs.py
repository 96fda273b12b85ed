"""The bad-input corpus (`tests/bad_inputs/`): its generator, the runner that sends each case through the real data
path, and the summary table.

    python tests/make_bad_inputs.py                 # (re)write tests/bad_inputs/ (deterministic)
    python tests/make_bad_inputs.py --summary       # run every case, print the table (--out FILE: also write it;
                                                    # --detail: also one row per case)

`tests/bad_inputs/manifest.json` lists every case with its expected outcome:
  - "ValueError": the whole input is unusable; the message must name the file (or value) and contain `match`;
  - "skip:<kind>": the record is skipped and counted under <kind> (`count` times), at construction ("init") or
    when loading ("load"), with a message naming the record and `names`; the good records mixed in all arrive;
  - "ok": the input is accepted and handled correctly (pixels equal to `reference` within `tolerance`, cleaned
    `question`, answer labels `answer`), and arrives in a batch.
Groups: "image" (one record per image file under images/), "record" (the record is inline in the manifest),
"file" (a whole JSON / JSON Lines file under files/), "api" (a public-API call on a tiny model; inputs made at run
time, `API_CASES`).

Every record and image case is run as a training file of four good records with the bad one in the middle,
through `LlavaDataModule` (dataset + collator + skip accounting, as `python -m trainer fit` builds it) for one
epoch; "lost good records" counts good records that did not reach a batch.

PNG files are written byte by byte here (stored deflate blocks, no zlib-version dependence); JPEG files come from
Pillow's encoder (libjpeg), so they are byte-identical only under the same libjpeg (the manifest records it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import random
import struct
import sys
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
from PIL import Image, ImageFile, features

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "bad_inputs"
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

QUESTION = "<image>\nwhat is the color ?"
GOOD_RECORDS = [
    {"id": "good_0", "image": "good_0.png", "conversations": [
        {"from": "human", "value": QUESTION}, {"from": "gpt", "value": "red"}]},
    {"id": "good_1", "image": "good_1.png", "conversations": [
        {"from": "human", "value": "<image>\nhow many ?"}, {"from": "gpt", "value": "two"},
        {"from": "human", "value": "what shape is left ?"}, {"from": "gpt", "value": "a circle ."}]},
    {"id": "good_2", "image": "good_2.png", "conversations": [
        {"from": "human", "value": "describe this image . <image>"}, {"from": "gpt", "value": "a blue square"}]},
    {"id": "good_3", "image": ["good_0.png", "good_3.png"], "conversations": [
        {"from": "human", "value": "<image> <image> how many ?"}, {"from": "gpt", "value": "two"}]},
]
GOOD_IDS = [r["id"] for r in GOOD_RECORDS]
INSERT_AT = 2  # the bad record's index among the good ones


def _turns(*pairs):
    return [{"from": who, "value": value} for pair in pairs for who, value in zip(("human", "gpt"), pair)]


# ---------------------------------------------------------------------------------------------------------------
# byte-level writers (deterministic)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _stored_zlib(data: bytes, final: bool = True) -> bytes:
    """A zlib stream of stored (uncompressed) deflate blocks: the same bytes under any zlib."""
    out = bytearray(b"\x78\x01")
    blocks = [data[i:i + 65535] for i in range(0, len(data), 65535)] or [b""]
    for k, block in enumerate(blocks):
        last = final and k == len(blocks) - 1
        out += bytes([1 if last else 0]) + struct.pack("<HH", len(block), len(block) ^ 0xFFFF) + block
    if final:
        out += struct.pack(">I", zlib.adler32(data) & 0xFFFFFFFF)
    return bytes(out)


def png_bytes(width: int, height: int, raw_rows: bytes, bit_depth: int = 8, color_type: int = 2,
              chunks: tuple[tuple[bytes, bytes], ...] = (), idat: bytes | None = None) -> bytes:
    """A PNG file: IHDR, `chunks` (PLTE, tRNS, ...), one IDAT (filter byte 0 per row in `raw_rows`), IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    body = _chunk(b"IHDR", ihdr) + b"".join(_chunk(t, d) for t, d in chunks)
    body += _chunk(b"IDAT", _stored_zlib(raw_rows) if idat is None else idat)
    return b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IEND", b"")


def _rows(array: np.ndarray) -> bytes:
    """Unfiltered PNG scanlines of an (H, W[, C]) uint8 / big-endian uint16 array."""
    array = np.ascontiguousarray(array)
    flat = array.reshape(array.shape[0], -1)
    return b"".join(b"\x00" + row.tobytes() for row in flat)


def rgb_png(array: np.ndarray) -> bytes:
    return png_bytes(array.shape[1], array.shape[0], _rows(array.astype(np.uint8)), 8, 2)


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """A deterministic RGB pattern, asymmetric (orientation shows): gradients plus a dark top-left block."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(1, width - 1) + seed * 40) % 256
    g = (y * 255 // max(1, height - 1) + seed * 70) % 256
    b = ((x + y) * 4 + seed * 90) % 256
    out = np.stack([r, g, b], axis=-1).astype(np.uint8)
    out[: max(1, height // 4), : max(1, width // 4)] = (20, 20, 20)
    return out


def _blocky(width: int, height: int) -> np.ndarray:
    """8x8 flat colour blocks (what JPEG keeps best) with an asymmetric layout."""
    out = np.zeros((height, width, 3), dtype=np.uint8)
    rng = random.Random(7)
    for by in range(0, height, 8):
        for bx in range(0, width, 8):
            out[by:by + 8, bx:bx + 8] = (rng.randrange(40, 216), rng.randrange(40, 216), rng.randrange(40, 216))
    out[:8, :8] = (230, 30, 30)
    return out


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, subsampling=0, **kwargs)
    return buf.getvalue()


def jpeg_encoder() -> str:
    return f"libjpeg {features.version('jpg')}"


# ---------------------------------------------------------------------------------------------------------------
# the corpus


def _image_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for k, (w, h) in enumerate([(40, 20), (20, 30), (32, 32), (24, 40)]):
        files[f"images/good_{k}.png"] = rgb_png(_pattern(w, h, k))

    full = rgb_png(_pattern(32, 32, 5))
    files["images/truncated.png"] = full[: len(full) * 6 // 10]  # cut inside the IDAT chunk
    src = Image.fromarray(_pattern(32, 32, 6))
    jpg = _jpeg(src)
    files["images/truncated.jpg"] = jpg[: len(jpg) // 2]
    rng = random.Random(0)
    files["images/corrupt.png"] = b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(200))
    files["images/corrupt.jpg"] = b"\xff\xd8\xff\xe0" + bytes(rng.randrange(256) for _ in range(200))
    files["images/empty.png"] = b""

    files["images/pixel_1x1.png"] = rgb_png(np.array([[[200, 30, 90]]], dtype=np.uint8))

    # 16-bit grayscale (PIL mode I;16): the 8-bit view is round(v / 257); PIL's own RGB conversion clips to 255
    y, x = np.mgrid[0:16, 0:32]
    gray16 = ((x * 2047 + y * 100) % 65536).astype(">u2")
    files["images/gray16.png"] = png_bytes(32, 16, _rows(gray16), 16, 0)
    gray8 = ((gray16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    files["images/gray16_expected.png"] = rgb_png(np.repeat(gray8[..., None], 3, axis=-1))

    # CMYK JPEG (PIL's naive RGB<->CMYK; JPEG error bounded by `tolerance`)
    cmyk_src = _blocky(32, 24)
    files["images/cmyk.jpg"] = _jpeg(Image.fromarray(cmyk_src).convert("CMYK"))
    files["images/cmyk_expected.png"] = rgb_png(cmyk_src)

    # palette PNG with tRNS: index 3 (magenta) fully transparent, index 2 (blue) opaque -> transparent shows white
    palette = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 0, 255])
    indices = (np.add.outer(np.arange(16), np.arange(16)) % 4).astype(np.uint8)
    files["images/palette_trns.png"] = png_bytes(16, 16, _rows(indices), 8, 3,
                                                 chunks=((b"PLTE", palette), (b"tRNS", bytes([255, 255, 255, 0]))))
    colors = np.frombuffer(palette, dtype=np.uint8).reshape(4, 3).copy()
    colors[3] = (255, 255, 255)
    files["images/palette_trns_expected.png"] = rgb_png(colors[indices])

    # grayscale L, and LA with alpha 0 / 255 (a gray of 60 under alpha 0 must show as white, not 60)
    gray = ((x * 8 + y * 3) % 256).astype(np.uint8)
    files["images/gray_l.png"] = png_bytes(32, 16, _rows(gray), 8, 0)
    files["images/gray_l_expected.png"] = rgb_png(np.repeat(gray[..., None], 3, axis=-1))
    alpha = np.where((x // 4 + y // 4) % 2 == 0, 255, 0).astype(np.uint8)
    la_gray = np.where(alpha == 0, 60, gray).astype(np.uint8)
    files["images/gray_la.png"] = png_bytes(32, 16, _rows(np.stack([la_gray, alpha], axis=-1)), 8, 4)
    shown = np.where(alpha == 0, 255, la_gray).astype(np.uint8)
    files["images/gray_la_expected.png"] = rgb_png(np.repeat(shown[..., None], 3, axis=-1))

    # decompression bombs: headers declaring 30000x30000 (900 M pixels, above PIL's own limit) and 9000x9000
    # (81 M, below PIL's 89.5 M warning and above learnprune's 67 M default), with a few bytes of pixel data
    for side in (30000, 9000):
        files[f"images/bomb_{side}.png"] = png_bytes(side, side, b"", 1, 0, idat=_stored_zlib(b"\x00" * 64, False))

    # EXIF-rotated JPEGs: stored sideways, upright once orientation 6 / 8 is applied
    upright = _blocky(32, 16)
    files["images/upright.png"] = rgb_png(upright)
    for orientation, stored in ((6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files[f"images/exif_rot{orientation}.jpg"] = _jpeg(Image.fromarray(upright).transpose(stored),
                                                           exif=exif.tobytes())

    # extreme aspect ratio: LLaVA's processor resizes it, Qwen-VL's refuses it (aspect ratio above 200)
    files["images/wide_400x1.png"] = rgb_png(_pattern(400, 1, 8))
    files["images/small_64x64.png"] = rgb_png(_pattern(64, 64, 9))
    return files


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _jsonl_bytes(records: list) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)


def _non_utf8() -> bytes:
    """A JSON list whose answer "red" has a 0xff byte for its "e"."""
    return _json_bytes(GOOD_RECORDS[:2]).replace(b'"red"', b'"r\xffd"')


def _position(data: bytes, byte: int) -> str:
    at = data.index(bytes([byte]))
    line = data.count(b"\n", 0, at) + 1
    column = at - (data.rfind(b"\n", 0, at) + 1) + 1
    return f"byte {at} (line {line}, column {column}) is 0x{byte:02x}"


def _data_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    files["files/not_json.json"] = b"this is not JSON, it is a sentence.\n"
    good = _json_bytes(GOOD_RECORDS[:2]).decode()
    files["files/malformed.json"] = (
        b'[\n {"id": "a", "image": "good_0.png", "conversations": []},\n {"id": "b" "image": "good_1.png"}\n]\n'
    )
    files["files/truncated.json"] = good[: len(good) * 2 // 3].encode()
    files["files/top_level_object.json"] = _json_bytes({"id": "x", "image": "good_0.png", "conversations": []})
    files["files/non_utf8.json"] = _non_utf8()
    files["files/empty.json"] = b""
    files["files/jsonl_named_json.json"] = _jsonl_bytes(GOOD_RECORDS[:2])
    files["files/deep_nesting.json"] = b"[" * 5000 + b"]" * 5000
    files["files/bom.json"] = b"\xef\xbb\xbf" + _json_bytes(GOOD_RECORDS)
    # raw control characters inside JSON strings (invalid in strict JSON, common in dumps) and CRLF line ends
    raw = _json_bytes(GOOD_RECORDS[:2] + [{"id": "ctrl", "image": "good_2.png", "conversations": _turns(
        ("<image>\nwhat is the\x01 color ?\x1b", "r\x7fed"))}] + GOOD_RECORDS[2:]).decode()
    files["files/raw_control_chars.json"] = raw.replace("\\u0001", "\x01").replace("\\u001b", "\x1b").replace(
        "\n", "\r\n").encode("utf-8")

    lines = [json.dumps(r).encode() for r in GOOD_RECORDS]
    cut = json.dumps(GOOD_RECORDS[0]).encode()
    files["files/mixed_lines.jsonl"] = b"\n".join([
        lines[0],
        cut[: len(cut) // 2],  # a line cut short (a writer that crashed)
        lines[1],
        b"",  # blank lines are not records
        json.dumps({"id": "latin1", "image": "good_0.png", "conversations": _turns(
            ("<image> caf\u00e9 ?", "yes"))}).encode().replace(b"\\u00e9", b"\xe9"),  # Latin-1 byte, not UTF-8
        lines[2],
        b'{"id": "bigint", "n": ' + b"9" * 5000 + b"}",  # Python refuses ints of more than 4300 digits
        b"[" * 3000 + b"]" * 3000,  # deeper than the JSON parser's recursion limit
        lines[3],
        b"",
    ])
    rng = random.Random(1)
    files["files/all_bad.jsonl"] = b"\n".join(bytes(rng.choice([b for b in range(1, 256) if b != 10])
                                                    for _ in range(60)) for _ in range(5)) + b"\n"
    files["files/list_named_jsonl.jsonl"] = _json_bytes(GOOD_RECORDS[:2])
    return files


def _case(group, id_, what, expect, **kw):
    return {"group": group, "id": id_, "what": what, "expect": expect, **kw}


def image_case(id_, file, what, expect, **kw):
    return _case("image", id_, what, expect, image=file, **kw)


def record_case(id_, record, what, expect, **kw):
    return _case("record", id_, what, expect, record=record, **kw)


def file_case(id_, file, what, expect, **kw):
    return _case("file", id_, what, expect, file=file, **kw)


def api_case(id_, what, expect, **kw):
    return _case("api", id_, what, expect, **kw)


def _rec(id_, image="good_0.png", conversations=None, **extra):
    record = {"id": id_, "image": image, "conversations": conversations if conversations is not None else _turns(
        (QUESTION, "red"))}
    record.update(extra)
    return record


def cases() -> list[dict]:
    skip = "skip:"
    out = [
        # -- images ---------------------------------------------------------------------------------------------
        image_case("image_truncated_png", "truncated.png", "PNG cut inside its IDAT chunk",
                   skip + "unreadable_image", stage="load", names=["truncated.png", "truncated"]),
        image_case("image_truncated_jpg", "truncated.jpg", "JPEG cut in half",
                   skip + "unreadable_image", stage="load", names=["truncated.jpg", "truncated"]),
        image_case("image_corrupt_png", "corrupt.png", "PNG signature then random bytes",
                   skip + "unreadable_image", stage="load", names=["corrupt.png", "cannot be decoded"]),
        image_case("image_corrupt_jpg", "corrupt.jpg", "JPEG markers then random bytes",
                   skip + "unreadable_image", stage="load", names=["corrupt.jpg", "cannot be decoded"]),
        image_case("image_zero_bytes", "empty.png", "zero-byte file", skip + "unreadable_image", stage="init",
                   names=["empty.png", "0 bytes"]),
        image_case("image_missing", "not_there.png", "file does not exist", skip + "missing_image", stage="init",
                   names=["not_there.png", "not found"]),
        image_case("image_nul_in_path", "good_0.png\u0000.png", "path with a NUL byte (os.stat raises ValueError)",
                   skip + "missing_image", stage="init", names=["not found"]),
        image_case("image_multi_one_truncated", ["good_0.png", "truncated.png"],
                   "two-image record whose second image is truncated", skip + "unreadable_image", stage="load",
                   names=["truncated.png"], question="<image> <image> how many ?"),
        image_case("image_bomb_30000", "bomb_30000.png",
                   "PNG header declaring 30000x30000 (900 M pixels), a few bytes of data; run with PIL's own "
                   "guard disabled (Image.MAX_IMAGE_PIXELS = None) and decoding spied on",
                   skip + "image_too_large", stage="load", names=["bomb_30000.png", "30000x30000"],
                   pil_guard_off=True),
        image_case("image_bomb_9000", "bomb_9000.png",
                   "PNG header declaring 9000x9000 (81 M pixels: below PIL's limit, above max_image_pixels)",
                   skip + "image_too_large", stage="load", names=["bomb_9000.png", "9000x9000"]),
        image_case("image_above_max_pixels", "small_64x64.png",
                   "64x64 image, max_image_pixels=2000 (good images: at most 32x32)",
                   skip + "image_too_large", stage="load", names=["small_64x64.png", "4,096 pixels"],
                   max_image_pixels=2000),
        image_case("image_1x1", "pixel_1x1.png", "1x1 RGB image", "ok", reference="pixel_1x1.png", tolerance=0),
        image_case("image_gray16", "gray16.png", "16-bit grayscale PNG (PIL mode I;16)", "ok",
                   reference="gray16_expected.png", tolerance=0),
        image_case("image_cmyk_jpg", "cmyk.jpg", "CMYK JPEG", "ok", reference="cmyk_expected.png", tolerance=24),
        image_case("image_palette_transparency", "palette_trns.png",
                   "palette PNG with a fully transparent index (magenta) in tRNS", "ok",
                   reference="palette_trns_expected.png", tolerance=0),
        image_case("image_gray_l", "gray_l.png", "8-bit grayscale (L)", "ok", reference="gray_l_expected.png",
                   tolerance=0),
        image_case("image_gray_la", "gray_la.png", "grayscale + alpha (LA), gray 60 under alpha 0", "ok",
                   reference="gray_la_expected.png", tolerance=0),
        image_case("image_exif_rot6", "exif_rot6.jpg", "JPEG stored sideways, EXIF orientation 6", "ok",
                   reference="upright.png", tolerance=24),
        image_case("image_exif_rot8", "exif_rot8.jpg", "JPEG stored sideways, EXIF orientation 8", "ok",
                   reference="upright.png", tolerance=24),
        image_case("image_aspect_400x1_llava", "wide_400x1.png", "400x1 image, LLaVA processor", "ok",
                   reference="wide_400x1.png", tolerance=0),
        image_case("image_aspect_400x1_qwen", "wide_400x1.png",
                   "400x1 image, Qwen2.5-VL processor (refuses aspect ratios above 200)",
                   skip + "rejected_by_processor", stage="load", names=["wide_400x1.png", "aspect ratio"],
                   processor="qwen2_5_vl"),
        # -- records --------------------------------------------------------------------------------------------
        record_case("record_no_image_token", _rec("r_no_token", conversations=_turns(("what is the color ?", "red"))),
                    "image but no <image> in the question", skip + "no_image_token", names=["conversations[0]"]),
        record_case("record_more_tokens", _rec("r_more", conversations=_turns(("<image> <image> what ?", "red"))),
                    "two <image> for one image", skip + "extra_image_token", names=["2 <image>", "1 image"]),
        record_case("record_fewer_tokens", _rec("r_fewer", image=["good_0.png", "good_1.png"]),
                    "one <image> for two images", skip + "no_image_token", names=["1 <image>", "2 images"]),
        record_case("record_token_in_answer", _rec("r_answer_token", conversations=_turns((QUESTION, "<image> red"))),
                    "<image> inside an answer", skip + "extra_image_token", names=["conversations[1]"]),
        record_case("record_empty_answer", _rec("r_empty", conversations=_turns((QUESTION, "  "))),
                    "answer of spaces", skip + "empty_answer", names=["conversations[1]"]),
        record_case("record_control_only_answer", _rec("r_ctrl_answer", conversations=_turns((QUESTION,
                                                                                             "\u0000\u0007"))),
                    "answer of control characters only", skip + "empty_answer", names=["conversations[1]"]),
        record_case("record_missing_answer",
                    _rec("r_no_answer", conversations=[{"from": "human", "value": QUESTION}]),
                    "a question without its answer", skip + "no_answer", names=["conversations[0]"]),
        record_case("record_missing_conversations", {"id": "r_no_conv", "image": "good_0.png"},
                    "no conversations field", skip + "malformed", names=["'conversations'"]),
        record_case("record_conversations_not_list", _rec("r_conv_str", conversations=QUESTION),
                    "conversations is a string", skip + "malformed", names=["'conversations' is a string"]),
        record_case("record_conversations_empty", _rec("r_conv_empty", conversations=[]),
                    "conversations is []", skip + "malformed", names=["empty list"]),
        record_case("record_turn_not_object", _rec("r_turn_str", conversations=[QUESTION, "red"]),
                    "turns are strings", skip + "malformed", names=["conversations[0] is a string"]),
        record_case("record_value_not_string",
                    _rec("r_value_int", conversations=[{"from": "human", "value": QUESTION}, {"from": "gpt",
                                                                                             "value": 42}]),
                    "answer value is a number", skip + "malformed",
                    names=["conversations[1]['value'] is a number (42)"]),
        record_case("record_value_null",
                    _rec("r_value_null", conversations=[{"from": "human", "value": None}, {"from": "gpt",
                                                                                          "value": "red"}]),
                    "question value is null", skip + "malformed", names=["conversations[0]['value'] is null"]),
        record_case("record_wrong_role",
                    _rec("r_bot", conversations=[{"from": "human", "value": QUESTION}, {"from": "bot",
                                                                                       "value": "red"}]),
                    "second turn from 'bot'", skip + "malformed", names=["conversations[1]['from'] is 'bot'"]),
        record_case("record_image_number", _rec("r_image_int", image=7), "image is a number", skip + "malformed",
                    names=["'image' is a number (7)"]),
        record_case("record_image_empty_list", _rec("r_image_empty", image=[]), "image is []", skip + "malformed",
                    names=["'image' is a list ([])"]),
        record_case("record_image_list_with_null", _rec("r_image_null", image=["good_0.png", None]),
                    "image list holding null", skip + "malformed", names=["'image' is a list"]),
        record_case("record_not_object", "just a string", "a record that is a string", skip + "malformed",
                    names=["record 2", "a string ('just a string')"]),
        record_case("record_null", None, "a record that is null", skip + "malformed", names=["record 2", "null"]),
        record_case("record_text_only", {"id": "r_text", "conversations": _turns(("what is the color ?", "red"))},
                    "no image field (text-only)", skip + "text_only", names=["text-only"]),
        record_case("record_control_chars",
                    _rec("r_ctrl", conversations=_turns(("<image>\nwhat is\u0000 the\u001b color ?\r\n",
                                                         "r\u0001ed\u0085"))),
                    "NUL, ESC, CR LF, SOH, NEL inside question and answer", "ok",
                    question="what is the color ?", answer="red </s>"),
        # -- whole files ----------------------------------------------------------------------------------------
        file_case("file_not_json", "not_json.json", "a sentence, not JSON", "ValueError",
                  match=["is not valid JSON", "line 1 column 1"]),
        file_case("file_malformed_json", "malformed.json", "a missing comma on line 3", "ValueError",
                  match=["is not valid JSON", "Expecting ',' delimiter at line 3 column 13"]),
        file_case("file_truncated_json", "truncated.json", "a JSON list cut at two thirds", "ValueError",
                  match=["is not valid JSON", "at line"]),
        file_case("file_top_level_object", "top_level_object.json", "one object instead of a list", "ValueError",
                  match=["must hold a JSON list of records, got an object at its top level"]),
        file_case("file_non_utf8", "non_utf8.json", "a 0xff byte inside a string", "ValueError",
                  match=["not UTF-8", _position(_non_utf8(), 0xFF)]),
        file_case("file_empty", "empty.json", "zero-byte file", "ValueError", match=["is empty (0 bytes)"]),
        file_case("file_jsonl_named_json", "jsonl_named_json.json", "JSON Lines content in a .json file",
                  "ValueError", match=["Extra data at line 2 column 1", "name the file *.jsonl"]),
        file_case("file_deep_nesting", "deep_nesting.json", "5000 nested lists", "ValueError",
                  match=["nesting too deep"]),
        file_case("file_all_lines_bad", "all_bad.jsonl", "JSON Lines file of random bytes", "ValueError",
                  match=["none of its 5 non-blank lines is JSON", "line 1: "]),
        file_case("file_list_named_jsonl", "list_named_jsonl.jsonl", "a pretty-printed JSON list named .jsonl",
                  "ValueError", match=["none of its", "name the file *.json"]),
        file_case("file_bad_lines_among_good", "mixed_lines.jsonl",
                  "JSON Lines: 4 good lines, a line cut short, a Latin-1 line, a 5000-digit int, 3000 nested "
                  "lists, blank lines", skip + "bad_json_line", count=4, stage="init", good_ids=GOOD_IDS,
                  names=["line 2", "line 5", "line 7", "line 8", "not UTF-8", "4300 digits", "nesting too deep"]),
        file_case("file_utf8_bom", "bom.json", "UTF-8 byte-order mark before the list", "ok", good_ids=GOOD_IDS),
        file_case("file_raw_control_chars", "raw_control_chars.json",
                  "raw control characters inside JSON strings, CRLF line ends", "ok", good_ids=GOOD_IDS + ["ctrl"],
                  checks={"ctrl": {"question": "what is the color ?", "answer": "red </s>"}}),
    ]
    out += [api_case(name, what, expect, match=match) for name, (what, expect, match) in API_EXPECT.items()]
    return out


def manifest() -> dict:
    return {
        "about": "Bad inputs and their expected outcomes; written by tests/make_bad_inputs.py, checked by "
                 "tests/test_bad_inputs.py. Record and image cases run among good_records (the bad one at index "
                 f"{INSERT_AT}) through LlavaDataModule.",
        "jpeg_encoder": jpeg_encoder(),
        "good_records": GOOD_RECORDS,
        "cases": cases(),
    }


def corpus_files() -> dict[str, bytes]:
    files = {**_image_files(), **_data_files()}
    files["manifest.json"] = _json_bytes(manifest())
    files[".gitattributes"] = b"# byte-exact test inputs (CRLF, BOM, invalid UTF-8): no end-of-line conversion\n* -text\n"
    return files


def write_corpus(directory: Path = CORPUS) -> list[Path]:
    """(Re)write the corpus under `directory`; files it does not list are removed."""
    directory = Path(directory)
    files = corpus_files()
    for sub in ("images", "files"):
        if (directory / sub).is_dir():
            for stale in (directory / sub).iterdir():
                if f"{sub}/{stale.name}" not in files:
                    stale.unlink()
    written = []
    for name, data in sorted(files.items()):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------
# running a case


@dataclass
class Result:
    case: dict
    outcome: str  # raised | skipped | accepted | crashed
    message: str = ""
    counts: Counter = field(default_factory=Counter)
    init_counts: Counter = field(default_factory=Counter)
    summary: str = ""
    report: str = ""
    arrived: dict = field(default_factory=dict)  # record id -> (batch, row)
    items: dict = field(default_factory=dict)  # record id -> dataset item
    lost: list = field(default_factory=list)  # good record ids that never reached a batch
    problems: list = field(default_factory=list)  # expectation mismatches


class Decoded(BaseException):
    """Raised by the decode spy: pixels of an oversized image were about to be decoded (never caught by
    `except Exception`)."""


class Unpickled(BaseException):
    """Raised when anything is unpickled during a pickle case (never caught by `except Exception`)."""


@contextlib.contextmanager
def pil_guard_off_and_decode_spy(limit: int = 50_000_000):
    """PIL's global bomb guard off (as LLaVA-style training code often sets it) and any decode of an image above
    `limit` pixels turned into `Decoded` before a byte is allocated."""
    real_load = ImageFile.ImageFile.load

    def spy(self, *args, **kwargs):
        if self.size[0] * self.size[1] > limit:
            raise Decoded(f"{getattr(self, 'filename', '?')}: decoding {self.size} was attempted")
        return real_load(self, *args, **kwargs)

    with mock.patch.object(Image, "MAX_IMAGE_PIXELS", None), mock.patch.object(ImageFile.ImageFile, "load", spy):
        yield


@contextlib.contextmanager
def forbid_unpickling(calls: list):
    """torch.load / pickle.load / pickle.loads / pickle.Unpickler record the call and raise `Unpickled`."""
    import torch

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise Unpickled("something was unpickled")

    targets = [(torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
               (pickle, "Unpickler")]
    with contextlib.ExitStack() as stack:
        for module, name in targets:
            stack.enter_context(mock.patch.object(module, name, refuse))
        yield


def make_context(workdir: Path) -> SimpleNamespace:
    """Processors (LLaVA, and Qwen2.5-VL built on first use), a tiny LLaVA and a batch for the API cases."""
    from data.tiny import tiny_llava_processor, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    return SimpleNamespace(workdir=Path(workdir), tokenizer=tokenizer,
                           processors={"llava": tiny_llava_processor(tokenizer)}, _model=None, _batch=None)


def _processor(ctx, name: str):
    if name not in ctx.processors:
        from data.tiny import tiny_qwen_processor

        ctx.processors[name] = tiny_qwen_processor(name)
    return ctx.processors[name]


def _model(ctx):
    if ctx._model is None:
        from data.tiny import tiny_llava

        ctx._model = tiny_llava(ctx.tokenizer)
    return ctx._model


def _batch(ctx):
    if ctx._batch is None:
        import torch

        images = [Image.fromarray(_pattern(w, h, k)) for k, (w, h) in enumerate([(40, 20), (32, 32)])]
        prompts = ["USER : <image> what is the color ? ASSISTANT :", "USER : <image> how many ? ASSISTANT :"]
        batch = ctx.processors["llava"](images=images, text=prompts, return_tensors="pt", padding=True)
        batch["image_sizes"] = torch.tensor([[im.height, im.width] for im in images])
        ctx._batch = batch
    return ctx._batch


def _training_file(case: dict, good: list, workdir: Path) -> tuple[Path, Any]:
    if case["group"] == "image":
        images = case["image"]
        question = case.get("question", QUESTION)
        bad = {"id": case["id"], "image": images, "conversations": _turns((question, "red"))}
    else:
        bad = case["record"]
    records = good[:INSERT_AT] + [bad] + good[INSERT_AT:]
    path = workdir / f"{case['id']}.json"
    path.write_text(json.dumps(records))
    return path, bad


def run_data_case(case: dict, corpus: Path, ctx, workdir: Path, num_workers: int = 0) -> Result:
    """One epoch of `LlavaDataModule` over the case's training file; nothing but the case's own expectation
    decides the outcome: a ValueError at setup is "raised", a skip of the bad record "skipped", its arrival in a
    batch "accepted", any other exception "crashed"."""
    from data.datamodule import LlavaDataModule
    from data.llava_json import DEFAULT_MAX_IMAGE_PIXELS

    corpus = Path(corpus)
    workdir.mkdir(parents=True, exist_ok=True)
    good = json.loads((corpus / "manifest.json").read_text())["good_records"]
    if case["group"] == "file":
        path, bad, good_ids = corpus / "files" / case["file"], None, case.get("good_ids", [])
    else:
        path, bad = _training_file(case, good, workdir)
        good_ids = [r["id"] for r in good]
    result = Result(case, "crashed")
    guard = pil_guard_off_and_decode_spy() if case.get("pil_guard_off") else contextlib.nullcontext()
    try:
        with guard:
            dm = LlavaDataModule(image_root=str(corpus / "images"), train_json=str(path), batch_size=2,
                                 num_workers=num_workers,
                                 max_image_pixels=case.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))
            dm.set_processor(_processor(ctx, case.get("processor", "llava")))
            try:
                dm.setup("fit")
            except ValueError as err:
                result.outcome, result.message = "raised", str(err)
                return result
            ds = dm.datasets["train"]
            result.init_counts = Counter(ds.init_skipped)
            for batch in dm.train_dataloader():
                dm.record_skipped(batch, stage="train", epoch=0)
                for row, rid in enumerate(batch.get("ids", [])):
                    result.arrived[rid] = (batch, row)
            if num_workers == 0:
                for i in range(len(ds)):
                    rid = ds._items[i][0]
                    if rid in result.arrived:
                        result.items[rid] = ds[i]
    except (Exception, Decoded) as err:  # noqa: BLE001 - a crash is an outcome to report
        result.outcome, result.message = "crashed", "".join(traceback.format_exception(err))
        return result
    result.counts = dm.skip_counts("train", epoch=0)
    result.summary = dm.skip_summary("train", epoch=0)
    result.report = dm.skip_report("train", epoch=0)
    result.lost = [rid for rid in good_ids if rid not in result.arrived]
    bad_id = bad.get("id") if isinstance(bad, dict) else None
    arrived_bad = bad_id is not None and bad_id in result.arrived
    result.outcome = "accepted" if (arrived_bad or (bad is None and not result.counts)) else "skipped"
    return result


def _decoded_answer(ctx, batch, row) -> str:
    from data import IGNORE_INDEX

    labels = batch["labels"][row]
    return ctx.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())


def _question_text(item: dict) -> str:
    return " ".join(c["text"] for c in item["messages"][0]["content"] if c.get("type") == "text")


def check_data_case(result: Result, corpus: Path, ctx) -> list[str]:
    """Mismatches between `result` and its case's expectation (empty when it behaved as the manifest says)."""
    case, problems = result.case, []
    expect = case["expect"]
    if result.outcome == "crashed":
        return [f"crashed: {result.message}"]
    if expect == "ValueError":
        if result.outcome != "raised":
            return [f"expected a ValueError, got outcome {result.outcome} ({result.summary})"]
        for text in [case["file"], *case.get("match", [])]:
            if text not in result.message:
                problems.append(f"ValueError message {result.message!r} lacks {text!r}")
        return problems
    if result.outcome == "raised":
        return [f"expected {expect}, got ValueError: {result.message}"]
    if result.lost:
        problems.append(f"good records lost: {result.lost} ({result.summary})")
    if expect.startswith("skip:"):
        kind, n = expect[len("skip:"):], case.get("count", 1)
        if result.counts != Counter({kind: n}):
            problems.append(f"expected {kind}={n} and nothing else skipped, got {dict(result.counts)}")
        if result.outcome != "skipped":
            problems.append(f"expected the record to be skipped, it was {result.outcome}")
        stage = case.get("stage")
        if stage == "init" and result.init_counts.get(kind, 0) != n:
            problems.append(f"expected {kind} to be caught at construction, init counts {dict(result.init_counts)}")
        if stage == "load" and result.init_counts.get(kind, 0):
            problems.append(f"expected {kind} when loading, but it was counted at construction")
        if f"{kind}={n}" not in result.summary and not (kind == "unreadable_image" and stage == "load"
                                                         and result.summary.endswith(f": {n}")):
            problems.append(f"the epoch summary does not show {kind}={n}: {result.summary!r}")
        lines = [line for line in result.report.splitlines() if line.startswith(f"  {kind}: ")]
        where = case["file"] if case["group"] == "file" else f"{case['id']}.json"
        names = list(case.get("names", []))
        if case["group"] != "file" and isinstance(case.get("record", {}), dict):
            names.append(f"id {case.get('record', {}).get('id', case['id'])!r}")
        for text in [where, *names]:
            if not any(text in line for line in lines):
                problems.append(f"no {kind} message names {text!r}: {lines}")
        return problems
    # ok
    if result.counts:
        problems.append(f"expected nothing skipped, got {dict(result.counts)} ({result.report})")
    if result.outcome != "accepted":
        problems.append(f"expected the input to be accepted, it was {result.outcome}")
    checks = dict(case.get("checks", {}))
    if case["group"] != "file":
        bad_id = case["id"] if case["group"] == "image" else case["record"]["id"]
        checks[bad_id] = {k: case[k] for k in ("reference", "tolerance", "question", "answer") if k in case}
    for rid, check in checks.items():
        if rid not in result.arrived:
            problems.append(f"record {rid!r} never reached a batch")
            continue
        batch, row = result.arrived[rid]
        item = result.items.get(rid)
        if "reference" in check:
            with Image.open(Path(corpus) / "images" / check["reference"]) as ref:
                expected = np.asarray(ref.convert("RGB"), dtype=np.int64)
            got = np.asarray(item["image"], dtype=np.int64)
            if got.shape != expected.shape:
                problems.append(f"{rid}: decoded shape {got.shape}, reference {expected.shape}")
            elif np.abs(got - expected).max() > check["tolerance"]:
                problems.append(f"{rid}: pixels differ from {check['reference']} by up to "
                                f"{np.abs(got - expected).max()} (> {check['tolerance']})")
            if tuple(item["image_size"]) != expected.shape[:2]:
                problems.append(f"{rid}: image_size {item['image_size']} is not the upright {expected.shape[:2]}")
        if "question" in check and _question_text(item) != check["question"]:
            problems.append(f"{rid}: question text {_question_text(item)!r} != {check['question']!r}")
        if "answer" in check and _decoded_answer(ctx, batch, row) != check["answer"]:
            problems.append(f"{rid}: answer labels {_decoded_answer(ctx, batch, row)!r} != {check['answer']!r}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# public-API cases: expected message fragments, and how to provoke each


API_EXPECT = {
    "api_n1_zero": ('PruningPlan(stage1="random", n1=0)', "ValueError", ["n1=0"]),
    "api_n1_negative": ('PruningPlan(stage1="random", n1=-3)', "ValueError", ["n1=-3"]),
    "api_n1_ratio_above_one": ('PruningPlan(stage1="random", n1=1.5)', "ValueError", ["n1=1.5", "(0, 1]"]),
    "api_n1_not_a_number": ('PruningPlan(stage1="random", n1="64")', "ValueError", ["n1", "'64'"]),
    "api_n1_above_n_at_call": ("n1=1000 on a model with N=16 visual tokens, at forward", "ValueError",
                               ["n1=1000", "N=16"]),
    "api_n2_above_n1": ('PruningPlan(stage1="random", n1=4, stage2="fastv", n2=8)', "ValueError",
                        ["n2=8", "n1=4"]),
    "api_n2_above_n1_at_call": ("n1=0.25 (4 of 16 tokens) and n2=8, at forward", "ValueError",
                                ["n2=8", "n1=0.25"]),
    "api_layer_zero": ("stage-2 layer=0 on a 4-layer language model", "ValueError", ["layer=0", "[1, 3]"]),
    "api_layer_above": ("stage-2 layer=99 on a 4-layer language model", "ValueError", ["layer=99", "[1, 3]"]),
    "api_layer_not_int": ('stage-2 layer="2"', "ValueError", ["layer", "'2'"]),
    "api_plan_yaml_unknown_key": ("PruningPlan.load of a YAML file with the key stage_1", "ValueError",
                                  ["stage_1"]),
    "api_head_other_family": ("load_pruned of a head trained for model_type qwen2_5_vl", "ValueError",
                              ["'qwen2_5_vl'", "'llava'"]),
    "api_head_other_dim": ("load_pruned of a head for 48-dim features (the model's are 32)", "ValueError",
                           ["48", "32"]),
    "api_head_other_dim_prunedvlm": ("PrunedVLM(model, PruningPlan(stage1=head for 48-dim features))",
                                     "ValueError", ["48", "32"]),
    "api_safetensors_truncated": ("pruner directory whose model.safetensors is cut short", "ValueError",
                                  ["model.safetensors", "truncated or corrupt"]),
    "api_safetensors_missing": ("pruner directory without model.safetensors", "ValueError",
                                ["has no model.safetensors"]),
    "api_pickle_bin": ("pruner directory with only pytorch_model.bin (pickled), never unpickled", "ValueError",
                       ["pytorch_model.bin", "will not unpickle"]),
    "api_pickle_pt": ("pruner directory with only model.pt (pickled), never unpickled", "ValueError",
                      ["model.pt", "will not unpickle"]),
    "api_pickle_file_as_path": ("the pickled model.pt file itself given as the pruner path", "ValueError",
                                ["model.pt", "is not a directory"]),
    "api_pickle_next_to_safetensors": ("pytorch_model.bin next to model.safetensors: the safetensors load, the "
                                       "pickle is never opened", "ok", []),
}


def _head_dir(ctx, name: str, **config) -> Path:
    """A saved PrunerHead for the tiny model (or with `config` overrides, e.g. another in_dim)."""
    import torch

    from modules.head import PrunerHead
    from modules.vlm import get_adapter

    directory = ctx.workdir / "heads" / name
    adapter = get_adapter(_model(ctx), ctx.processors["llava"])
    torch.manual_seed(0)
    head = PrunerHead.for_model(adapter, d_model=16, depth=1, heads=2)
    if config:
        fields = {**head.config.__dict__, **config}
        head = PrunerHead(**{k: v for k, v in fields.items()})
    head.save_pretrained(directory)
    return directory


def _pickle_dir(ctx, name: str, filename: str, keep_safetensors: bool = False) -> Path:
    import torch

    from modules.head import WEIGHTS_NAME

    directory = _head_dir(ctx, name)
    from safetensors.torch import load_file

    state = load_file(str(directory / WEIGHTS_NAME))
    buf = io.BytesIO()
    torch.save(state, buf)  # a real pickled checkpoint (written before any unpickling is forbidden)
    (directory / filename).write_bytes(buf.getvalue())
    if not keep_safetensors:
        (directory / WEIGHTS_NAME).unlink()
    return directory


def _api_action(name: str, ctx):
    """A callable doing the API call of case `name` (its inputs are made first, outside the call)."""
    from modules.head import PrunerHead
    from modules.pruned_vlm import PrunedVLM, PruningPlan
    from modules.serve import load_pruned

    model, processor = _model(ctx), ctx.processors["llava"]

    def forward(plan):
        return lambda: PrunedVLM(model, plan, processor=processor)(**_batch(ctx))

    simple = {
        "api_n1_zero": lambda: PruningPlan(stage1="random", n1=0),
        "api_n1_negative": lambda: PruningPlan(stage1="random", n1=-3),
        "api_n1_ratio_above_one": lambda: PruningPlan(stage1="random", n1=1.5),
        "api_n1_not_a_number": lambda: PruningPlan(stage1="random", n1="64"),
        "api_n2_above_n1": lambda: PruningPlan(stage1="random", n1=4, stage2="fastv", n2=8),
        "api_layer_zero": lambda: PrunedVLM(model, PruningPlan(stage2="fastv", n2=4, layer=0), processor=processor),
        "api_layer_above": lambda: PrunedVLM(model, PruningPlan(stage2="fastv", n2=4, layer=99), processor=processor),
        "api_layer_not_int": lambda: PrunedVLM(model, PruningPlan(stage2="fastv", n2=4, layer="2"),
                                               processor=processor),
    }
    if name in simple:
        return simple[name]
    if name == "api_n1_above_n_at_call":
        return forward(PruningPlan(stage1="random", n1=1000))
    if name == "api_n2_above_n1_at_call":
        return forward(PruningPlan(stage1="random", n1=0.25, stage2="fastv", n2=8, layer=2))
    if name == "api_plan_yaml_unknown_key":
        path = ctx.workdir / "plan.yaml"
        path.write_text("stage1: random\nn1: 4\nstage_1: fastv\n")
        return lambda: PruningPlan.load(path)
    if name == "api_head_other_family":
        directory = _head_dir(ctx, name, model_type="qwen2_5_vl", base_model="Qwen/Qwen2.5-VL-3B-Instruct")
        return lambda: load_pruned(model, directory, processor=processor)
    if name == "api_head_other_dim":
        directory = _head_dir(ctx, name, in_dim=48)
        return lambda: load_pruned(model, directory, processor=processor)
    if name == "api_head_other_dim_prunedvlm":
        directory = _head_dir(ctx, name, in_dim=48)
        return lambda: PrunedVLM(model, PruningPlan(stage1=PrunerHead.from_pretrained(directory), n1=4),
                                 processor=processor)
    if name == "api_safetensors_truncated":
        directory = _head_dir(ctx, name)
        weights = directory / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        return lambda: load_pruned(model, directory, processor=processor)
    if name == "api_safetensors_missing":
        directory = _head_dir(ctx, name)
        (directory / "model.safetensors").unlink()
        return lambda: load_pruned(model, directory, processor=processor)
    if name == "api_pickle_bin":
        directory = _pickle_dir(ctx, name, "pytorch_model.bin")
        return lambda: load_pruned(model, directory, processor=processor)
    if name == "api_pickle_pt":
        directory = _pickle_dir(ctx, name, "model.pt")
        return lambda: PrunerHead.from_pretrained(directory)
    if name == "api_pickle_file_as_path":
        directory = _pickle_dir(ctx, name, "model.pt")
        return lambda: load_pruned(model, directory / "model.pt", processor=processor)
    if name == "api_pickle_next_to_safetensors":
        directory = _pickle_dir(ctx, name, "pytorch_model.bin", keep_safetensors=True)
        return lambda: load_pruned(model, directory, processor=processor)
    raise KeyError(f"no API action for case {name!r}")


def run_api_case(case: dict, ctx) -> Result:
    """Run the case's public-API call with unpickling forbidden; "raised" (ValueError), "accepted" or
    "crashed" (any other exception, or anything unpickled)."""
    result = Result(case, "crashed")
    try:
        action = _api_action(case["id"], ctx)
    except Exception as err:  # noqa: BLE001 - the inputs could not even be made
        result.message = "".join(traceback.format_exception(err))
        return result
    calls: list = []
    try:
        with forbid_unpickling(calls):
            action()
    except ValueError as err:
        result.outcome, result.message = "raised", str(err)
    except (Exception, Unpickled) as err:  # noqa: BLE001
        result.message = "".join(traceback.format_exception(err))
    else:
        result.outcome = "accepted"
    if calls:
        result.outcome = "crashed"
        result.message = f"unpickling was attempted ({len(calls)} call(s)); {result.message}"
    return result


def check_api_case(result: Result) -> list[str]:
    case = result.case
    if result.outcome == "crashed":
        return [f"crashed: {result.message}"]
    if case["expect"] == "ok":
        if result.outcome == "accepted":
            return []
        return [f"expected acceptance, got {result.outcome}: {result.message}"]
    if result.outcome != "raised":
        return [f"expected a ValueError, got outcome {result.outcome}"]
    return [f"ValueError message {result.message!r} lacks {text!r}" for text in case["match"]
            if text not in result.message]


def run_case(case: dict, corpus: Path, ctx, workdir: Path) -> Result:
    if case["group"] == "api":
        result = run_api_case(case, ctx)
        result.problems = check_api_case(result)
    else:
        result = run_data_case(case, corpus, ctx, Path(workdir))
        result.problems = check_data_case(result, corpus, ctx)
    return result


# ---------------------------------------------------------------------------------------------------------------
# the summary table


GROUP_TITLES = {"image": "images", "record": "records", "file": "whole files", "api": "public API"}


def summary_table(results: list[Result]) -> str:
    """Markdown: per group, inputs and outcomes (raised with a clear message / skipped and counted / accepted
    and correct / crashed / not as expected), good records lost, then the skip kinds counted."""
    header = ("| kind of input | inputs | raised a clear ValueError | skipped and counted | accepted (checked) | "
              "crashed | not as expected | good records lost |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    totals = Counter()
    for group, title in GROUP_TITLES.items():
        rows = [r for r in results if r.case["group"] == group]
        if not rows:
            continue
        c = Counter(r.outcome for r in rows)
        bad = sum(1 for r in rows if r.problems)
        lost = sum(len(r.lost) for r in rows)
        totals.update({"inputs": len(rows), "raised": c["raised"], "skipped": c["skipped"],
                       "accepted": c["accepted"], "crashed": c["crashed"], "bad": bad, "lost": lost})
        lines.append(f"| {title} | {len(rows)} | {c['raised']} | {c['skipped']} | {c['accepted']} | "
                     f"{c['crashed']} | {bad} | {lost} |")
    lines.append(f"| **all** | {totals['inputs']} | {totals['raised']} | {totals['skipped']} | "
                 f"{totals['accepted']} | {totals['crashed']} | {totals['bad']} | {totals['lost']} |")
    kinds = Counter()
    for r in results:
        kinds.update(r.counts)
    lines += ["", "Skips counted, by kind: " + ", ".join(f"{k}={n}" for k, n in sorted(kinds.items())), "",
              f"crashed: {totals['crashed']}, lost good records: {totals['lost']}, "
              f"not as expected: {totals['bad']}"]
    return "\n".join(lines)


def detail_table(results: list[Result]) -> str:
    """Markdown, one row per case: what it is, what was expected, what happened (the skip kind or the start of the
    ValueError)."""
    lines = ["| group | case | input | expected | outcome |", "|---|---|---|---|---|"]
    for r in results:
        if r.outcome == "raised":
            got = "ValueError: " + r.message.replace(str(ROOT) + "/", "")[:90].replace("|", "\\|")
        elif r.outcome == "skipped":
            got = "skipped: " + ", ".join(f"{k}={n}" for k, n in sorted(r.counts.items()))
        else:
            got = r.outcome
        flag = "" if not r.problems else " **(not as expected)**"
        lines.append(f"| {r.case['group']} | {r.case['id']} | {r.case['what']} | {r.case['expect']} | {got}{flag} |")
    return "\n".join(lines)


def run_all(corpus: Path = CORPUS, workdir: Path | None = None) -> list[Result]:
    import tempfile

    cases_ = json.loads((Path(corpus) / "manifest.json").read_text())["cases"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        ctx = make_context(work)
        return [run_case(case, corpus, ctx, work / case["id"]) for case in cases_]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=CORPUS, help="where to write the corpus")
    parser.add_argument("--summary", action="store_true", help="run every case and print the summary table")
    parser.add_argument("--detail", action="store_true", help="with --summary: also one row per case")
    parser.add_argument("--out", type=Path, default=None, help="with --summary: also write the table here")
    args = parser.parse_args(argv)
    if not args.summary:
        written = write_corpus(args.out_dir)
        size = sum(p.stat().st_size for p in written)
        print(f"wrote {len(written)} files ({size:,} bytes) under {args.out_dir}")
        return 0
    import logging

    logging.getLogger("data.llava_json").setLevel(logging.ERROR)
    results = run_all(args.out_dir)
    table = summary_table(results)
    if args.detail:
        table += "\n\n" + detail_table(results)
    print(table)
    for r in results:
        for problem in r.problems:
            print(f"{r.case['id']}: {problem}", file=sys.stderr)
    if args.out:
        args.out.write_text(table + "\n")
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
