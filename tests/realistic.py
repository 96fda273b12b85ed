"""Builders for the realistic-geometry test tier (tests/test_realistic.py): LLaVA-1.5-7B geometry at tiny depth.

The models come from `data.tiny.llava15_geometry_llava` (CLIP ViT-L/336: 576 tokens of a 24 x 24 grid; Llama with
head_dim 128), the processors from `data.tiny.llava15_processor` (a real `LlavaProcessor` over llava-hf's CLIP
image processing or the pad-to-square one). Each model variant is built once per test session (`model`), its
eager twin shares its weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch
from PIL import Image

from data.tiny import llava15_geometry_llava, llava15_image_processor, llava15_processor, tiny_tokenizer

GRID = 24
N = GRID * GRID  # visual tokens per image ("default" strategy: [CLS] dropped)

# Two prompts of different lengths (left padding), two images each: (width, height) of the originals.
PROMPTS = [
    "USER : <image> <image> what is the color of the circle in the image ? ASSISTANT :",
    "USER : <image> and <image> how many ? ASSISTANT :",
]
IMAGE_SIZES = ((640, 480), (300, 600), (400, 400), (500, 280))
IMAGES_PER_PROMPT = 2


@dataclass(frozen=True)
class Variant:
    """One realistic model: config overrides of `llava15_geometry_llava` and a dtype."""

    name: str
    config: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @property
    def strategy(self) -> str:
        return self.config.get("vision_feature_select_strategy", "default")

    @property
    def num_tokens(self) -> int:
        return N + (self.strategy == "full")

    @property
    def feature_layers(self) -> list[int]:
        layer = self.config.get("vision_feature_layer", -2)
        return [layer] if isinstance(layer, int) else list(layer)


VARIANTS = {
    v.name: v for v in (
        Variant("gqa"),  # 4 query heads, 2 key/value heads; vision_feature_layer=-2, "default" strategy
        Variant("mha-full", {"kv_heads": 4, "vision_feature_select_strategy": "full"}),  # 577 tokens, [CLS] kept
        Variant("mha-layers", {"kv_heads": 4, "vision_feature_layer": [-2, -1]}),  # features of 2 layers concatenated
        Variant("gqa-bf16", dtype=torch.bfloat16),
    )
}


@cache
def tokenizer():
    return tiny_tokenizer()


@cache
def model(variant: str, impl: str = "sdpa"):
    """The variant's model with attention `impl`; every impl of one variant has the same weights (seed 0)."""
    v = VARIANTS[variant]
    return llava15_geometry_llava(tokenizer(), seed=0, dtype=v.dtype, attn_implementation=impl, **v.config)


@cache
def processor(image_processing: str = "crop", strategy: str = "default"):
    """"crop": llava-hf's CLIP image processor; "llava-crop": LlavaImageProcessor with do_pad=False (the same
    processing under the class newer llava-hf configs name); "pad": LlavaImageProcessor with do_pad=True."""
    if image_processing == "llava-crop":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        crop = llava15_image_processor("crop")
        ip = LlavaImageProcessorPil(do_pad=False, **{k: getattr(crop, k) for k in (
            "size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
            "image_mean", "image_std", "resample", "do_convert_rgb")})
        return llava15_processor(tokenizer(), vision_feature_select_strategy=strategy, image_processor=ip)
    return llava15_processor(tokenizer(), image_processing, strategy)


def make_images(sizes=IMAGE_SIZES, seed: int = 0) -> list[Image.Image]:
    """Random-noise RGB images of the given (width, height): 8 x 8 pixel blocks, cheap to make at any size.
    Image i depends on (seed, i) only."""
    images = []
    for i, (w, h) in enumerate(sizes):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        small = (torch.rand((h + 7) // 8, (w + 7) // 8, 3, generator=gen) * 255).to(torch.uint8).numpy()
        images.append(Image.fromarray(small).resize((w, h), Image.NEAREST))
    return images


def make_batch(proc, prompts=PROMPTS, images: slice = slice(None), dtype: torch.dtype = torch.float32) -> dict:
    """Processor output for `prompts` (left padded) over `make_images()[images]`, with `image_sizes`
    (n_images, 2) = original (height, width)."""
    images = make_images()[images]
    sizes = [im.size for im in images]
    proc.tokenizer.padding_side = "left"
    inputs = dict(proc(images=images, text=list(prompts), return_tensors="pt", padding=True))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    inputs["image_sizes"] = torch.tensor([[h, w] for w, h in sizes])
    return inputs


def text_inputs(batch: dict) -> dict:
    """What the unpruned HF model takes (it reads `image_sizes` as anyres splits, so leave them out)."""
    return {k: v for k, v in batch.items() if k != "image_sizes"}

