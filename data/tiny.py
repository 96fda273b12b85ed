"""Tiny models built in code and a tiny synthetic workspace for smoke-scale training runs.

The builders (`tiny_tokenizer`, `tiny_llava_config`, `tiny_llava`, `tiny_llava_processor`; for Qwen2-VL,
Qwen2.5-VL and Qwen3-VL `tiny_qwen_tokenizer`, `tiny_qwen_processor(family)`, `tiny_qwen(family)`; for the AnyRes
families `tiny_llava_next_processor` / `tiny_llava_next` and `tiny_llava_onevision_tokenizer` /
`tiny_llava_onevision_processor` / `tiny_llava_onevision`) make random tiny models, word-level tokenizers and real
processors with no hub and no network; the tests, ToyWorld and the
workspace writer use them. The workspace is a random tiny LLaVA saved with its processor, and LLaVA-format JSON
splits over small images of coloured shapes.

    python -m data.tiny outputs/tiny     # then: python -m trainer fit --config configs/tiny.yaml
    python -m data.tiny outputs/tiny15 --geometry llava15   # LLaVA-1.5-7B geometry at tiny depth (see below)
    python -m data.tiny outputs/tiny_qwen25vl --family qwen2_5_vl  # then: configs/tiny_qwen25vl.yaml
    python -m data.tiny outputs/tiny_qwen3vl --family qwen3_vl     # then: configs/tiny_qwen3vl.yaml
    python -m data.tiny outputs/tiny_llava_next --family llava_next            # then: configs/tiny_llava_next.yaml
    python -m data.tiny outputs/tiny_llava_onevision --family llava_onevision  # configs/tiny_llava_onevision.yaml

The model is random: this exercises the real loading, data and training paths, it does not learn anything
meaningful. ToyWorld (data/toyworld.py) is the world in which pruning quality is measurable.

`geometry="llava15"` writes a model with the real LLaVA-1.5-7B geometry where it matters and tiny depth where it
does not: a CLIP ViT-L/336 vision tower (hidden 1024, 16 heads of 64, MLP 4096, 336-pixel images, 14-pixel
patches: 24 x 24 = 576 tokens) with 2 layers, `vision_feature_layer=-2`, a two-layer GELU projector and a Llama
language model with head_dim 128 (hidden 512 = 4 heads x 128, GQA with 2 key/value heads by default) and 3 layers,
over the code-built word-level tokenizer. Its processor is a real `LlavaProcessor` with the image processing
llava-hf/llava-1.5-7b-hf ships (CLIP: resize the shortest edge to 336, centre crop 336 x 336, CLIP mean/std), or
the original LLaVA-1.5 pad-to-square one (`image_processing="pad"`).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

# Tiny random LLaVA models, word-level tokenizers and processors built in code (no hub, no network): used by the
# tests, the tiny workspace and ToyWorld; they save and load with the usual save_pretrained / from_pretrained.

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
DEFAULT_WORDS = (
    "USER", "ASSISTANT", ":", "what", "is", "the", "color", "shape", "of", "a", "an", "in", "image", "?", ".",
    "red", "green", "blue", "yellow", "circle", "square", "triangle", "yes", "no", "one", "two", "three",
    "left", "right", "top", "bottom", "how", "many", "are", "there", "describe", "it", "this",
)

# USER: <image>\n{question} ASSISTANT: {answer}</s>  (LLaVA-1.5 conversation style, word-level)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}"
    "{% else %}ASSISTANT : "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def tiny_tokenizer(words: Sequence[str] = DEFAULT_WORDS, video_token: str | None = None) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over `words` plus the special tokens; `video_token` (e.g.
    "<video>", which LLaVA-OneVision's processor and config name) adds one more special token after them."""
    specials = SPECIAL_TOKENS + ((video_token,) if video_token else ())
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation(behavior="isolated")])
    named = {"image_token": "<image>", **({"video_token": video_token} if video_token else {})}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", extra_special_tokens=named,
    )
    tok.add_special_tokens({"additional_special_tokens": list(named.values())})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llava_config(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    text_hidden: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    attn_implementation: str = "sdpa",
    vision_feature_layer: int = -2,
) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, pad_token_id=pad_token_id, tie_word_embeddings=False,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                      vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
                      tie_word_embeddings=False)
    cfg.pad_token_id = pad_token_id
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_llava(tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0,
               **config_kwargs) -> LlavaForConditionalGeneration:
    """A randomly initialised LlavaForConditionalGeneration (CLIP vision + Llama text), in eval mode."""

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = tiny_llava_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id, **config_kwargs)
    return _random_model(LlavaForConditionalGeneration, cfg, tokenizer, seed)


