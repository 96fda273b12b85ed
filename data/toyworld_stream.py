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


def center_patches(scene: tw.Scene, grid: int = tw.GRID) -> torch.Tensor:
    """(N,) long: 1 for the patch holding an object's centre (in the padded square frame), else 0."""
    top, left = tw.pad_offsets(scene.width, scene.height)
    scale = tw.IMAGE_SIZE / max(scene.width, scene.height)
    patch = tw.IMAGE_SIZE / grid
    flags = torch.zeros(grid * grid, dtype=torch.long)
    for obj in scene.objects:
        row = min(grid - 1, int((obj.cy + top) * scale // patch))
        col = min(grid - 1, int((obj.cx + left) * scale // patch))
        flags[row * grid + col] = 1
    return flags


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
    """`size` procedural samples of a split; sample i is `toyworld.sample(i, split)`, so any order is reproducible."""

    def __init__(self, split: str, size: int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.split, self.size = split, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        sample = tw.sample(index, self.split)
        labels = sample["labels"]
        item = chat_item(sample)
        item["patch"] = {
            "patch_color": labels["color"], "patch_shape": labels["shape"], "patch_row": labels["row"],
            "patch_col": labels["col"], "patch_quadrant": labels["quadrant"],
            "patch_center": center_patches(sample["scene"]),
        }
        item["qtype"] = tw.QUESTION_TYPES.index(sample["question"].qtype)
        return item


class ToyWorldCollator:
    def __init__(self, processor):
        self.chat = LlavaCollator(processor)

    def __call__(self, items: list[dict]) -> dict:
        batch = self.chat(items)
        for key in items[0]["patch"]:
            batch[key] = torch.stack([item["patch"][key] for item in items])
        batch["qtype"] = torch.tensor([item["qtype"] for item in items])
        return batch


class ToyWorldStreamModule(LightningDataModule):
    """Fresh ToyWorld batches: `train_size` training samples per epoch, `val_size` fixed validation samples."""

    def __init__(self, train_size: int = 100_000, val_size: int = 512, batch_size: int = 64, num_workers: int = 1,
                 seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.processor = tw.toyworld_processor()

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        sampler = EpochShuffleSampler(len(dataset), hp.seed) if shuffle else None
        return DataLoader(dataset, batch_size=hp.batch_size, sampler=sampler, num_workers=hp.num_workers,
                          collate_fn=ToyWorldCollator(self.processor), persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(ToyWorldStream("train", self.hparams.train_size), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ToyWorldStream("val", self.hparams.val_size), shuffle=False)
