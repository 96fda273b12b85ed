"""Strategies: name/preset resolution, and real 2-process CPU training under ddp, DeepSpeed ZeRO-2 and ZeRO-3.

The multi-process runs go through tests/scripts/ds_fit.py in a subprocess: in-process `strategy="ddp"` would
make Lightning re-run the whole pytest command line in the second rank.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy as StockDeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from trainer.strategies import PRESETS, DeepSpeedStrategy, resolve_strategy

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ds_fit.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ds_fit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resolve_strategy_names():
    assert type(resolve_strategy("ddp")) is DDPStrategy
    for name, stage in (("deepspeed_stage_2", 2), ("deepspeed_stage_3", 3)):
        strategy = resolve_strategy(name)
        assert type(strategy) is DeepSpeedStrategy
        assert strategy.config["zero_optimization"]["stage"] == stage
        assert strategy.exclude_frozen_parameters is True
    kept = resolve_strategy("deepspeed_stage_2", exclude_frozen_parameters=False)
    assert kept.exclude_frozen_parameters is False


def test_resolve_strategy_unknown_name():
    with pytest.raises(ValueError, match=r"unknown strategy 'zero2'.*deepspeed_stage_2"):
        resolve_strategy("zero2")
    with pytest.raises(ValueError, match="destroy_process_group"):
        resolve_strategy("deepspeed_stage_2", destroy_process_group=True)


@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
@pytest.mark.parametrize("name", ["deepspeed_stage_2", "deepspeed_stage_3"])
def test_registered_names_build_learnprune_strategy(name, accelerator):
    """Lightning's own names resolve to learnprune's strategy with its preset, whatever the accelerator (on
    CUDA the subclass behaves as the stock one); the Trainer's connector builds it from the registry, as the
    CLI and a YAML `strategy:` line do. "gpu" is only resolved, not instantiated into a Trainer (no GPU
    here)."""
    stage = int(name[-1])
    entry = StrategyRegistry[name]
    assert entry["strategy"] is DeepSpeedStrategy and entry["init_params"]["config"] == str(PRESETS[name])
    if accelerator == "gpu":
        strategy = StrategyRegistry.get(name)
    else:
        trainer = pl.Trainer(accelerator=accelerator, devices=2, strategy=name, logger=False,
                             enable_progress_bar=False)
        strategy = trainer.strategy
    assert type(strategy) is DeepSpeedStrategy
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert strategy.exclude_frozen_parameters is True
    # the stock strategy keeps the other names, and ddp stays Lightning's
    assert StrategyRegistry["deepspeed_stage_3_offload"]["strategy"] is StockDeepSpeedStrategy
    assert StrategyRegistry["ddp"]["strategy"] is DDPStrategy


def test_exclude_frozen_checkpoint_loads_non_strict(monkeypatch):
    """A checkpoint without the frozen parameters must reach DeepSpeed with load_module_strict=False, whatever
    the module's strict_loading (which is restored afterwards)."""
    seen = {}

    def fake_load(self, path, weights_only=None):
        seen["strict"] = self.lightning_module.strict_loading
        return {}

    monkeypatch.setattr(StockDeepSpeedStrategy, "load_checkpoint", fake_load)
    module = pl.LightningModule()
    for exclude, expected in ((True, False), (False, True)):
        strategy = DeepSpeedStrategy(accelerator=CPUAccelerator(), config=str(PRESETS["deepspeed_stage_2"]),
                                     exclude_frozen_parameters=exclude)
        strategy._lightning_module = module
        strategy.load_checkpoint("unused")
        assert seen["strict"] is expected
        assert module.strict_loading is True and module._strict_loading is None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_leave_lightning_managed_keys_alone(name):
    text = PRESETS[name].read_text()
    config = json.loads(text)
    # Lightning fills these from the Trainer (or refuses them); DeepSpeed's optimizers JIT-compile.
    for key in ("optimizer", "gradient_accumulation_steps", "train_micro_batch_size_per_gpu", "fp16", "bf16"):
        assert key not in config
    assert '"auto"' not in text


def test_cpu_precision_keys_follow_trainer_precision():
    config = {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}, "bf16": {"enabled": True}}
    strategy = DeepSpeedStrategy(accelerator=CPUAccelerator(), config=config)
    strategy.precision_plugin = DeepSpeedPrecision("32-true")
    strategy._format_config()
    assert "fp16" not in strategy.config and "bf16" not in strategy.config
    assert "fp16" in config, "the caller's dict must not be mutated"

    strategy = DeepSpeedStrategy(accelerator=CPUAccelerator(), config=config)
    strategy.precision_plugin = DeepSpeedPrecision("16-mixed")
    with pytest.raises(MisconfigurationException, match="fp16"):
        strategy._format_config()


def reference_epoch_losses(epochs: int, world_size: int = 2) -> list[float]:
    """Single-process replay of the 2-rank run, as rank 0's per-epoch mean loss.

    Rank r gets samples r::2, so global step i covers samples [8i, 8i+8) and the all-reduced gradient is that
    of their mean loss.
    """
    script = load_script()
    pl.seed_everything(0, verbose=False)
    model = script.TinyRegressor()
    optimizer = model.configure_optimizers()
    x, y = script.make_data().tensors
    step = script.BATCH * world_size
    means = []
    for _ in range(epochs):
        rank0 = []
        for i in range(0, len(x), step):
            out = model.net(x[i : i + step])
            rank0.append(torch.nn.functional.mse_loss(out[::world_size], y[i : i + step : world_size]).item())
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(out, y[i : i + step]).backward()
            optimizer.step()
        means.append(sum(rank0) / len(rank0))
    return means


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_two_process_fit(name, tmp_path):
    epochs = 3
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--strategy", name, "--out", str(tmp_path), "--epochs", str(epochs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log

    ckpt = tmp_path / "last.ckpt"
    if name == "ddp":
        assert ckpt.is_file(), log
    else:  # DeepSpeed writes a directory of (per-rank) shards
        assert (ckpt / "checkpoint").is_dir(), log
        assert list((ckpt / "checkpoint").glob("*optim_states.pt")), log

    final = re.search(r"^FINAL first_loss=(\S+) loss=(\S+) .* partitioned=(\S+) strategy=(\S+) stage=(\S+)",
                      proc.stdout, re.M)
    assert final, log
    first, last = float(final[1]), float(final[2])
    assert math.isfinite(first) and math.isfinite(last) and last < first
    assert final[3] == ("True" if name == "deepspeed_stage_3" else "None")
    if name == "ddp":
        assert final.group(4, 5) == ("lightning.pytorch.strategies.ddp.DDPStrategy", "None")
    else:
        assert final.group(4, 5) == ("trainer.strategies.DeepSpeedStrategy", name[-1])
    # Sharding must not change the math: every strategy matches the single-process computation.
    expected = reference_epoch_losses(epochs)
    assert first == pytest.approx(expected[0], rel=1e-4)
    assert last == pytest.approx(expected[-1], rel=1e-4)
