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

from modules.distill import export_pruner
from trainer.callbacks import SkipSummary
from trainer.report import EvaluationReport

# the frozen VLM stays in eval mode on purpose (no dropout in teacher or student)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class PrunerCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule named by `class_path` in the config
    (DistillPruner + LlavaDataModule for pruners; the ToyWorld teacher stages use their own).

    `trainer.strategy` accepts Lightning's names and `class_path` forms; "deepspeed_stage_2" and
    "deepspeed_stage_3" are learnprune's presets in configs/deepspeed/, registered in Lightning's
    StrategyRegistry by trainer.strategies: they run the real DeepSpeed engine on CPU too (gloo), so the same
    config works on a laptop and on 8 GPUs, and checkpoint only the trained parameters. The data module reuses
    the model's processor when it is given none.
    """

    def before_instantiate_classes(self) -> None:
        # One processor for batches and model: DistillPruner reads from it which visual tokens are padding. A
        # config may name it under `data`, under `model`, or not at all (then the model's path); both classes get
        # the same one, and Lightning's hparam merge sees one value, not two.
        config = self.config[self.subcommand] if self.subcommand else self.config
        model_args = getattr(config.get("model"), "init_args", None)
        data_args = getattr(config.get("data"), "init_args", None)
        if model_args is None or data_args is None or "processor" not in model_args or "processor" not in data_args:
            return
        processor = data_args.processor or model_args.processor or model_args.get("model")
        if processor is not None:
            model_args.processor = data_args.processor = processor


def run_cli(args: list[str] | None = None) -> PrunerCLI:
    return PrunerCLI(
        None,
        None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [SkipSummary(), EvaluationReport()]},
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
    if args and args[0] == "visualize":
        from trainer.visualize import visualize

        visualize(args[1:])
        return
    run_cli(argv)  # None: LightningCLI reads sys.argv itself
    # gloo can abort at interpreter exit if the process group is still alive (measured with ddp on CPU)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
