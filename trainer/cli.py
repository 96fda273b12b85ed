"""`python -m trainer fit|validate|test|predict --config ...` (LightningCLI, omegaconf parser mode) and
`python -m trainer export --ckpt X.ckpt --out DIR`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from data.datamodule import LlavaDataModule
from modules.distill import DistillPruner, export_pruner
from trainer.callbacks import SkipSummary
from trainer.strategies import STRATEGY_NAMES, resolve_strategy

# the frozen VLM stays in eval mode on purpose (no dropout in teacher or student)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class PrunerCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule named by `class_path` in the config
    (DistillPruner + LlavaDataModule for pruners; the ToyWorld teacher stages use their own).

    `trainer.strategy` accepts "ddp", "deepspeed_stage_2" and "deepspeed_stage_3": the DeepSpeed names use the
    presets in configs/deepspeed/ and run the real DeepSpeed engine on CPU too (gloo), so the same config works
    on a laptop and on 8 GPUs. The data module reuses the model's processor when it is given none.
    """

    def instantiate_trainer(self, **kwargs: Any):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_cfg = config.get("trainer", {})
        strategy = trainer_cfg.get("strategy") if hasattr(trainer_cfg, "get") else None
        if isinstance(strategy, str) and strategy in STRATEGY_NAMES:
            kwargs["strategy"] = resolve_strategy(strategy, trainer_cfg.get("accelerator", "auto"))
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        strategy = config.get("trainer", {}).get("strategy")
        if isinstance(strategy, str) and strategy in STRATEGY_NAMES:
            config["trainer"]["strategy"] = "auto"  # replaced by the resolved object in instantiate_trainer
            self._strategy_name = strategy

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        dm, model = self.datamodule, self.model
        model_path = getattr(model, "hparams", {}).get("model") if isinstance(model, DistillPruner) else None
        if isinstance(dm, LlavaDataModule) and dm.processor_path is None and model_path is not None:
            from transformers import AutoProcessor

            dm.set_processor(AutoProcessor.from_pretrained(model_path))


def run_cli(args: list[str] | None = None) -> PrunerCLI:
    return PrunerCLI(
        None,
        None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [SkipSummary()]},
        seed_everything_default=0,
        args=args,
    )


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint file, or a DeepSpeed checkpoint directory (consolidated to fp32 first)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            single = Path(tmp) / "consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(single))
            return torch.load(single, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False)


def export(args: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="python -m trainer export",
                                     description="Write the head (and LoRA adapters) of a training checkpoint "
                                                 "as a pruner directory (pruner_config.json + model.safetensors).")
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt file or DeepSpeed checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")
    opts = parser.parse_args(args)
    checkpoint = load_training_checkpoint(opts.ckpt)
    if "pruner_config" not in checkpoint:
        raise ValueError(f"{opts.ckpt} was not written by learnprune's DistillPruner (no 'pruner_config')")
    state = {}
    for key, value in checkpoint["state_dict"].items():
        idx = key.find("pruned.")  # DeepSpeed wraps the module: strip whatever prefix it added
        if idx >= 0:
            state[key[idx:]] = value
    out = export_pruner(opts.out, checkpoint["pruner_config"], state, checkpoint.get("lora_config"))
    print(f"exported pruner head to {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "export":
        export(args[1:])
        return
    run_cli(argv)  # None: LightningCLI reads sys.argv itself
    # gloo can abort at interpreter exit if the process group is still alive (measured with ddp on CPU)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
