"""Tiny random LLaVA models, word-level tokenizers and processors built in code (no hub, no network).

Used by the tests, the tiny training config and ToyWorld; the same objects save and load with the usual
`save_pretrained` / `from_pretrained`, so the real loading paths are exercised on local directories.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

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


def tiny_tokenizer(words: Sequence[str] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over `words` plus the special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation(behavior="isolated")])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
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
    import torch

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = tiny_llava_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id, **config_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


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