def tiny_llava_processor(tokenizer: PreTrainedTokenizerFast | None = None, image_size: int = 32,
                         patch_size: int = 8, pad_to_square: bool = True) -> LlavaProcessor:
    """A real LlavaProcessor: LLaVA-1.5 pad-to-square image processing and <image> expansion."""
    tokenizer = tokenizer or tiny_tokenizer()
    image_processor = LlavaImageProcessorPil(
        do_pad=pad_to_square, size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


# -- tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL ------------------------------------------------------------------------
# Same idea as the LLaVA builders: a word-level tokenizer with Qwen's special tokens and a Qwen-style chat template,
# the family's real processor class and a random tiny model, all in code. The processors have no video processor:
# Qwen's video processors import torchvision, which learnprune does not depend on (images only).

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
QWEN_WORDS = DEFAULT_WORDS + ("system", "user", "assistant", "You", "are", "helpful", "compare", "and", "same", ",")

# The structure of the templates Qwen ships, word-level: one `<|vision_start|><|image_pad|><|vision_end|>` per image
# item (the processor expands `<|image_pad|>` to the image's merged-token count), `<|im_end|>` closes every turn.
_QWEN_TURNS = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
)
# Qwen2-VL / Qwen2.5-VL: a default system prompt when the conversation has none.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant .<|im_end|>\n{% endif %}" + _QWEN_TURNS + "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL (Instruct): no default system prompt.
QWEN3_CHAT_TEMPLATE = ("{% for message in messages %}" + _QWEN_TURNS + "{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _check_family(family: str) -> None:
    if family not in QWEN_FAMILIES:
        raise ValueError(f"family={family!r}: use one of {QWEN_FAMILIES}")


def qwen_chat_template(family: str) -> str:
    _check_family(family)
    return QWEN3_CHAT_TEMPLATE if family == "qwen3_vl" else QWEN2_CHAT_TEMPLATE


def tiny_qwen_tokenizer(words: Sequence[str] = QWEN_WORDS, family: str = "qwen2_5_vl") -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over `words` plus Qwen's special tokens (`<|endoftext|>` pads,
    `<|im_end|>` ends turns), with `family`'s chat template."""
    vocab = {tok: i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation(behavior="isolated")])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[2:])})
    tok.chat_template = qwen_chat_template(family)
    return tok


class _ImagesOnly:
    """Accept `video_processor=None` (the stock class check rejects it when torchvision is missing), and leave the
    video processor out of `save_pretrained` / `from_pretrained` (`data.processors.load_processor` loads a saved
    one; `AutoProcessor` does not know these classes)."""

    @classmethod
    def get_attributes(cls):
        return [name for name in super().get_attributes() if name != "video_processor"]

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class TinyQwen2VLProcessor(_ImagesOnly, Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor."""


class TinyQwen2_5_VLProcessor(_ImagesOnly, Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without a video processor."""


class TinyQwen3VLProcessor(_ImagesOnly, Qwen3VLProcessor):
    """Qwen3VLProcessor without a video processor."""


_QWEN_PROCESSORS = {"qwen2_vl": TinyQwen2VLProcessor, "qwen2_5_vl": TinyQwen2_5_VLProcessor,
                    "qwen3_vl": TinyQwen3VLProcessor}


def qwen_patch_size(family: str) -> int:
    _check_family(family)
    return 16 if family == "qwen3_vl" else 14


def tiny_qwen_processor(family: str, tokenizer: PreTrainedTokenizerFast | None = None, min_tokens: int = 4,
                        max_tokens: int = 16):
    """The family's real processor (Qwen2VLProcessor, Qwen2_5_VLProcessor or Qwen3VLProcessor; images only) over
    a Qwen2VL image processor with the family's patch size (14, or 16 for Qwen3-VL) and merge size 2.

    `smart_resize` keeps every image between `min_tokens` and `max_tokens` merged tokens (the real processors'
    min_pixels / max_pixels, divided by (2 * patch)^2), so images of different sizes get different token counts.
    """
    patch = qwen_patch_size(family)
    tokenizer = tokenizer or tiny_qwen_tokenizer(family=family)
    factor = 2 * patch
    kwargs = {}
    if family == "qwen3_vl":
        kwargs = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": min_tokens * factor ** 2, "longest_edge": max_tokens * factor ** 2}, **kwargs,
    )
    return _QWEN_PROCESSORS[family](image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=qwen_chat_template(family))


