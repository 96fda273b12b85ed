"""LightningDataModule over LLaVA conversation JSON / JSON Lines files.

Skip accounting has two halves. Construction-time skips (malformed records, missing files, ...) live in each
dataset's `init_skipped`. Load-time skips (unreadable or oversized images, too-long items, items the processor
rejects) happen inside DataLoader workers, whose counters never reach the main process, so they travel in each
batch as `batch["skipped"]` (with their kinds and messages, `skipped_kinds` / `skipped_messages`) and are tallied
here in `on_before_batch_transfer`, which Lightning runs in the main process for every batch.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from data.collate import LlavaCollator
from data.llava_json import DEFAULT_MAX_IMAGE_PIXELS, MAX_EXAMPLES, SKIP_KINDS, LlavaJsonDataset, format_skips
from data.resumable import LoaderPosition, ResumableBatchSampler, ResumableDataLoader

_STAGES = ("train", "validate", "test", "predict")


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): Lightning calls `set_epoch`, so a run resumed from a
    checkpoint sees exactly the order an uninterrupted run would have seen."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=gen).tolist())

    def __len__(self) -> int:
        return self.length


class LlavaDataModule(LightningDataModule):
    """Datasets are built lazily in `setup`; the processor is loaded from `processor` (a local path or hub id)
    unless a LightningModule shares its own through `set_processor`.

    Batches may have no `input_ids` (only `{"skipped": k, ...}`), when every item of a batch was dropped: skip
    those in the loop. `max_image_pixels` (None: no limit) is the datasets' decompression-bomb guard.
    `predict` reads `predict_json`, falling back to `test_json`.
    """

    def __init__(
        self,
        image_root: str,
        train_json: str | None = None,
        val_json: str | None = None,
        test_json: str | None = None,
        predict_json: str | None = None,
        processor: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        max_length: int | None = None,
        seed: int = 0,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        self.save_hyperparameters()
        self.image_root = image_root
        self.paths = {"train": train_json, "validate": val_json, "test": test_json,
                      "predict": predict_json or test_json}
        self.processor_path = processor
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_length = max_length
        self.seed = seed
        self.train_position = LoaderPosition()  # shared with the train loader, saved in checkpoints
        self.max_image_pixels = max_image_pixels
        self._processor = None
        self.datasets: dict[str, LlavaJsonDataset] = {}
        # (stage, epoch) -> items dropped at load time, as reported by the collator.
        self.runtime_skipped: Counter = Counter()
        # (stage, epoch) -> Counter of those drops by kind; stage -> kind -> the first messages
        self.runtime_kinds: defaultdict[tuple[str, int], Counter] = defaultdict(Counter)
        self.runtime_messages: defaultdict[str, dict[str, list[str]]] = defaultdict(dict)

    # -- processor ---------------------------------------------------------------------------------------------

    def set_processor(self, processor) -> None:
        """Use an already-built processor (e.g. the one the LightningModule loaded with its model)."""
        self._processor = processor

    @property
    def processor(self):
        if self._processor is None:
            if not self.processor_path:
                raise ValueError("LlavaDataModule has no processor: pass `processor` (a path or hub id) "
                                 "or call set_processor(...) before setup")
            # AutoProcessor, or a Qwen-VL processor images-only (its video processor needs torchvision)
            from data.processors import load_processor

            self._processor = load_processor(self.processor_path)
        return self._processor

    # -- datasets ----------------------------------------------------------------------------------------------

    def _dataset(self, stage: str) -> LlavaJsonDataset:
        if stage not in self.datasets:
            path = self.paths[stage]
            if path is None:
                names = {"train": "train_json", "validate": "val_json", "test": "test_json",
                         "predict": "predict_json or test_json"}
                raise ValueError(f"no data for stage {stage!r}: set {names[stage]}")
            self.datasets[stage] = LlavaJsonDataset(path, self.image_root, self.processor, self.max_length,
                                                    max_image_pixels=self.max_image_pixels)
        return self.datasets[stage]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "validate"), "validate": ("validate",), "test": ("test",),
                  "predict": ("predict",), None: _STAGES}[stage]
        for name in wanted:
            # Validation is optional during fit; every other requested stage must have its file.
            if self.paths[name] is not None or not (stage == "fit" and name == "validate"):
                self._dataset(name)

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        dataset = self._dataset(stage)
        collate = LlavaCollator(self.processor, self.max_length, dataset=dataset)  # reports skips by kind
        common = dict(num_workers=self.num_workers, collate_fn=collate,
                      persistent_workers=self.num_workers > 0, pin_memory=False)
        if shuffle:  # the training loader: resumable mid-epoch, in the order an uninterrupted run sees
            batches = ResumableBatchSampler(EpochShuffleSampler(len(dataset), self.seed), self.batch_size,
                                            drop_last=False, position=self.train_position)
            return ResumableDataLoader(dataset, batch_sampler=batches, position=self.train_position, **common)
        return DataLoader(dataset, batch_size=self.batch_size, **common)

    def state_dict(self) -> dict:
        """Saved in every checkpoint: where the training loader is in its epoch (see data/resumable.py)."""
        return {"train_position": self.train_position.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.train_position.load_state_dict(state.get("train_position", {}))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.paths["validate"] is None:
            return []
        return self._loader("validate", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)

    # -- skip accounting ---------------------------------------------------------------------------------------

    def _current(self) -> tuple[str, int]:
        trainer = self.trainer
        if trainer is None:
            return "train", 0
        stage = trainer.state.stage.value if trainer.state.stage is not None else "train"
        return {"validate": "validate", "sanity_check": "sanity_check"}.get(stage, stage), trainer.current_epoch

    def record_skipped(self, batch: dict, stage: str | None = None, epoch: int | None = None) -> None:
        """Tally a batch's runtime skips; Lightning calls this through `on_before_batch_transfer`, a custom
        loop can call it directly."""
        if not isinstance(batch, dict) or not batch.get("skipped"):
            return
        cur_stage, cur_epoch = self._current()
        key = (stage or cur_stage, cur_epoch if epoch is None else epoch)
        skipped = int(batch["skipped"])
        self.runtime_skipped[key] += skipped
        kinds = Counter({k: int(n) for k, n in (batch.get("skipped_kinds") or {}).items() if n})
        # drops the batch does not name (a collator without the dataset): the dataset's Nones, unreadable images
        kinds["unreadable_image"] += max(0, skipped - sum(kinds.values()))
        self.runtime_kinds[key].update(+kinds)
        examples = self.runtime_messages[key[0]]
        for kind, messages in (batch.get("skipped_messages") or {}).items():
            room = MAX_EXAMPLES - len(examples.setdefault(kind, []))
            examples[kind] += list(messages)[:max(0, room)]

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        self.record_skipped(batch)
        return batch

    def _epoch(self, stage: str, epoch: int | None) -> int:
        if stage not in _STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {_STAGES}")
        if epoch is None:
            seen = [e for (s, e) in self.runtime_skipped if s == stage]
            epoch = max(seen) if seen else self._current()[1]
        return epoch

    def skip_summary(self, stage: str = "train", epoch: int | None = None) -> str:
        """Init-time skips per kind plus load-time drops of `epoch` (default: the latest epoch seen), e.g.
        "train: skipped 3 of 20 records: missing_image=1, malformed=1; dropped at load (epoch 0): 1". The drops
        are broken down by kind, "dropped at load (epoch 0): 3 (unreadable_image=1, image_too_large=2)", unless
        every one was an unreadable image (the plain count, as before kinds were reported)."""
        epoch = self._epoch(stage, epoch)
        ds = self.datasets.get(stage)
        init = format_skips(ds.init_skipped, ds.total) if ds is not None else "not set up"
        dropped = self.runtime_skipped.get((stage, epoch), 0)
        kinds = self.runtime_kinds.get((stage, epoch), Counter())
        text = f"{stage}: {init}; dropped at load (epoch {epoch}): {dropped}"
        if set(kinds) - {"unreadable_image"}:
            order = [k for k in SKIP_KINDS if kinds.get(k)] + sorted(k for k in kinds if k not in SKIP_KINDS)
            text += " (" + ", ".join(f"{k}={kinds[k]}" for k in order) + ")"
        return text

    def skip_counts(self, stage: str = "train", epoch: int | None = None) -> Counter:
        """Every skip of `stage` by kind: construction-time ones plus the load-time drops of `epoch` (default: the
        latest epoch seen)."""
        epoch = self._epoch(stage, epoch)
        ds = self.datasets.get(stage)
        counts = Counter(ds.init_skipped) if ds is not None else Counter()
        counts.update(self.runtime_kinds.get((stage, epoch), Counter()))
        return +counts

    def skip_report(self, stage: str = "train", epoch: int | None = None) -> str:
        """`skip_summary` and, per kind, the first messages naming the offending record and field or file."""
        lines = [self.skip_summary(stage, epoch)]
        ds = self.datasets.get(stage)
        examples = {k: list(v) for k, v in (ds.init_examples.items() if ds is not None else ())}
        for kind, messages in self.runtime_messages.get(stage, {}).items():
            room = MAX_EXAMPLES - len(examples.setdefault(kind, []))
            examples[kind] += messages[:max(0, room)]
        order = [k for k in SKIP_KINDS if k in examples] + sorted(k for k in examples if k not in SKIP_KINDS)
        lines += [f"  {kind}: {message}" for kind in order for message in examples[kind]]
        return "\n".join(lines)


class ToyWorldDataModule(LlavaDataModule):
    """LlavaDataModule over ToyWorld splits written as LLaVA JSON + PNG files under `root` (written on first
    use, so the real file-based data path is what pruners train on). The processor comes from the model."""

    def __init__(self, root: str = "outputs/toyworld/data", n_train: int = 20_000, n_val: int = 500,
                 n_test: int = 1000, processor: str | None = None, batch_size: int = 32, num_workers: int = 0,
                 seed: int = 0):
        from pathlib import Path

        self.root = Path(root)
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        super().__init__(image_root=str(self.root / "images"), train_json=str(self.root / "train.json"),
                         val_json=str(self.root / "val.json"), test_json=str(self.root / "test.json"),
                         processor=processor, batch_size=batch_size, num_workers=num_workers, seed=seed)

    def prepare_data(self) -> None:
        import json

        from data import toyworld

        for split, n in self.sizes.items():
            path = self.root / f"{split}.json"
            if not path.is_file() or len(json.loads(path.read_text())) < n:
                toyworld.write_split(self.root, split, n)
