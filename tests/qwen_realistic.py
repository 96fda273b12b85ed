"""Builders for the realistic Qwen tier (tests/test_qwen_realistic.py): Qwen2.5-VL-7B and Qwen3-VL-8B geometry at
tiny depth, random weights, built in code.

Where the values come from:
- the installed transformers' config defaults (configuration_qwen2_5_vl.py `Qwen2_5_VLVisionConfig`,
  configuration_qwen3_vl.py `Qwen3VLVisionConfig` / `Qwen3VLTextConfig`): Qwen2.5-VL vision intermediate_size 3420,
  16 heads, patch 14, temporal patch 2, merge 2, window_size 112, silu, fullatt_block_indexes (7, 15, 23, 31) at
  depth 32; Qwen3-VL vision hidden 1152, intermediate 4304, 16 heads, patch 16, merge 2, temporal patch 2,
  num_position_embeddings 2304, gelu_pytorch_tanh, deepstack_visual_indexes (8, 16, 24) at depth 27; Qwen3-VL text
  head_dim 128.
- the Hub checkpoints' config.json (not defaults of the installed classes): Qwen2.5-VL-7B-Instruct's vision
  hidden_size 1280 (the class default, 3584, is the text width) and out_hidden_size = text hidden; text
  mrope_section [16, 24, 24] (head_dim 3584 / 28 = 128), rope_theta 1e6, rms_norm_eps 1e-6; Qwen3-VL-8B-Instruct's
  text mrope_section [24, 20, 20] interleaved, rope_theta 5e6.
- reduced here: vision depth 4 (Qwen2.5-VL full attention in blocks [1, 3], windowed in 0 and 2; Qwen3-VL
  DeepStack after blocks [0, 1, 2]), text 4 layers of hidden 512 = 4 heads x 128, 2 key/value heads.
- processors: the image processor class defaults of the installed `Qwen2VLImageProcessorPil` (min_pixels 56 * 56,
  max_pixels 28 * 28 * 1280, OPENAI CLIP mean/std) with the family's patch size, merge 2, temporal patch 2 (the
  Qwen2.5-VL Hub preprocessor_config raises max_pixels to 12845056; no image here reaches either bound); Qwen3-VL:
  patch 16 and mean/std 0.5 (its Hub preprocessor_config). Images-only processor classes of data/tiny.py over
  `tiny_qwen_tokenizer`.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from PIL import Image
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from data.tiny import (
    QWEN_SPECIAL_TOKENS,
    TinyQwen2_5_VLProcessor,
    TinyQwen3VLProcessor,
    qwen_chat_template,
    tiny_qwen_tokenizer,
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16}
MERGE = 2
TEXT_HIDDEN, TEXT_HEADS, TEXT_KV_HEADS, TEXT_LAYERS, HEAD_DIM = 512, 4, 2, 4, 128

QWEN25_VISION = dict(  # Qwen2.5-VL-7B-Instruct, depth 32 -> 4
    depth=4, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu", patch_size=14,
    temporal_patch_size=2, spatial_merge_size=MERGE, window_size=112, fullatt_block_indexes=[1, 3],
    out_hidden_size=TEXT_HIDDEN,
)
QWEN3_VISION = dict(  # Qwen3-VL-8B-Instruct, depth 27 -> 4
    depth=4, hidden_size=1152, intermediate_size=4304, num_heads=16, hidden_act="gelu_pytorch_tanh", patch_size=16,
    temporal_patch_size=2, spatial_merge_size=MERGE, num_position_embeddings=2304, deepstack_visual_indexes=[0, 1, 2],
    out_hidden_size=TEXT_HIDDEN,
)
MROPE = {"qwen2_5_vl": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
         "qwen3_vl": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                      "mrope_interleaved": True}}

# (width, height): merged grids (h x w) 17 x 23 = 391, 11 x 15 = 165, 17 x 12 = 204 tokens on Qwen2.5-VL (factor 28:
# none of 17, 23, 11, 15 is a multiple of the 4-token window, so windows are padded), 15 x 20 = 300, 10 x 13 = 130,
# 15 x 10 = 150 on Qwen3-VL (factor 32).
IMAGE_SIZES = ((640, 480), (420, 308), (336, 476))


@cache
def tokenizer(family: str):
    return tiny_qwen_tokenizer(family=family)


@cache
def processor(family: str):
    ip_kwargs = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]} if family == "qwen3_vl" else {}
    image_processor = Qwen2VLImageProcessorPil(patch_size=PATCH[family], merge_size=MERGE, temporal_patch_size=2,
                                               **ip_kwargs)
    cls = TinyQwen3VLProcessor if family == "qwen3_vl" else TinyQwen2_5_VLProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer(family), chat_template=qwen_chat_template(family))


def config(family: str, attn_implementation: str = "sdpa"):
    tok = tokenizer(family)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = dict(vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
                num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS,
                max_position_embeddings=4096, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
                rope_parameters=dict(MROPE[family]))
    if family == "qwen2_5_vl":
        cfg = Qwen2_5_VLConfig(vision_config=dict(QWEN25_VISION), text_config=text, **common)
    else:
        cfg = Qwen3VLConfig(vision_config=dict(QWEN3_VISION), text_config=dict(text, head_dim=HEAD_DIM), **common)
    cfg.pad_token_id = tok.pad_token_id
    cfg._attn_implementation = attn_implementation
    return cfg


@cache
def model(family: str, impl: str = "sdpa"):
    """fp32, eval, seed 0: every impl of one family has the same weights."""
    cls = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    m = cls(config(family, impl)).eval()
    m.generation_config.pad_token_id = tokenizer(family).pad_token_id
    m.generation_config.eos_token_id = tokenizer(family).eos_token_id
    return m


def make_images(sizes=IMAGE_SIZES, seed: int = 0) -> list[Image.Image]:
    """Random 8 x 8 pixel-block noise images of the given (width, height)."""
    rng = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        small = rng.integers(0, 255, ((h + 7) // 8, (w + 7) // 8, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.NEAREST))
    return out


def prompt(proc, n_images: int, text: str) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@cache
def _batch(family: str) -> dict:
    proc = processor(family)
    proc.tokenizer.padding_side = "left"
    texts = [prompt(proc, 1, "red"), prompt(proc, 2, "compare two and")]
    return dict(proc(images=make_images(), text=texts, return_tensors="pt", padding=True))


def batch(family: str, dtype: torch.dtype = torch.float32) -> dict:
    """2 prompts (1 image, then 2; left padded) over the 3 images of IMAGE_SIZES; a fresh dict (tensors shared)."""
    out = dict(_batch(family))
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out