def tiny_qwen_config(family: str, tokenizer: PreTrainedTokenizerFast, text_hidden: int = 64, text_layers: int = 4,
                     heads: int = 4, kv_heads: int = 2, attn_implementation: str = "eager"):
    """A tiny config of the family: 2-4 vision blocks, Qwen2.5-VL windows of 2x2 merged tokens with blocks 1 and 3
    full attention, Qwen3-VL DeepStack after vision blocks 0-2 and interleaved M-RoPE."""
    _check_family(family)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    patch = qwen_patch_size(family)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    head_dim = text_hidden // heads
    text = dict(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"))
    half = head_dim // 2  # mrope_section splits the head_dim / 2 rotary frequencies into (T, H, W)
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    vision = dict(patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, num_heads=4)
    if family == "qwen2_vl":
        cfg = Qwen2VLConfig(vision_config=dict(depth=2, embed_dim=32, hidden_size=text_hidden, mlp_ratio=2, **vision),
                            text_config=dict(**text, rope_parameters=rope), **common)
    elif family == "qwen2_5_vl":
        cfg = Qwen2_5_VLConfig(
            vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, out_hidden_size=text_hidden,
                               window_size=2 * 2 * patch, fullatt_block_indexes=[1, 3], **vision),
            text_config=dict(**text, rope_parameters=rope), **common)
    else:
        cfg = Qwen3VLConfig(
            vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, out_hidden_size=text_hidden,
                               num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2], **vision),
            text_config=dict(**text, head_dim=head_dim, rope_parameters={**rope, "mrope_interleaved": True}),
            **common)
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_qwen(family: str, tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, **config_kwargs):
    """A randomly initialised Qwen2VL / Qwen2_5_VL / Qwen3VL ForConditionalGeneration (see `tiny_qwen_config`), in
    eval mode, over `tiny_qwen_tokenizer`'s vocabulary."""

    _check_family(family)
    tokenizer = tokenizer or tiny_qwen_tokenizer(family=family)
    cfg = tiny_qwen_config(family, tokenizer, **config_kwargs)
    cls = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": Qwen3VLForConditionalGeneration}[family]
    return _random_model(cls, cfg, tokenizer, seed)


# -- tiny LLaVA-NeXT / LLaVA-OneVision (AnyRes) --------------------------------------------------------------------
# The families' real processor classes and random tiny models at a 32-pixel tile (patch 8: 4 x 4 = 16 tokens per
# tile), with the real grid pinpoints scaled by 32 / 336 (LLaVA-NeXT) and 32 / 384 (LLaVA-OneVision). Each image
# is a base view (the whole image resized to one tile) plus the tiles of its best grid resolution; the model packs
# the base view's 16 tokens, then the tiles' tokens laid out as one feature map, unpadded to the image's aspect
# ratio, with one image_newline after each row (OneVision: bilinearly shrunk first when larger than
# anyres_max_N tiles). The processors expand each <image> to exactly that count.

