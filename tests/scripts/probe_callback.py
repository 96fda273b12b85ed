"""For the CLI strategy tests: report (on every rank, as `<out>/rank<r>.json`) which strategy the trainer
really runs, and, under ZeRO-3, whether the weights the pruning path reads are partitioned.

Added with a second `--config` (see tests/test_cli.py). The report is taken at the end of the first training
batch, i.e. outside any forward pass, after the stage-2 hook, the CLS-attention recompute, the head and LoRA
have all run once: a ZeRO-3 parameter that is not persistent is then released (its `.data` is empty) and each
rank holds only its shard (`ds_tensor`) of the `ds_numel` elements.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def _zero3_state(param) -> dict | None:
    if not hasattr(param, "ds_id"):
        return None
    return {"shard": int(param.ds_tensor.numel()), "numel": int(param.ds_numel),
            "persist": bool(param.ds_persist), "data": int(param.data.numel()), "shape": list(param.ds_shape)}


class StrategyProbe(Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.reported = False
        self.start: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        # what a resumed run starts from: the restored step and the restored head weights (gathered under
        # ZeRO-3, a collective: every rank calls this hook)
        import contextlib

        head = list(pl_module.head.parameters())
        context = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for p in head):
            import deepspeed

            context = deepspeed.zero.GatheredParameters(head)
        with context:
            total = sum(p.detach().double().sum().item() for p in head)
        self.start = {"start_step": trainer.global_step, "start_head_sum": total}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.reported:
            return
        self.reported = True
        strategy = trainer.strategy
        config = getattr(strategy, "config", None)
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(strategy).__name__,
            "module": type(strategy).__module__,
            "stage": config["zero_optimization"]["stage"] if isinstance(config, dict) else None,
            "exclude_frozen_parameters": getattr(strategy, "exclude_frozen_parameters", None),
            **self.start,
        }
        pruned = getattr(pl_module, "pruned", None)
        if pruned is not None:
            params = {}
            # stage 2 scores with the queries/keys of layer K - 1 (modules/vlm/llava.py attention_logits)
            attn = pruned.adapter.language_layers()[pruned.layer - 1].self_attn
            for name in ("q_proj", "k_proj"):
                proj = getattr(attn, name)
                params[f"language.{name}"] = getattr(proj, "base_layer", proj).weight  # LoRA wraps the Linear
                lora = getattr(proj, "lora_A", None)
                if lora is not None:
                    params[f"language.{name}.lora_A"] = lora["default"].weight
            # the CLS-attention recompute reads the layer that produces the last feature layer's hidden states
            layers = pruned.adapter._vision_layers()
            feature_layer = pruned.adapter._feature_layers()[-1]
            vision = layers[feature_layer % (len(layers) + 1) - 1].self_attn
            params["vision.q_proj"] = vision.q_proj.weight
            params["vision.k_proj"] = vision.k_proj.weight
            for name, param in pl_module.head.named_parameters():
                if len(getattr(param, "ds_shape", param.shape)) == 2:  # a released ZeRO-3 parameter is 1-D
                    params[f"head.{name}"] = param
            report["params"] = {name: _zero3_state(p) for name, p in params.items()}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=1) + "\n")
