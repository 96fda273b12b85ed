"""Train a tiny MLP with 2 CPU processes under ddp / DeepSpeed ZeRO-2 / ZeRO-3 and checkpoint it.

Run by tests/test_strategies.py in a subprocess: Lightning's ddp launcher re-executes ``sys.argv`` for the
other ranks, which must not be a pytest command line.

    python tests/scripts/ds_fit.py --strategy deepspeed_stage_3 --out /tmp/ckpt

Prints ``FINAL first_loss=<mean loss of epoch 0> loss=<mean loss of the last epoch> ...`` on rank 0; both
epochs see the same batches (no shuffling), so the two numbers are comparable.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

# Runs as a plain script (and is re-executed per rank), so the repository root may not be importable yet.
# trainer.strategies must be imported before anything imports deepspeed: it sets DS_ACCELERATOR.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from trainer.strategies import STRATEGY_NAMES, resolve_strategy  # noqa: E402

N_SAMPLES, BATCH, DIM = 32, 4, 16


class TinyRegressor(pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 1))
        self.epoch_losses: list[list[float]] = []
        self.partitioned: bool | None = None

    def on_train_epoch_start(self) -> None:
        self.epoch_losses.append([])

    def training_step(self, batch, batch_idx):
        # ZeRO-3 gathers parameters inside forward with collectives: every rank runs the same modules each
        # step (equal batch counts per rank, no data-dependent branches), otherwise the ranks hang.
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.epoch_losses[-1].append(loss.item())
        return loss

    def on_train_end(self) -> None:
        # ZeRO-3 gives each parameter a local shard (`ds_tensor`) of its `ds_numel` elements (padded: a
        # 1-element bias has a 1-element shard on each rank); outside forward a partitioned parameter is
        # released (empty `.data`). A persistent one (below the threshold) has a shard too but keeps its full
        # data.
        params = list(self.parameters())
        if all(hasattr(p, "ds_tensor") for p in params):
            released = all(not p.ds_persist and p.data.numel() == 0 for p in params)
            self.partitioned = released and sum(p.ds_tensor.numel() for p in params) < sum(
                p.ds_numel for p in params)

    def train_dataloader(self) -> DataLoader:
        # Lightning's own distributed sampler shuffles (reseeded per epoch); a fixed split keeps every epoch
        # on the same batches and lets the test replay the run in one process.
        data = make_data()
        sampler = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=BATCH, sampler=sampler)

    def configure_optimizers(self):
        # A torch optimizer: DeepSpeed's own CPU Adam JIT-compiles for ~41 s.
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def make_data(seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, DIM, generator=gen)
    w = torch.randn(DIM, 1, generator=gen)
    return TensorDataset(x, x @ w)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=STRATEGY_NAMES, required=True)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()

    start = time.perf_counter()
    # Two processes share the machine's cores; more threads per process only oversubscribe.
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)

    strategy = resolve_strategy(args.strategy)
    if args.strategy == "deepspeed_stage_3":
        # The preset keeps parameters below 1e5 elements unpartitioned (cheap to replicate); every parameter
        # of this MLP is smaller, so force partitioning to exercise ZeRO-3's gather/release path.
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0

    model = TinyRegressor()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        # ModelCheckpoint saves before teardown; the CPU DeepSpeed strategy destroys the process group there.
        callbacks=[ModelCheckpoint(dirpath=args.out, save_top_k=0, save_last=True)],
    )
    trainer.fit(model)
    if torch.distributed.is_initialized():
        # Stock ddp keeps its gloo group, which sometimes SIGABRTs at interpreter exit; the CPU DeepSpeed
        # strategy already did this at teardown.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

    if trainer.is_global_zero:
        first = sum(model.epoch_losses[0]) / len(model.epoch_losses[0])
        last = sum(model.epoch_losses[-1]) / len(model.epoch_losses[-1])
        ok = math.isfinite(first) and math.isfinite(last)
        strategy = trainer.strategy
        stage = strategy.config["zero_optimization"]["stage"] if hasattr(strategy, "config") else None
        print(
            f"FINAL first_loss={first:.8g} loss={last:.8g} finite={ok} steps={trainer.global_step}"
            f" partitioned={model.partitioned}"
            f" strategy={type(strategy).__module__}.{type(strategy).__name__} stage={stage}"
            f" seconds={time.perf_counter() - start:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
