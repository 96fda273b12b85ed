"""The tiny LLaVA-NeXT and LLaVA-OneVision builders of data/tiny.py: real processors agree with the models' packing.

A batch of two prompts (one image, then two images separated by text), images of three aspect ratios, left padding:
the processor's <image> expansion of every image has exactly the length of that image's packed features from the
model's own `get_image_features` (base view, unpadded tiles, one image_newline per row), the batch runs through the
forward, and the processors survive save_pretrained / from_pretrained.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.processors import load_processor
from data.tiny import (
    TinyLlavaOnevisionProcessor,
    tiny_llava_next,
    tiny_llava_next_processor,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
    tiny_llava_onevision_tokenizer,
    tiny_tokenizer,
)

FAMILIES = ("llava_next", "llava_onevision")
SIZES = [(40, 20), (20, 60), (50, 50)]  # (width, height): aspect ratios 2, 1/3 and 1
PROMPTS = ["USER : <image> what is the color ? ASSISTANT :",
           "USER : <image> left <image> right how many are there ? ASSISTANT :"]
BASE = 16  # a 32-pixel tile in 8-pixel patches: 4 x 4
# <image> tokens per image: base 16 + rows x cols unpadded tile tokens + one newline per row
EXPECTED = {
    # 40x20 -> grid 32x64 (1x2 tiles): 4 rows x 8; 20x60 -> 64x32 (2x1): 8 x 4 unpadded to 8 x 2; 50x50 -> 64x64: 8 x 8
    "llava_next": [BASE + 4 * 8 + 4, BASE + 8 * 2 + 8, BASE + 8 * 8 + 8],
    # the one-image prompt as LLaVA-NeXT; each image of the two-image prompt: its base view and one newline
    "llava_onevision": [BASE + 4 * 8 + 4, BASE + 1, BASE + 1],
}
INPUT_KEYS = ("pixel_values", "image_sizes", "batch_num_images")


def images(sizes=SIZES) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def built(family):
    if family == "llava_next":
        tokenizer = tiny_tokenizer()
        return tiny_llava_next_processor(tokenizer), tiny_llava_next(tokenizer)
    tokenizer = tiny_llava_onevision_tokenizer()
    return tiny_llava_onevision_processor(tokenizer), tiny_llava_onevision(tokenizer)


def encode(processor, prompts=PROMPTS, sizes=SIZES, counts=(1, 2)):
    ims, nested = images(sizes), []
    for c in counts:  # images per prompt (LLaVA-OneVision tells one- from multi-image prompts by the nesting)
        nested, ims = nested + [ims[:c]], ims[c:]
    return processor(images=nested, text=prompts, return_tensors="pt", padding=True)


def image_runs(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Lengths of the runs of <image> tokens, row by row: one run per image when text separates the images."""
    runs = []
    for row in input_ids.tolist():
        n = 0
        for tok in row + [None]:
            if tok == image_token_id:
                n += 1
            elif n:
                runs, n = runs + [n], 0
    return runs


def packed(model, enc) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.model.get_image_features(**{k: enc[k] for k in INPUT_KEYS if k in enc})
    assert isinstance(out.pooler_output, (list, tuple))
    return list(out.pooler_output)


def test_processor_layout(family, built):
    processor, _ = built
    enc = encode(processor)
    assert processor.tokenizer.padding_side == "left"
    assert enc["attention_mask"][:, -1].all() and not enc["attention_mask"].all()  # left padding
    assert enc["image_sizes"].tolist() == [[h, w] for w, h in SIZES]
    # pixel_values: (images, most views, 3, 32, 32), zero-padded on the view axis; base view first, then tiles
    views = [3, 3, 5] if family == "llava_next" else [3, 1, 1]  # OneVision multi-image: the base view only
    assert tuple(enc["pixel_values"].shape) == (3, max(views), 3, 32, 32)
    for i, v in enumerate(views):
        assert enc["pixel_values"][i, v - 1].abs().sum() > 0 and enc["pixel_values"][i, v:].abs().sum() == 0
    if family == "llava_onevision":
        assert enc["batch_num_images"].tolist() == [1, 2]


def test_expanded_tokens_match_packed_features(family, built):
    processor, model = built
    enc = encode(processor)
    runs = image_runs(enc["input_ids"], processor.image_token_id)
    features = packed(model, enc)
    assert runs == [f.shape[0] for f in features] == EXPECTED[family]
    if family == "llava_next":
        assert len(set(runs)) == 3  # three aspect ratios, three token counts
        assert processor._get_num_multimodal_tokens(image_sizes=enc["image_sizes"].tolist()).num_image_tokens == runs
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape
    assert torch.isfinite(logits).all()


def test_packed_layout(family, built):
    """Packed features: BASE base-view tokens, then rows of unpadded tokens each closed by the image_newline."""
    processor, model = built
    features = packed(model, encode(processor))
    newline = model.model.image_newline.detach()
    for f in features:
        is_newline = (f == newline).all(-1)
        assert not is_newline[:BASE].any() and is_newline[-1]
        positions = is_newline.nonzero().flatten() - BASE
        width = positions[0].item() + 1  # unpadded columns + the newline
        assert positions.tolist() == list(range(width - 1, f.shape[0] - BASE, width))


def test_onevision_single_images_anyres_max():
    """One image per prompt: OneVision tiles every image; a large one is shrunk to about anyres_max_9 tiles."""
    tokenizer = tiny_llava_onevision_tokenizer()
    processor, model = tiny_llava_onevision_processor(tokenizer), tiny_llava_onevision(tokenizer)
    sizes = [(40, 20), (20, 60), (120, 200)]
    prompts = ["USER : <image> what is the color ? ASSISTANT :"] * 3
    enc = encode(processor, prompts, sizes, counts=(1, 1, 1))
    runs = image_runs(enc["input_ids"], processor.image_token_id)
    # 120x200 -> grid 192x128 (6x4 tiles): 24 x 16, unpadded 24 x 14 (336 > 9 * 16 * 1.1^2), shrunk by
    # sqrt(336 / 144) to 15 x 9
    assert runs == [f.shape[0] for f in packed(model, enc)] == [BASE + 36, BASE + 24, BASE + 15 * 9 + 15]
    assert processor._get_num_multimodal_tokens(image_sizes=enc["image_sizes"].tolist()).num_image_tokens == runs
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()


def test_save_load_round_trip(family, built, tmp_path):
    processor, _ = built
    processor.save_pretrained(tmp_path)
    loaders = [load_processor]
    if family == "llava_next":
        from transformers import AutoProcessor

        loaders.append(AutoProcessor.from_pretrained)
    else:
        loaders.append(TinyLlavaOnevisionProcessor.from_pretrained)
    ref = encode(processor)
    for load in loaders:
        loaded = load(tmp_path)
        assert type(loaded) is type(processor)
        enc = encode(loaded)
        assert torch.equal(enc["input_ids"], ref["input_ids"])
        assert torch.allclose(enc["pixel_values"], ref["pixel_values"])
        assert torch.equal(enc["image_sizes"], ref["image_sizes"])