ANYRES_FAMILIES = ("llava_next", "llava_onevision")
LLAVA_NEXT_TILE = 32
LLAVA_NEXT_PATCH = 8
# llava-hf/llava-v1.6-*: [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] (height, width), 336 -> 32.
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# llava-hf/llava-onevision-*: 384 x {1..6} by 384 x {1..6} (height, width), 384 -> 32.
LLAVA_ONEVISION_PINPOINTS = [[32 * h, 32 * w] for h in range(1, 7) for w in range(1, 7)]


def _tiny_llama_text(tokenizer: PreTrainedTokenizerFast, text_hidden: int, text_layers: int, heads: int,
                     kv_heads: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )


def tiny_llava_next_processor(tokenizer: PreTrainedTokenizerFast | None = None, tile: int = LLAVA_NEXT_TILE,
                              patch_size: int = LLAVA_NEXT_PATCH,
                              image_grid_pinpoints: Sequence[Sequence[int]] = tuple(LLAVA_NEXT_PINPOINTS),
                              ) -> LlavaNextProcessor:
    """A real LlavaNextProcessor over LlavaNextImageProcessorPil at `tile`-pixel tiles (llava-hf's processing at
    336 pixels, scaled: shortest edge to `tile`, centre crop `tile` x `tile`, CLIP mean/std), CLIP's one extra [CLS]
    token and the "default" strategy: <image> becomes base (tile / patch)^2 + unpadded tile tokens + one newline
    per unpadded row."""
    tokenizer = tokenizer or tiny_tokenizer()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in image_grid_pinpoints],
    )
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)


def tiny_llava_next_config(tokenizer: PreTrainedTokenizerFast, tile: int = LLAVA_NEXT_TILE,
                           patch_size: int = LLAVA_NEXT_PATCH,
                           image_grid_pinpoints: Sequence[Sequence[int]] = tuple(LLAVA_NEXT_PINPOINTS),
                           vision_hidden: int = 32, vision_layers: int = 3, text_hidden: int = 64,
                           text_layers: int = 4, heads: int = 4, kv_heads: int = 2,
                           attn_implementation: str = "sdpa") -> LlavaNextConfig:
    """A tiny LlavaNextConfig: CLIP vision (`tile`-pixel images, `patch_size` patches, features of layer -2 without
    [CLS]), a Llama text model, `image_grid_pinpoints` as the processor's."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=heads, image_size=tile, patch_size=patch_size, projection_dim=vision_hidden,
    )
    cfg = LlavaNextConfig(
        vision_config=vision, text_config=_tiny_llama_text(tokenizer, text_hidden, text_layers, heads, kv_heads),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_grid_pinpoints=[list(p) for p in image_grid_pinpoints],
        image_seq_length=(tile // patch_size) ** 2, tie_word_embeddings=False,
    )
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_llava_next(tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0,
                    attn_implementation: str = "sdpa", **config_kwargs) -> LlavaNextForConditionalGeneration:
    """A randomly initialised LlavaNextForConditionalGeneration (see `tiny_llava_next_config`), in eval mode."""

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = tiny_llava_next_config(tokenizer, attn_implementation=attn_implementation, **config_kwargs)
    return _random_model(LlavaNextForConditionalGeneration, cfg, tokenizer, seed)


class TinyLlavaOnevisionProcessor(_ImagesOnly, LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without a video processor."""


