"""LLaVA JSON dataset, collator and datamodule on files written to tmp_path (tiny tokenizer, real processor)."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from conftest import make_images, turns
from data import IGNORE_INDEX, LlavaCollator, LlavaDataModule, LlavaJsonDataset
from data.tiny import tiny_llava_processor

N_IMAGE_TOKENS = 16  # tiny processor: 32 px / patch 8 -> 4x4 patches (CLS dropped by the "default" strategy)
SIZES = {"a.png": (40, 20), "b.png": (20, 30), "c.png": (32, 32)}  # (width, height)


GOOD = [
    {"id": "g1", "image": "a.png", "conversations": turns(("<image>\nwhat is the color ?", "red"))},
    {"id": "g2", "image": "sub/b.png",
     "conversations": turns(("<image>\nhow many ?", "two"), ("what shape is left ?", "a circle ."))},
    {"id": "g3", "image": "c.png", "conversations": turns(("describe this image . <image>", "a blue square"))},
]
BAD = [
    {"id": "missing", "image": "nope.png", "conversations": turns(("<image>\nwhat ?", "red"))},
    {"id": "corrupt", "image": "corrupt.png", "conversations": turns(("<image>\nwhat ?", "red"))},
    {"id": "notoken", "image": "a.png", "conversations": turns(("what is the color ?", "red"))},
    {"id": "empty", "image": "a.png", "conversations": turns(("<image>\nwhat ?", "red"), ("how many ?", "  "))},
    {"id": "noconv", "image": "a.png"},
    {"id": "bot", "image": "a.png", "conversations": [{"from": "human", "value": "<image> what ?"},
                                                      {"from": "bot", "value": "red"}]},
    "not a dict",
    {"id": "text", "conversations": turns(("what is the color ?", "red"))},
    {"id": "twoimg", "image": "a.png", "conversations": turns(("<image> what ?", "red"), ("<image> how ?", "no"))},
]


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "img" / "sub").mkdir(parents=True)
    names = ["a.png", "sub/b.png", "c.png"]
    for name, im in zip(names, make_images(tuple(SIZES.values()))):
        im.save(tmp_path / "img" / name)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(GOOD + BAD))
    return tmp_path


def test_skips_each_kind_exactly(data_dir, processor):
    ds = LlavaJsonDataset(data_dir / "train.json", data_dir / "img", processor)
    assert dict(ds.skipped) == {"missing_image": 1, "no_image_token": 1, "empty_answer": 1, "malformed": 3,
                                "text_only": 1, "extra_image_token": 1}
    assert len(ds) == 4  # 3 good + the corrupt one, which only fails when decoded
    items = [ds[i] for i in range(len(ds))]
    assert sum(it is None for it in items) == 1
    assert ds.skipped["unreadable_image"] == 1
    assert ds.init_skipped["unreadable_image"] == 0
    assert ds.summary() == ("skipped 9 of 12 records: malformed=3, text_only=1, no_image_token=1, "
                            "extra_image_token=1, empty_answer=1, missing_image=1, unreadable_image=1")


def test_items_messages_and_sizes(data_dir, processor):
    ds = LlavaJsonDataset(data_dir / "train.json", data_dir / "img", processor)
    items = {it["id"]: it for it in (ds[i] for i in range(len(ds))) if it is not None}
    assert set(items) == {"g1", "g2", "g3"}
    g1, g2, g3 = items["g1"], items["g2"], items["g3"]
    assert g1["image"].mode == "RGB" and g1["image_size"] == (20, 40)
    assert g2["image_size"] == (30, 20)
    assert g1["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the color ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    assert [m["role"] for m in g2["messages"]] == ["user", "assistant", "user", "assistant"]
    assert g2["messages"][2]["content"] == [{"type": "text", "text": "what shape is left ?"}]
    # placeholder after the text -> image item after the text
    assert g3["messages"][0]["content"] == [{"type": "text", "text": "describe this image ."}, {"type": "image"}]


def test_bad_paths_are_clear_errors(tmp_path, processor):
    with pytest.raises(ValueError, match="not found"):
        LlavaJsonDataset(tmp_path / "absent.json", tmp_path, processor)
    (tmp_path / "obj.json").write_text(json.dumps({"id": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        LlavaJsonDataset(tmp_path / "obj.json", tmp_path, processor)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlavaJsonDataset(tmp_path / "bad.json", tmp_path, processor)
    (tmp_path / "ok.json").write_text("[]")
    with pytest.raises(ValueError, match="image_root"):
        LlavaJsonDataset(tmp_path / "ok.json", tmp_path / "nodir", processor)


def _batch(data_dir, processor, **kw):
    ds = LlavaJsonDataset(data_dir / "train.json", data_dir / "img", processor)
    items = [ds[i] for i in range(len(ds))]
    return items, LlavaCollator(processor, **kw)(items)


def test_collate_labels_padding_prompt_end(data_dir, processor, tokenizer):
    items, batch = _batch(data_dir, processor)
    kept = [it for it in items if it is not None]
    assert batch["skipped"] == 1
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    B, L = ids.shape
    assert B == 3 and labels.shape == (B, L) and mask.shape == (B, L)
    assert ids.dtype == labels.dtype == batch["prompt_end"].dtype == torch.long
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["image_sizes"].tolist() == [list(it["image_size"]) for it in kept]
    # each row's pixels are its own image's, as the image processor alone makes them
    for row, it in enumerate(kept):
        alone = processor.image_processor(images=[it["image"]], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(batch["pixel_values"][row], alone), it["id"]

    # left padding: every row ends with a real token, padding only at the start
    assert mask[:, -1].all()
    for row in range(B):
        n = int(mask[row].sum())
        assert mask[row, L - n:].all() and not mask[row, : L - n].any()
        assert (ids[row, : L - n] == tokenizer.pad_token_id).all()
    assert (mask.sum(1) < L).any()

    expected = {"g1": ["red </s>"], "g2": ["two </s>", "a circle . </s>"], "g3": ["a blue square </s>"]}
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for row, it in enumerate(kept):
        assert (ids[row] == image_id).sum() == N_IMAGE_TOKENS
        assert labels[row][ids[row] == image_id].eq(IGNORE_INDEX).all()
        lab = labels[row] != IGNORE_INDEX
        assert (labels[row][lab] == ids[row][lab]).all()
        # contiguous runs of labelled tokens, one per answer
        runs, cur = [], []
        for c in range(L):
            if lab[c]:
                cur.append(int(ids[row, c]))
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        assert [tokenizer.decode(r) for r in runs] == expected[it["id"]]
        first = int(lab.nonzero()[0])
        pe = int(batch["prompt_end"][row])
        assert pe == first - 1
        assert tokenizer.convert_ids_to_tokens(int(ids[row, pe])) == ":"
        assert tokenizer.convert_ids_to_tokens(int(ids[row, pe - 1])) == "ASSISTANT"


def test_collate_all_none_and_sharing_processor(processor):
    assert LlavaCollator(processor)([None, None]) == {"skipped": 2}
    assert processor.tokenizer.padding_side == "left"


def test_collate_max_length_trims_turns_then_drops(data_dir, processor, tokenizer):
    _, full = _batch(data_dir, processor)
    lengths = full["attention_mask"].sum(1).tolist()  # g1, g2 (two pairs), g3
    # room for g1 and the first pair of g2 only; g3's single pair is longer than that
    g2_first_pair = len(tokenizer("USER : <image> how many ? ASSISTANT : two</s>")["input_ids"]) + N_IMAGE_TOKENS - 1
    limit = max(lengths[0], g2_first_pair)
    assert lengths[1] > limit and lengths[2] > limit
    items, batch = _batch(data_dir, processor, max_length=limit)
    assert batch["skipped"] == 2  # the corrupt image + g3
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= limit
    assert int(batch["attention_mask"][1].sum()) == g2_first_pair
    lab = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX]
    assert tokenizer.decode(lab.tolist()) == "two </s>"
    # a limit below every first pair leaves nothing: a minimal batch the loop must skip
    _, tiny = _batch(data_dir, processor, max_length=5)
    assert tiny == {"skipped": 4}


def test_dataset_max_length_prefilter(data_dir, processor):
    ds = LlavaJsonDataset(data_dir / "train.json", data_dir / "img", processor, max_length=12)
    # text-only lengths: g1 = 11 ("USER : <image> what is the color ? ASSISTANT : red </s>"), the corrupt record
    # 8; g2 and g3 are longer
    assert ds.skipped["too_long"] == 2
    assert len(ds) == 2


def test_datamodule_from_saved_processor(data_dir, processor):
    proc_dir = data_dir / "proc"
    tiny_llava_processor().save_pretrained(proc_dir)
    dm = LlavaDataModule(image_root=str(data_dir / "img"), train_json=str(data_dir / "train.json"),
                         val_json=str(data_dir / "train.json"), processor=str(proc_dir), batch_size=2)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(b["skipped"] for b in batches) == 1
    # every good record exactly once per epoch: its answers, read back from the labels
    answers = sorted(processor.tokenizer.decode(row[row != IGNORE_INDEX])
                     for b in batches if "input_ids" in b for row in b["labels"])
    assert answers == ["a blue square </s>", "red </s>", "two </s> a circle . </s>"]
    for b in batches:
        dm.record_skipped(b, stage="train", epoch=0)
    assert dm.skip_summary("train") == (
        "train: skipped 8 of 12 records: malformed=3, text_only=1, no_image_token=1, extra_image_token=1, "
        "empty_answer=1, missing_image=1; dropped at load (epoch 0): 1")
    assert len(list(dm.val_dataloader())) == 2

    shared = LlavaDataModule(image_root=str(data_dir / "img"), test_json=str(data_dir / "train.json"))
    shared.set_processor(processor)
    shared.setup("test")
    assert shared.processor is processor
    assert len(list(shared.predict_dataloader())) == 1
    with pytest.raises(ValueError, match="train_json"):
        shared.train_dataloader()
    with pytest.raises(ValueError, match="no processor"):
        LlavaDataModule(image_root=str(data_dir / "img"), train_json=str(data_dir / "train.json")).setup("fit")


class _CountingModule(LightningModule):
    """Stands in for the distillation module: skips empty batches, touches every real one."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.rows = 0

    def training_step(self, batch, batch_idx):
        if "input_ids" not in batch:
            return None
        self.rows += batch["input_ids"].shape[0]
        return self.w * batch["labels"].ne(IGNORE_INDEX).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_tallies_runtime_skips_from_workers(data_dir, processor):
    dm = LlavaDataModule(image_root=str(data_dir / "img"), train_json=str(data_dir / "train.json"),
                         val_json=str(data_dir / "train.json"), batch_size=2, num_workers=1)
    dm.set_processor(processor)
    module = _CountingModule()
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert module.rows == 6
    # the corrupt image is decoded in a worker process, yet each epoch's drop reaches the main process
    assert dm.skip_summary("train", epoch=0).endswith("dropped at load (epoch 0): 1")
    assert dm.skip_summary("train").endswith("dropped at load (epoch 1): 1")
    assert dm.skip_summary("validate").endswith("): 1")
