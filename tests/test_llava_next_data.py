"""LLaVA conversation JSON through the LLaVA-NeXT and LLaVA-OneVision processors: the collator's batch is the
processor's own output for the same conversations (pixel_values (n_images, most views, C, H, W) zero-padded on the
view axis, image_sizes per image, OneVision's batch_num_images per prompt from images nested per prompt), labels
are exactly the answers, max_length trims turns with their images, and the datamodule's batches run through the
real tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_images, turns
from data import IGNORE_INDEX, LlavaCollator, LlavaDataModule, LlavaJsonDataset
from data.tiny import (
    tiny_llava_next,
    tiny_llava_next_processor,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
    tiny_llava_onevision_tokenizer,
    tiny_tokenizer,
)

FAMILIES = ("llava_next", "llava_onevision")
# (width, height): aspect ratios 2, 1/3, 1 and ~3: LLaVA-NeXT tiles them into 2, 2, 4 and 3 tiles
SIZES = {"a.png": (40, 20), "b.png": (20, 60), "c.png": (50, 50), "d.png": (70, 24)}
GOOD = [
    {"id": "q1", "image": "a.png", "conversations": turns(("<image>\nwhat is the color ?", "red"))},
    {"id": "q2", "image": "b.png",
     "conversations": turns(("<image>\nhow many are there ?", "two"), ("what is the shape of it ?", "a circle ."))},
    {"id": "q3", "image": ["a.png", "c.png"],
     "conversations": turns(("<image> <image>\nhow many are there ?", "two"))},
    {"id": "q4", "image": ["c.png", "d.png"],
     "conversations": turns(("<image>\nwhat is the shape ?", "square"), ("this ? <image>", "a triangle"))},
]
BAD = [{"id": "corrupt", "image": "corrupt.png", "conversations": turns(("<image>\nwhat ?", "red"))},
       {"id": "missing", "image": "nope.png", "conversations": turns(("<image>\nwhat ?", "red"))}]
ANSWERS = {"q1": ["red"], "q2": ["two", "a circle ."], "q3": ["two"], "q4": ["square", "a triangle"]}
IMAGES = {"q1": ["a.png"], "q2": ["b.png"], "q3": ["a.png", "c.png"], "q4": ["c.png", "d.png"]}
VISION_KEYS = ("pixel_values", "image_sizes", "batch_num_images")

_CACHE: dict = {}


def built(family):
    """(processor, model) of a family, built once per session."""
    if family not in _CACHE:
        if family == "llava_next":
            tokenizer = tiny_tokenizer()
            _CACHE[family] = tiny_llava_next_processor(tokenizer), tiny_llava_next(tokenizer)
        else:
            tokenizer = tiny_llava_onevision_tokenizer()
            _CACHE[family] = tiny_llava_onevision_processor(tokenizer), tiny_llava_onevision(tokenizer)
    return _CACHE[family]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for name, im in zip(SIZES, make_images(tuple(SIZES.values()))):
        im.save(tmp_path / "img" / name)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (tmp_path / "train.json").write_text(json.dumps(GOOD + BAD))
    return tmp_path


def _items(data_dir, processor):
    ds = LlavaJsonDataset(data_dir / "train.json", data_dir / "img", processor)
    return ds, [ds[i] for i in range(len(ds))]


def _reference(processor, family, texts, images_per_prompt):
    """The processor's own batch: images nested per prompt for OneVision (how it tells a lone image from several),
    the flat list for LLaVA-NeXT (as a user would call it)."""
    images = ([list(ims) for ims in images_per_prompt] if family == "llava_onevision"
              else [im for ims in images_per_prompt for im in ims])
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


def _packed_lengths(model, batch) -> list[int]:
    with torch.no_grad():
        out = model.model.get_image_features(**{k: batch[k] for k in VISION_KEYS if k in batch})
    return [f.shape[0] for f in out.pooler_output]


def _forward(model, batch):
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", *VISION_KEYS) if k in batch},
                    labels=batch["labels"])
    assert out.logits.shape[:2] == batch["input_ids"].shape
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


def test_collate_matches_processor_and_labels_are_answers(data_dir, family):
    processor, model = built(family)
    tok = processor.tokenizer
    ds, items = _items(data_dir, processor)
    assert ds.skipped == {"missing_image": 1, "unreadable_image": 1}
    kept = [it for it in items if it is not None]
    batch = LlavaCollator(processor)(items)
    assert batch["skipped"] == 1
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    B, L = ids.shape
    assert B == 4 and [it["id"] for it in kept] == ["q1", "q2", "q3", "q4"]

    texts = [processor.apply_chat_template(it["messages"], tokenize=False) for it in kept]
    ref = _reference(processor, family, texts, [it["images"] for it in kept])
    keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
    keys += ("batch_num_images",) if family == "llava_onevision" else ()
    assert set(keys) <= set(ref) and ("batch_num_images" in ref) == (family == "llava_onevision")
    for key in keys:
        assert batch[key].dtype == ref[key].dtype and torch.equal(batch[key], ref[key]), key
    assert "batch_num_images" not in batch or batch["batch_num_images"].tolist() == [1, 1, 2, 2]

    # image_sizes: the original (height, width) of every image, in batch order
    names = [n for it in kept for n in IMAGES[it["id"]]]
    assert batch["image_sizes"].tolist() == [[SIZES[n][1], SIZES[n][0]] for n in names]
    # pixel_values: every prompt's images as the image processor makes them alone, zero-padded on the view axis
    pixels = batch["pixel_values"]
    assert pixels.dim() == 5 and pixels.shape[0] == len(names) and pixels.shape[2:] == (3, 32, 32)
    k, views = 0, []
    for it in kept:
        if family == "llava_onevision":
            alone = processor.image_processor(images=[it["images"]], return_tensors="pt")["pixel_values"]
        else:
            alone = processor.image_processor(images=it["images"], return_tensors="pt")["pixel_values"]
        for own in alone:
            v = int((own.flatten(1).abs().sum(1) > 0).sum())
            assert torch.equal(pixels[k, :v], own[:v]) and not pixels[k, v:].any()
            views.append(v)
            k += 1
    assert pixels.shape[1] == max(views) and len(set(views)) > 1  # different view counts in one batch
    if family == "llava_onevision":
        assert views[2:] == [1, 1, 1, 1]  # several images per prompt: one pad-to-square view each

    # left padding
    assert mask[:, -1].all() and (mask.sum(1) < L).any()
    for row in range(B):
        n = int(mask[row].sum())
        assert not mask[row, : L - n].any() and (ids[row, : L - n] == tok.pad_token_id).all()

    # each row's <image> tokens: its images' packed features (base, unpadded tiles, newlines) as the model packs
    image_id = processor.image_token_id
    lengths = _packed_lengths(model, batch)
    k = 0
    for row, it in enumerate(kept):
        n_img = len(it["images"])
        assert int((ids[row] == image_id).sum()) == sum(lengths[k: k + n_img])
        k += n_img

    # labels: exactly each answer's tokens + </s>, each run right after "ASSISTANT :"
    assistant, colon, eos = (tok.convert_tokens_to_ids(t) for t in ("ASSISTANT", ":", "</s>"))
    for row, it in enumerate(kept):
        lab = labels[row] != IGNORE_INDEX
        assert torch.equal(labels[row][lab], ids[row][lab]) and not (lab & (ids[row] == image_id)).any()
        runs = _runs(lab)
        expected = [tok(a + "</s>", add_special_tokens=False)["input_ids"] for a in ANSWERS[it["id"]]]
        assert [ids[row, r].tolist() for r in runs] == expected
        assert all(ids[row, r[-1]] == eos and ids[row, r[0] - 2: r[0]].tolist() == [assistant, colon]
                   for r in runs)
        # prompt_end: the last column of the first prompt, from the processor on that prompt alone
        first = it["messages"][:1]
        prompt = processor.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
        n_img = sum(c["type"] == "image" for c in first[0]["content"])
        prompt_ids = _reference(processor, family, [prompt], [it["images"][:n_img]])["input_ids"][0]
        if n_img == len(it["images"]) or family == "llava_next":
            begin = L - int(mask[row].sum())
            pe = int(batch["prompt_end"][row])
            assert pe == begin + len(prompt_ids) - 1 == runs[0][0] - 1
            assert torch.equal(ids[row, begin: pe + 1], prompt_ids)
        else:  # OneVision: q4's first image alone would be tiled, in the conversation it is one of two
            assert int(batch["prompt_end"][row]) == runs[0][0] - 1

    _forward(model, batch)


def test_collate_max_length_trims_turns_and_their_images(data_dir, family):
    processor, model = built(family)
    tok = processor.tokenizer
    _, items = _items(data_dir, processor)
    kept = {it["id"]: it for it in items if it is not None}
    full = LlavaCollator(processor)(items)
    lengths = dict(zip(kept, full["attention_mask"].sum(1).tolist()))

    def first_pair(rid):
        it = kept[rid]
        n_img = sum(c["type"] == "image" for c in it["messages"][0]["content"])
        text = processor.apply_chat_template(it["messages"][:2], tokenize=False)
        return int(_reference(processor, family, [text], [it["images"][:n_img]])["attention_mask"].sum())

    # LLaVA-NeXT: q4 keeps its first pair and only that pair's image. OneVision tiles a prompt's lone image, so q4's
    # first pair alone is LONGER than the whole two-image conversation (two base views): trimming it cannot help,
    # and q2 is the one trimmed. Every item is kept whole, trimmed or dropped by the same rule.
    trimmed = "q4" if family == "llava_next" else "q2"
    if family == "llava_onevision":
        assert first_pair("q4") > lengths["q4"]
    limit = first_pair(trimmed)
    assert lengths[trimmed] > limit
    want = {}
    for rid in ("q1", "q2", "q3", "q4"):
        if lengths[rid] <= limit:
            want[rid] = (lengths[rid], len(kept[rid]["messages"]))
        elif len(kept[rid]["messages"]) > 2 and first_pair(rid) <= limit:
            want[rid] = (first_pair(rid), 2)
    survivors = list(want)
    assert want[trimmed][1] == 2 and len(survivors) < 4  # something trimmed, something dropped
    batch = LlavaCollator(processor, max_length=limit)(items)
    assert batch["skipped"] == 1 + 4 - len(survivors)
    assert batch["input_ids"].shape[0] == len(survivors) and batch["input_ids"].shape[1] <= limit
    assert batch["attention_mask"].sum(1).tolist() == [want[r][0] for r in survivors]
    messages = {r: kept[r]["messages"][: want[r][1]] for r in survivors}
    images = {r: kept[r]["images"][: sum(c["type"] == "image" for m in messages[r] if isinstance(m["content"], list)
                                         for c in m["content"])] for r in survivors}
    assert "q4" not in survivors or len(images["q4"]) == (1 if want["q4"][1] == 2 else 2)
    answers = [tok.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    expected = [" ".join(a + "</s>" for a in ANSWERS[r][: want[r][1] // 2]) for r in survivors]
    assert answers == [tok.decode(tok(e, add_special_tokens=False)["input_ids"]) for e in expected]
    assert batch["image_sizes"].tolist() == [[SIZES[n][1], SIZES[n][0]] for r in survivors
                                             for n in IMAGES[r][: len(images[r])]]
    # the trimmed batch is the processor's own for the kept turns and images
    texts = [processor.apply_chat_template(messages[r], tokenize=False) for r in survivors]
    ref = _reference(processor, family, texts, [images[r] for r in survivors])
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"):
        if key in ref:
            assert torch.equal(batch[key], ref[key]), key
    _forward(model, batch)
    assert LlavaCollator(processor, max_length=5)(items) == {"skipped": 5}


def test_datamodule_batches(data_dir, family):
    processor, model = built(family)
    tok = processor.tokenizer
    dm = LlavaDataModule(image_root=str(data_dir / "img"), train_json=str(data_dir / "train.json"), batch_size=2)
    dm.set_processor(processor)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(b["skipped"] for b in batches) == 1
    answers = sorted(tok.decode(row[row != IGNORE_INDEX]) for b in batches if "input_ids" in b for row in b["labels"])
    assert answers == sorted(tok.decode(tok(" ".join(a + "</s>" for a in v), add_special_tokens=False)["input_ids"])
                             for v in ANSWERS.values())
    for b in batches:
        if "input_ids" not in b:
            continue
        n_images = b["image_sizes"].shape[0]
        assert b["pixel_values"].shape[0] == n_images
        if family == "llava_onevision":
            assert int(b["batch_num_images"].sum()) == n_images and len(b["batch_num_images"]) == len(b["input_ids"])
        _forward(model, b)
