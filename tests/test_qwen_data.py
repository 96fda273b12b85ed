"""LLaVA conversation JSON through Qwen2-VL / Qwen2.5-VL / Qwen3-VL processors: the dataset, the collator (left
padding, image_grid_thw, mm_token_type_ids, flat pixel_values, answer-only labels, prompt_end, image_sizes,
max_length) and the datamodule, on files written to tmp_path, with tiny code-built processors and models.

Video records are not covered: Qwen's video processors need torchvision, which learnprune does not install."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_images, turns
from data import IGNORE_INDEX, LlavaCollator, LlavaDataModule, LlavaJsonDataset
from data.llava_json import record_to_messages
from data.tiny import QWEN_FAMILIES, tiny_qwen, tiny_qwen_processor, tiny_qwen_tokenizer

SIZES = {"a.png": (100, 60), "b.png": (64, 130), "c.png": (90, 90), "d.png": (120, 50)}  # (width, height)
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


GOOD = [
    {"id": "q1", "image": "a.png", "conversations": turns(("<image>\nwhat is the color ?", "red"))},
    {"id": "q2", "image": "b.png",
     "conversations": turns(("<image>\nhow many ?", "two"), ("what shape is left ?", "a circle ."))},
    {"id": "q3", "image": ["a.png", "c.png"],
     "conversations": turns(("<image> <image>\ncompare the color and shape .", "the same"))},
    {"id": "q4", "image": ["c.png", "d.png"],
     "conversations": turns(("<image>\nwhat is the shape ?", "square"), ("and this ? <image>", "a triangle"))},
]
ANSWERS = {"q1": ["red"], "q2": ["two", "a circle ."], "q3": ["the same"], "q4": ["square", "a triangle"]}
IMAGES = {"q1": ["a.png"], "q2": ["b.png"], "q3": ["a.png", "c.png"], "q4": ["c.png", "d.png"]}
BAD = [
    {"id": "missing", "image": "nope.png", "conversations": turns(("<image>\nwhat ?", "red"))},
    {"id": "missing2", "image": ["a.png", "nope.png"], "conversations": turns(("<image> <image>\nwhat ?", "red"))},
    {"id": "corrupt", "image": "corrupt.png", "conversations": turns(("<image>\nwhat ?", "red"))},
    {"id": "notoken", "image": "a.png", "conversations": turns(("what is the color ?", "red"))},
    {"id": "fewer", "image": ["a.png", "c.png"], "conversations": turns(("<image>\nwhat ?", "red"))},
    {"id": "extra", "image": "a.png", "conversations": turns(("<image> what ?", "red"), ("<image> how ?", "no"))},
    {"id": "extra2", "image": ["a.png", "c.png"], "conversations": turns(("<image> <image> <image> what ?", "red"))},
    {"id": "text", "conversations": turns(("what is the color ?", "red"))},
    {"id": "badlist", "image": ["a.png", 3], "conversations": turns(("<image> <image> what ?", "red"))},
]
SKIPS = {"missing_image": 2, "no_image_token": 2, "extra_image_token": 2, "text_only": 1, "malformed": 1}


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for name, im in zip(SIZES, make_images(tuple(SIZES.values()))):
        im.save(tmp_path / "img" / name)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (tmp_path / "train.json").write_text(json.dumps(GOOD + BAD))
    return tmp_path


_CACHE: dict = {}


def qwen(family):
    """(processor, model) of a family, built once per session."""
    if family not in _CACHE:
        tokenizer = tiny_qwen_tokenizer(family=family)
        _CACHE[family] = tiny_qwen_processor(family, tokenizer), tiny_qwen(family, tokenizer)
    return _CACHE[family]


@pytest.fixture(params=QWEN_FAMILIES)
def family(request):
    return request.param


def _items(data_dir, processor):
    ds = LlavaJsonDataset(data_dir / "train.json", data_dir / "img", processor)
    return ds, [ds[i] for i in range(len(ds))]


def _forward(model, batch):
    with torch.no_grad():
        out = model(**{k: batch[k] for k in MODEL_INPUTS}, labels=batch["labels"])
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    return out


def _runs(mask):
    runs, cur = [], []
    for c, m in enumerate(mask.tolist()):
        if m:
            cur.append(c)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_tiny_qwen_builders(family):
    processor, model = qwen(family)
    tok = processor.tokenizer
    assert processor.image_token == "<|image_pad|>" and processor.image_token_id == model.config.image_token_id
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": "what ?"}]}],
                                         tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what ?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n") == (family != "qwen3_vl")  # Qwen2/2.5 default system prompt
    assert tok.unk_token_id not in tok(text)["input_ids"]
    with pytest.raises(ValueError, match="qwen2_vl"):
        tiny_qwen_processor("llava")


def test_dataset_skips_and_multi_image_items(data_dir, family):
    processor, _ = qwen(family)
    ds, items = _items(data_dir, processor)
    assert dict(ds.skipped) == {**SKIPS, "unreadable_image": 1}
    assert ds.init_skipped == SKIPS
    assert len(ds) == 5 and sum(it is None for it in items) == 1
    by_id = {it["id"]: it for it in items if it is not None}
    for rid, names in IMAGES.items():
        it = by_id[rid]
        assert it["image_sizes"] == [(SIZES[n][1], SIZES[n][0]) for n in names]  # (height, width), original
        assert [im.size for im in it["images"]] == [SIZES[n] for n in names]
        assert ("image" in it) == (len(names) == 1)
    assert by_id["q3"]["messages"][0]["content"] == [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "compare the color and shape ."}]
    assert by_id["q4"]["messages"][2]["content"] == [{"type": "text", "text": "and this ?"}, {"type": "image"}]


def test_collate_matches_processor_and_labels_are_answers(data_dir, family):
    processor, model = qwen(family)
    tok = processor.tokenizer
    _, items = _items(data_dir, processor)
    kept = [it for it in items if it is not None]
    batch = LlavaCollator(processor)(items)
    assert batch["skipped"] == 1
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    B, L = ids.shape
    assert B == 4 and [it["id"] for it in kept] == ["q1", "q2", "q3", "q4"]

    # what the processor itself gives for the same rendered texts and images
    texts = [processor.apply_chat_template(it["messages"], tokenize=False) for it in kept]
    images = [im for it in kept for im in it["images"]]
    ref = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "pixel_values"):
        assert torch.equal(batch[key], ref[key]), key

    # left padding
    assert mask[:, -1].all() and (mask.sum(1) < L).any()
    for row in range(B):
        n = int(mask[row].sum())
        assert not mask[row, : L - n].any() and (ids[row, : L - n] == tok.pad_token_id).all()

    # one grid per image, in batch order; each image's grid and pixels are those of the image processed alone
    image_id, start_id, end_id = (tok.convert_tokens_to_ids(t) for t in
                                  ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    grid, pixels = batch["image_grid_thw"], batch["pixel_values"]
    assert grid.shape == (len(images), 3) and pixels.shape[0] == int(grid.prod(-1).sum())
    patch = processor.image_processor.patch_size
    assert pixels.shape[1] == 3 * 2 * patch * patch
    offset = 0
    for i, im in enumerate(images):
        alone = processor.image_processor(images=[im], return_tensors="pt")
        assert torch.equal(grid[i], alone["image_grid_thw"][0])
        n = int(grid[i].prod())
        assert torch.equal(pixels[offset: offset + n], alone["pixel_values"])
        offset += n
    # image_sizes: the original (height, width) of every image, not the resized ones
    assert batch["image_sizes"].tolist() == [[SIZES[n][1], SIZES[n][0]] for it in kept for n in IMAGES[it["id"]]]
    assert len(set(map(tuple, grid.tolist()))) > 1  # images of different sizes in one batch

    # mm_token_type_ids marks exactly the image tokens; each image is <|vision_start|> N_i x pad <|vision_end|>
    assert torch.equal(batch["mm_token_type_ids"], (ids == image_id).long())
    counts = (grid.prod(-1) // 4).tolist()
    k = 0
    for row, it in enumerate(kept):
        row_ids = ids[row].tolist()
        starts = [c for c, t in enumerate(row_ids) if t == start_id]
        assert len(starts) == len(it["images"])
        for s in starts:
            assert row_ids[s + 1: s + 1 + counts[k]] == [image_id] * counts[k] and row_ids[s + 1 + counts[k]] == end_id
            k += 1
    assert k == len(images)

    # labels: exactly each answer's tokens + <|im_end|>, each run right after "<|im_start|> assistant"
    im_start, assistant, im_end = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "assistant", "<|im_end|>"))
    for row, it in enumerate(kept):
        lab = labels[row] != IGNORE_INDEX
        assert torch.equal(labels[row][lab], ids[row][lab]) and not (lab & (ids[row] == image_id)).any()
        runs = _runs(lab)
        expected = [tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"] for a in ANSWERS[it["id"]]]
        assert [ids[row, r].tolist() for r in runs] == expected
        assert [tok.decode(ids[row, r]) for r in runs] == [a + " <|im_end|>" for a in ANSWERS[it["id"]]]
        assert all(ids[row, r[-1]] == im_end and ids[row, r[0] - 2: r[0]].tolist() == [im_start, assistant]
                   for r in runs)
        # prompt_end: the last column of the first prompt, recomputed from the rendered template alone
        first = it["messages"][:1]
        prompt = processor.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
        n_img = sum(c["type"] == "image" for c in first[0]["content"])
        prompt_ids = processor(text=[prompt], images=it["images"][:n_img], return_tensors="pt")["input_ids"][0]
        begin = L - int(mask[row].sum())
        pe = int(batch["prompt_end"][row])
        assert pe == begin + len(prompt_ids) - 1 == runs[0][0] - 1
        assert torch.equal(ids[row, begin: pe + 1], prompt_ids)

    # the batch runs through the real model's own forward
    _forward(model, batch)


def test_collate_max_length_trims_turns_and_their_images(data_dir, family):
    processor, model = qwen(family)
    tok = processor.tokenizer
    _, items = _items(data_dir, processor)
    kept = {it["id"]: it for it in items if it is not None}
    full = LlavaCollator(processor)(items)
    lengths = dict(zip(kept, full["attention_mask"].sum(1).tolist()))

    def first_pair(rid):
        it = kept[rid]
        n_img = sum(c["type"] == "image" for c in it["messages"][0]["content"])
        text = processor.apply_chat_template(it["messages"][:2], tokenize=False)
        return len(processor(text=[text], images=it["images"][:n_img])["input_ids"][0])

    limit = max(lengths["q1"], first_pair("q2"), first_pair("q4"))
    assert lengths["q2"] > limit and lengths["q3"] > limit and lengths["q4"] > limit
    batch = LlavaCollator(processor, max_length=limit)(items)
    assert batch["skipped"] == 2  # the corrupt image + q3 (a single pair, too long)
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= limit
    assert batch["attention_mask"].sum(1).tolist() == [lengths["q1"], first_pair("q2"), first_pair("q4")]
    answers = [tok.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    assert answers == ["red <|im_end|>", "two <|im_end|>", "square <|im_end|>"]
    # q4's second image left with its turn: grids, pixels, sizes and mm_token_type_ids follow
    names = ["a.png", "b.png", "c.png"]
    assert batch["image_sizes"].tolist() == [[SIZES[n][1], SIZES[n][0]] for n in names]
    assert batch["image_grid_thw"].shape[0] == 3
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    image_id = processor.image_token_id
    assert int(batch["mm_token_type_ids"].sum()) == int((batch["input_ids"] == image_id).sum()) \
        == int((batch["image_grid_thw"].prod(-1) // 4).sum())
    _forward(model, batch)
    assert LlavaCollator(processor, max_length=5)(items) == {"skipped": 5}


def test_dataset_max_length_prefilter(data_dir, family):
    processor, _ = qwen(family)
    # text-only lengths (each image placeholder unexpanded: 3 tokens) are a lower bound of the expanded ones; the
    # corrupt record is only found out when decoded, so it is among the checked ones
    checked = GOOD + [r for r in BAD if r["id"] == "corrupt"]
    plain = [len(processor.tokenizer(processor.apply_chat_template(record_to_messages(r["conversations"]),
                                                                   tokenize=False))["input_ids"]) for r in checked]
    limit = sorted(plain)[2]
    ds = LlavaJsonDataset(data_dir / "train.json", data_dir / "img", processor, max_length=limit)
    assert ds.skipped["too_long"] == sum(n > limit for n in plain) > 0
    assert len(ds) == len(checked) - ds.skipped["too_long"]


def test_datamodule_with_qwen_processor(data_dir, family):
    processor, model = qwen(family)
    dm = LlavaDataModule(image_root=str(data_dir / "img"), train_json=str(data_dir / "train.json"), batch_size=2)
    dm.set_processor(processor)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(b["skipped"] for b in batches) == 1
    answers = sorted(processor.tokenizer.decode(row[row != IGNORE_INDEX])
                     for b in batches if "input_ids" in b for row in b["labels"])
    assert answers == sorted(" <|im_end|> ".join(a) + " <|im_end|>" for a in ANSWERS.values())
    for b in batches:
        dm.record_skipped(b, stage="train", epoch=0)
        if "input_ids" in b:
            _forward(model, b)
    assert dm.skip_summary("train") == (
        "train: skipped 8 of 13 records: malformed=1, text_only=1, no_image_token=2, extra_image_token=2, "
        "missing_image=2; dropped at load (epoch 0): 1")
