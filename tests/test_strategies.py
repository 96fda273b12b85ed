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
    assert type(resolve_strategy("ddp", "cpu")) is DDPStrategy
    for name, stage in (("deepspeed_stage_2", 2), ("deepspeed_stage_3", 3)):
        cpu = resolve_strategy(name, "cpu")
        gpu = resolve_strategy(name, "gpu")
        assert type(cpu) is DeepSpeedStrategy
        assert type(gpu) is StockDeepSpeedStrategy
        for strategy in (cpu, gpu):
            assert strategy.config["zero_optimization"]["stage"] == stage
    assert type(resolve_strategy("deepspeed_stage_2", CPUAccelerator())) is DeepSpeedStrategy


def test_resolve_strategy_unknown_name():
    with pytest.raises(ValueError, match=r"unknown strategy 'zero2'.*deepspeed_stage_2"):
        resolve_strategy("zero2", "cpu")
    with pytest.raises(ValueError, match="destroy_process_group"):
        resolve_strategy("deepspeed_stage_2", "cpu", destroy_process_group=True)


def test_registered_names_build_cpu_strategy():
    assert "deepspeed_stage_3_cpu" in StrategyRegistry
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="deepspeed_stage_3_cpu",
        logger=False,
        enable_progress_bar=False,
    )
    assert type(trainer.strategy) is DeepSpeedStrategy
    assert trainer.strategy.config["zero_optimization"]["stage"] == 3


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

    final = re.search(r"^FINAL first_loss=(\S+) loss=(\S+) .* partitioned=(\S+)", proc.stdout, re.M)
    assert final, log
    first, last = float(final[1]), float(final[2])
    assert math.isfinite(first) and math.isfinite(last) and last < first
    assert final[3] == ("True" if name == "deepspeed_stage_3" else "None")
    # Sharding must not change the math: every strategy matches the single-process computation.
    expected = reference_epoch_losses(epochs)
    assert first == pytest.approx(expected[0], rel=1e-4)
    assert last == pytest.approx(expected[-1], rel=1e-4)
