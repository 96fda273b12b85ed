"""Shared fixtures: a tiny random LLaVA (CLIP vision + Llama text), a code-built tokenizer and a real processor."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from data.tiny import tiny_llava, tiny_llava_processor, tiny_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))

PROMPTS = [
    "USER : <image> what is the color of the circle ? ASSISTANT :",
    "USER : <image> how many ? ASSISTANT :",
    "USER : <image> describe this image . what shape is left ? ASSISTANT :",
]


def make_images(sizes=((40, 20), (20, 30), (32, 32)), seed: int = 0) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    images = []
    for w, h in sizes:
        pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        images.append(Image.fromarray(pixels))
    return images


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    return tiny_llava_processor(tokenizer)


@pytest.fixture(scope="session")
def sdpa_model(tokenizer):
    return tiny_llava(tokenizer, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def eager_model(tokenizer, sdpa_model):
    model = tiny_llava(tokenizer, attn_implementation="eager")
    model.load_state_dict(sdpa_model.state_dict())
    return model


@pytest.fixture(scope="session")
def batch(processor):
    """Three prompts of different lengths, left padded, with their images' original sizes."""
    images = make_images()
    inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    inputs["image_sizes"] = torch.tensor([[im.height, im.width] for im in images])
    return inputs


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """A tiny random LLaVA saved with its processor, plus LLaVA-JSON train/val/test splits (data.tiny)."""
    from data.tiny import write_tiny_workspace

    return write_tiny_workspace(tmp_path_factory.mktemp("tiny"), n_train=32, n_eval=8)


@pytest.fixture(scope="session")
def tiny_batch(tiny_workspace):
    """A fixed training batch (prompt + answer, labels on the answer) from the tiny workspace."""
    from transformers import AutoProcessor

    from data.collate import LlavaCollator
    from data.llava_json import LlavaJsonDataset

    processor = AutoProcessor.from_pretrained(tiny_workspace / "model")
    dataset = LlavaJsonDataset(tiny_workspace / "train.json", tiny_workspace / "images", processor)
    return LlavaCollator(processor)([dataset[i] for i in range(4)])


def eager_text_to_vision(attn: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_token_id: int,
                         query: str) -> list[torch.Tensor]:
    """Reference FastV scores from eager attention weights (B, H, L, L): per row, the attention of the last token
    ("last") or the mean over the real text tokens after the last image token ("text") to each image token, mean
    over heads."""
    expected = []
    for b in range(ids.shape[0]):
        slots = (ids[b] == image_token_id).nonzero()[:, 0]
        if query == "last":
            rows = torch.tensor([ids.shape[1] - 1])
        else:
            rows = torch.arange(int(slots.max()) + 1, ids.shape[1])
            rows = rows[mask[b, rows].bool()]
        expected.append(attn[b][:, rows][:, :, slots].mean(dim=0).mean(dim=0))
    return expected


def turns(*pairs: tuple[str, str]) -> list[dict]:
    """LLaVA JSON `conversations` from (human, gpt) pairs."""
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out