def tiny_llava_onevision_tokenizer(words: Sequence[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """`tiny_tokenizer` with a `<video>` special token (LLaVA-OneVision's processor and config name one)."""
    return tiny_tokenizer(words, video_token="<video>")


def tiny_llava_onevision_processor(tokenizer: PreTrainedTokenizerFast | None = None, tile: int = LLAVA_NEXT_TILE,
                                   patch_size: int = LLAVA_NEXT_PATCH,
                                   image_grid_pinpoints: Sequence[Sequence[int]] = tuple(LLAVA_ONEVISION_PINPOINTS),
                                   vision_aspect_ratio: str = "anyres_max_9") -> TinyLlavaOnevisionProcessor:
    """The real LlavaOnevisionProcessor (images only) over LlavaOnevisionImageProcessorPil at `tile`-pixel tiles
    (llava-hf's processing at 384 pixels, scaled: resize to `tile` x `tile`, SigLIP mean/std 0.5), no [CLS], the
    "full" strategy. A prompt's single image becomes base (tile / patch)^2 + unpadded (anyres_max-capped) tile
    tokens + one newline per row; each image of a multi-image prompt (images=[[a, b], ...]) only its base view and
    one newline."""
    tokenizer = tokenizer or tiny_llava_onevision_tokenizer()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=[list(p) for p in image_grid_pinpoints],
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return TinyLlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
        num_image_tokens=(tile // patch_size) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio, chat_template=CHAT_TEMPLATE,
    )


def tiny_llava_onevision_config(tokenizer: PreTrainedTokenizerFast, tile: int = LLAVA_NEXT_TILE,
                                patch_size: int = LLAVA_NEXT_PATCH,
                                image_grid_pinpoints: Sequence[Sequence[int]] = tuple(LLAVA_ONEVISION_PINPOINTS),
                                vision_aspect_ratio: str = "anyres_max_9", vision_hidden: int = 32,
                                vision_layers: int = 3, text_hidden: int = 64, text_layers: int = 4, heads: int = 4,
                                kv_heads: int = 2, attn_implementation: str = "sdpa") -> LlavaOnevisionConfig:
    """A tiny LlavaOnevisionConfig: SigLIP vision without its head (`tile`-pixel images, `patch_size` patches, no
    [CLS], last layer, "full" strategy), a Qwen2 text model, the processor's pinpoints and `vision_aspect_ratio`."""
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
        num_attention_heads=heads, image_size=tile, patch_size=patch_size, vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=[list(p) for p in image_grid_pinpoints],
        vision_aspect_ratio=vision_aspect_ratio, tie_word_embeddings=False,
    )
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_llava_onevision(tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0,
                         attn_implementation: str = "sdpa",
                         **config_kwargs) -> LlavaOnevisionForConditionalGeneration:
    """A randomly initialised LlavaOnevisionForConditionalGeneration (see `tiny_llava_onevision_config`), in eval
    mode, over `tiny_llava_onevision_tokenizer`'s vocabulary."""

    tokenizer = tokenizer or tiny_llava_onevision_tokenizer()
    cfg = tiny_llava_onevision_config(tokenizer, attn_implementation=attn_implementation, **config_kwargs)
    return _random_model(LlavaOnevisionForConditionalGeneration, cfg, tokenizer, seed)


def _random_model(cls, cfg, tokenizer: PreTrainedTokenizerFast, seed: int):
    """`cls(cfg)` with weights drawn from `seed`, in eval mode, generating with the tokenizer's pad and eos."""
    import torch

    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


GEOMETRIES = ("tiny", "llava15")
IMAGE_PROCESSING = ("crop", "pad")

# LLaVA-1.5-7B's vision tower: CLIP ViT-L/14 at 336 pixels (openai/clip-vit-large-patch14-336).
LLAVA15_VISION = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "image_size": 336,
    "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
LLAVA15_IMAGE_SIZE = LLAVA15_VISION["image_size"]
LLAVA15_PATCH_SIZE = LLAVA15_VISION["patch_size"]


def llava15_geometry_config(
    tokenizer: PreTrainedTokenizerFast,
    vision_layers: int = 2,
    text_layers: int = 3,
    text_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 128,
    intermediate_size: int = 1376,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    attn_implementation: str = "sdpa",
) -> LlavaConfig:
    """A LlavaConfig with LLaVA-1.5-7B's vision geometry and head_dim, at tiny depth and width.

    The language model keeps Llama-2/Vicuna's head_dim 128, RMSNorm eps 1e-5 and RoPE theta 1e4; its width is
    text_heads * head_dim (512 by default), its MLP the 7B's ratio (11008 / 4096) of it. kv_heads < text_heads
    is GQA; kv_heads == text_heads is plain multi-head attention as in the 7B.
    """
    vision = CLIPVisionConfig(num_hidden_layers=vision_layers, **LLAVA15_VISION)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_heads * head_dim, intermediate_size=intermediate_size,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    grid = (LLAVA15_IMAGE_SIZE // LLAVA15_PATCH_SIZE) ** 2
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
        image_seq_length=grid + (vision_feature_select_strategy == "full"),
    )
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg._attn_implementation = attn_implementation
    return cfg


def llava15_geometry_llava(tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0, dtype=None,
                           **config_kwargs) -> LlavaForConditionalGeneration:
    """A randomly initialised LlavaForConditionalGeneration with LLaVA-1.5-7B geometry (see
    `llava15_geometry_config`), in eval mode; `dtype` (e.g. torch.bfloat16) casts the whole model."""
    import torch

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = llava15_geometry_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def llava15_image_processor(image_processing: str = "crop"):
    """LLaVA-1.5's image processing at 336 pixels.

    "crop": what llava-hf/llava-1.5-7b-hf ships (a CLIP image processor: bicubic resize of the shortest edge to
    336, centre crop 336 x 336, rescale, CLIP mean/std; no padding). "pad": the original LLaVA-1.5 recipe
    (`LlavaImageProcessor(do_pad=True)`: pad to a centred square in the mean colour, then the same resize).
    """
    common = {
        "size": {"shortest_edge": LLAVA15_IMAGE_SIZE},
        "crop_size": {"height": LLAVA15_IMAGE_SIZE, "width": LLAVA15_IMAGE_SIZE},
        "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "resample": PILImageResampling.BICUBIC, "do_convert_rgb": True,
    }
    if image_processing == "crop":
        return CLIPImageProcessorPil(**common)
    if image_processing == "pad":
        return LlavaImageProcessorPil(do_pad=True, **common)
    raise ValueError(f"image_processing={image_processing!r}: use one of {IMAGE_PROCESSING}")


def llava15_processor(tokenizer: PreTrainedTokenizerFast | None = None, image_processing: str = "crop",
                      vision_feature_select_strategy: str = "default", image_processor=None) -> LlavaProcessor:
    """A real LlavaProcessor for the LLaVA-1.5 geometry (patch 14, one extra [CLS] token, <image> expanded to 576
    tokens with the "default" strategy, 577 with "full"); `image_processor` replaces the one named by
    `image_processing`."""
    tokenizer = tokenizer or tiny_tokenizer()
    image_processor = image_processor or llava15_image_processor(image_processing)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=LLAVA15_PATCH_SIZE,
                          vision_feature_select_strategy=vision_feature_select_strategy,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square", "triangle")


def _draw(color: str, shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    w, h = size
    r = min(w, h) // 3
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def write_tiny_workspace(root: str | Path, n_train: int = 48, n_eval: int = 12, seed: int = 0,
                         geometry: str = "tiny", image_processing: str | None = None,
                         model_kwargs: dict | None = None, family: str = "llava") -> Path:
    """Write `model/` (random LLaVA + processor), `images/` and `train.json`, `val.json`, `test.json` under root.

    family: "llava" (the default) or one of QWEN_FAMILIES: `model/` then holds a random `tiny_qwen(family)` with
    its images-only processor (`tiny_qwen_processor`; load it with `data.processors.load_processor`, which
    DistillPruner and LlavaDataModule use) and the same splits and images (the tiny geometry only). Or one of
    ANYRES_FAMILIES: a random `tiny_llava_next` / `tiny_llava_onevision` with its processor (OneVision's images-only,
    loaded by `load_processor` too); their splits also hold two-image records (every fourth record), so batches mix
    prompts of one and two images and images of different view counts.

    geometry: "tiny" (the default: a tiny LLaVA with 32-pixel pad-to-square images) or "llava15" (LLaVA-1.5-7B
    geometry at tiny depth; images 5x larger, aspect ratios 3:8 to 8:3). image_processing: "crop" (llava-hf's CLIP
    processing, the default for "llava15") or "pad" (pad to square, the only choice for "tiny").
    model_kwargs: passed to `llava15_geometry_llava` (e.g. {"kv_heads": 4}).
    """
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry={geometry!r}: use one of {GEOMETRIES}")
    if geometry == "tiny" and image_processing not in (None, "pad"):
        raise ValueError(f"image_processing={image_processing!r}: the tiny geometry pads to square")
    if model_kwargs and geometry == "tiny":
        raise ValueError("model_kwargs only apply to geometry='llava15'")
    if family != "llava":
        if family not in ANYRES_FAMILIES:
            _check_family(family)
        if geometry != "tiny" or image_processing is not None:
            raise ValueError(f"family={family!r} takes the tiny geometry with its own image processing")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if family in ("llava", "llava_next"):
        tokenizer = tiny_tokenizer()
    elif family == "llava_onevision":
        tokenizer = tiny_llava_onevision_tokenizer()
    else:
        tokenizer = tiny_qwen_tokenizer(family=family)
    if family == "llava_next":
        tiny_llava_next(tokenizer, seed=seed).save_pretrained(root / "model")
        tiny_llava_next_processor(tokenizer).save_pretrained(root / "model")
        scale = 1
    elif family == "llava_onevision":
        tiny_llava_onevision(tokenizer, seed=seed).save_pretrained(root / "model")
        tiny_llava_onevision_processor(tokenizer).save_pretrained(root / "model")
        scale = 1
    elif family != "llava":
        tiny_qwen(family, tokenizer, seed=seed).save_pretrained(root / "model")
        tiny_qwen_processor(family, tokenizer).save_pretrained(root / "model")
        scale = 1
    elif geometry == "tiny":
        tiny_llava(tokenizer, seed=seed).save_pretrained(root / "model")
        tiny_llava_processor(tokenizer).save_pretrained(root / "model")
        scale = 1
    else:
        kwargs = dict(model_kwargs or {})
        llava15_geometry_llava(tokenizer, seed=seed, **kwargs).save_pretrained(root / "model")
        strategy = kwargs.get("vision_feature_select_strategy", "default")
        llava15_processor(tokenizer, image_processing or "crop", strategy).save_pretrained(root / "model")
        scale = 5
    rng = random.Random(seed)
    for split, count in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        records = []
        for i in range(count):
            color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
            size = (rng.randint(24, 64) * scale, rng.randint(24, 64) * scale)
            name = f"{split}_{i:04d}.png"
            _draw(color, shape, size, rng).save(root / "images" / name)
            question, answer = (("what is the color ?", color) if i % 2 == 0 else ("what is the shape ?", shape))
            if family in ANYRES_FAMILIES and i % 4 == 3:
                # a two-image record (OneVision: one view per image instead of tiles)
                second = f"{split}_{i:04d}_b.png"
                size = (rng.randint(24, 64) * scale, rng.randint(24, 64) * scale)
                _draw(rng.choice(sorted(COLORS)), shape, size, rng).save(root / "images" / second)
                records.append({"id": f"{split}-{i}", "image": [name, second], "conversations": [
                    {"from": "human", "value": "<image> left <image> right\nwhat is the shape of the left ?"},
                    {"from": "gpt", "value": shape}]})
                continue
            records.append({"id": f"{split}-{i}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
        (root / f"{split}.json").write_text(json.dumps(records, indent=1))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="outputs/tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--geometry", choices=GEOMETRIES, default="tiny")
    parser.add_argument("--image-processing", choices=IMAGE_PROCESSING, default=None,
                        help="crop (llava-hf, default for llava15) or pad (pad to square; the tiny geometry's)")
    parser.add_argument("--family", choices=("llava", *QWEN_FAMILIES, *ANYRES_FAMILIES), default="llava",
                        help="the tiny model: LLaVA (default), a tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL, or a tiny "
                             "LLaVA-NeXT / LLaVA-OneVision")
    args = parser.parse_args()
    root = write_tiny_workspace(args.root, seed=args.seed, geometry=args.geometry,
                                image_processing=args.image_processing, family=args.family)
    print(f"wrote {root}")


if __name__ == "__main__":
    main()
