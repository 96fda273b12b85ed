"""The non-finite guard, through `python -m trainer fit`: a NaN loss or an inf gradient stops training with a
message naming the step and the batch's records, or (skip_nonfinite: true) skips exactly that step, counted and
logged, and never updates the weights from it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_cli import CONFIG, REPO, trainer_env


def fit(workspace, runs, extra_config: str, *args: str) -> subprocess.CompletedProcess:
    config = runs / "extra.yaml"
    runs.mkdir(parents=True, exist_ok=True)
    config.write_text(extra_config)
    env = trainer_env(workspace, runs)
    env["PYTHONPATH"] += os.pathsep + str(REPO / "tests" / "scripts")
    return subprocess.run([sys.executable, "-m", "trainer", "fit", "--config", CONFIG, "--config", str(config),
                           "--trainer.max_epochs", "1", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)


def callbacks(runs, poison: str = "") -> str:
    text = ("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: {runs / 'checkpoints'}, save_last: true, save_top_k: -1, every_n_train_steps: 1}}\n")
    return text + (f"    - class_path: poison_callback.PoisonStep\n      init_args: {poison}\n" if poison else "")


def head_state(runs, step: int) -> dict[str, torch.Tensor]:
    path = runs / "checkpoints" / f"epoch=0-step={step}.ckpt"
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.parametrize("what", ["input", "gradient"])
def test_nonfinite_step_stops_training_naming_step_and_records(tiny_workspace, tmp_path, what):
    proc = fit(tiny_workspace, tmp_path, callbacks(tmp_path, f"{{step: 2, what: {what}}}"))
    assert proc.returncode != 0
    err = proc.stderr
    assert "FloatingPointError" in err and "at global step 2" in err, err[-2000:]
    assert f"non-finite training {'loss' if what == 'input' else 'gradient'}" in err
    assert "records of this batch on rank 0: [" in err and "skip_nonfinite" in err
    assert not (tmp_path / "checkpoints" / "epoch=0-step=3.ckpt").exists()  # nothing trained past it


@pytest.mark.parametrize("what", ["input", "gradient"])
def test_skip_nonfinite_skips_exactly_that_step(tiny_workspace, tmp_path, what):
    """4 batches of 8 in the epoch, the third (global step 2) poisoned: a NaN loss skips its backward, an inf
    gradient has the step's gradients dropped; either way that step leaves every weight as it was (AdamW skips
    parameters without gradients: no update, no moment, no decay) while the steps around it train."""
    proc = fit(tiny_workspace, tmp_path, callbacks(tmp_path, f"{{step: 2, what: {what}}}"),
               "--model.skip_nonfinite", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step skipped (1 so far)" in proc.stderr
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["nonfinite_skipped"] == 1
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    one, two, three = (head_state(tmp_path, s) for s in (1, 2, 3))
    assert not all(torch.equal(one[k], two[k]) for k in one)  # the step before the poisoned one trained
    assert all(torch.equal(two[k], three[k]) for k in two)  # the poisoned one changed nothing
    assert not all(torch.equal(three[k], last["state_dict"][k]) for k in three)  # the one after trained again
    assert "train/nonfinite_skipped" in (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
