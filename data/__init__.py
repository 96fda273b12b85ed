"""Datasets, collation and the LightningDataModule for LLaVA-style conversation data."""

from data.collate import IGNORE_INDEX, LlavaCollator
from data.datamodule import LlavaDataModule
from data.llava_json import SKIP_KINDS, LlavaJsonDataset, record_to_messages

__all__ = ["IGNORE_INDEX", "SKIP_KINDS", "LlavaCollator", "LlavaDataModule", "LlavaJsonDataset",
           "record_to_messages"]
