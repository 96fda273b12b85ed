"""On-the-fly ToyWorld batches for training the toy teacher: fresh procedural samples, no files.

Each batch is a LLaVA chat batch (the `LlavaCollator` contract: input_ids, attention_mask, pixel_values, labels,
image_sizes, prompt_end) plus per-patch dense labels of the GRID x GRID patches (`patch_color`, `patch_shape`,
`patch_row`, `patch_col`, `patch_center`, `patch_quadrant`, each (B, N) long) and `qtype` (B,) indices into
`QUESTION_TYPES`. Pruner training and the benchmark read written splits through the real JSON path instead.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from data import toyworld as tw
from data.collate import LlavaCollator
from data.datamodule import EpochShuffleSampler

MAX_REFS = 2  # a question names at most two objects (left_of)


def center_patch(scene: tw.Scene, obj: tw.ToyObject, grid: int = tw.GRID) -> tuple[int, int]:
    """(row, col) of the patch holding the object's centre, in the padded square frame."""
    top, left = tw.pad_offsets(scene.width, scene.height)
    scale = tw.IMAGE_SIZE / max(scene.width, scene.height)
    patch = tw.IMAGE_SIZE / grid
    return (min(grid - 1, int((obj.cy + top) * scale // patch)), min(grid - 1, int((obj.cx + left) * scale // patch)))


def center_patches(scene: tw.Scene, grid: int = tw.GRID) -> torch.Tensor:
    """(N,) long: 1 for the patch holding an object's centre (in the padded square frame), else 0."""
    flags = torch.zeros(grid * grid, dtype=torch.long)
    for obj in scene.objects:
        row, col = center_patch(scene, obj, grid)
        flags[row * grid + col] = 1
    return flags


def grounding(scene: tw.Scene, question: tw.Question) -> list[tuple[int, int, int]]:
    """(word index, row, col) per object the question names: where the phrase naming it ends, and its centre."""
    return [(word, *center_patch(scene, scene.objects[target]))
            for word, target in zip(question.refs, question.targets)]


def chat_item(sample: dict) -> dict:
    question = sample["question"]
    image = sample["image"]
    return {
        "image": image,
        "image_size": (image.height, image.width),
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": question.answer}]},
        ],
    }


class ToyWorldStream(Dataset):
    """`size` procedural samples of a split; sample i is `toyworld.sample(i, split, qtype_weights)`, so any order
    is reproducible."""

    def __init__(self, split: str, size: int, qtype_weights: dict[str, float] | None = None):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.split, self.size, self.qtype_weights = split, size, qtype_weights

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        sample = tw.sample(index, self.split, self.qtype_weights)
        labels = sample["labels"]
        item = chat_item(sample)
        item["patch"] = {
            "patch_color": labels["color"], "patch_shape": labels["shape"], "patch_row": labels["row"],
            "patch_col": labels["col"], "patch_quadrant": labels["quadrant"],
            "patch_center": center_patches(sample["scene"]),
        }
        item["qtype"] = tw.QUESTION_TYPES.index(sample["question"].qtype)
        item["ground"] = grounding(sample["scene"], sample["question"])
        return item


class ToyWorldCollator:
    """LLaVA chat batches plus the dense patch labels, `qtype`, and the grounding targets of the named objects:
    `ground_pos` (B, MAX_REFS) token position of each naming word (-1: none) and `ground_row` / `ground_col`
    (B, MAX_REFS) the patch of that object's centre (-100: none)."""

    def __init__(self, processor):
        self.chat = LlavaCollator(processor)
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.tokenizer = processor.tokenizer

    def __call__(self, items: list[dict]) -> dict:
        batch = self.chat(items)
        for key in items[0]["patch"]:
            batch[key] = torch.stack([item["patch"][key] for item in items])
        batch["qtype"] = torch.tensor([item["qtype"] for item in items])
        batch.update(self.ground(batch["input_ids"], items))
        return batch

    def ground(self, input_ids: torch.Tensor, items: list[dict]) -> dict[str, torch.Tensor]:
        size = (len(items), MAX_REFS)
        pos = torch.full(size, -1, dtype=torch.long)
        row = torch.full(size, -100, dtype=torch.long)
        col = torch.full(size, -100, dtype=torch.long)
        for b, item in enumerate(items):
            if not item.get("ground"):
                continue
            # the word-level tokenizer gives one token per word, and the question directly follows the image
            start = int(torch.nonzero(input_ids[b] == self.image_token_id).max()) + 1
            words = item["messages"][0]["content"][-1]["text"].split(" ")
            for r, (word, patch_row, patch_col) in enumerate(item["ground"]):
                p = start + word
                if int(input_ids[b, p]) != self.tokenizer.convert_tokens_to_ids(words[word]):
                    raise ValueError(f"grounding: token {p} of sample {b} is not the word {words[word]!r}; the chat "
                                     "template no longer puts the question right after the image tokens")
                pos[b, r], row[b, r], col[b, r] = p, patch_row, patch_col
        return {"ground_pos": pos, "ground_row": row, "ground_col": col}


class ToyWorldStreamModule(LightningDataModule):
    """Fresh ToyWorld batches: `train_size` training samples per epoch, `val_size` fixed validation samples.
    `qtype_weights` re-weights the question types of the training stream (validation stays uniform)."""

    def __init__(self, train_size: int = 100_000, val_size: int = 512, batch_size: int = 64, num_workers: int = 1,
                 seed: int = 0, qtype_weights: dict[str, float] | None = None):
        super().__init__()
        self.save_hyperparameters()
        if qtype_weights is not None:
            tw.qtype_weight_list(qtype_weights)  # fail at construction on a bad mapping
        self.processor = tw.toyworld_processor()

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        sampler = EpochShuffleSampler(len(dataset), hp.seed) if shuffle else None
        return DataLoader(dataset, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers,
                          collate_fn=ToyWorldCollator(self.processor), persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return self._loader(ToyWorldStream("train", hp.train_size, hp.qtype_weights), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ToyWorldStream("val", self.hparams.val_size), shuffle=False)
