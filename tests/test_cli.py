"""`python -m trainer`: config printing, fit -> export -> load -> prune, resume, and multi-process strategies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from modules.head import PrunerHead
from modules.pruned_vlm import PrunedVLM
from trainer.cli import export

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")


def trainer_env(workspace: Path, runs: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LEARNPRUNE_TINY=str(workspace), LEARNPRUNE_RUNS=str(runs), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def run_trainer(args: list[str], workspace: Path, runs: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=trainer_env(workspace, runs),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def head_prunes(head_dir: Path, workspace: Path) -> None:
    head = PrunerHead.from_pretrained(head_dir)
    model = LlavaForConditionalGeneration.from_pretrained(workspace / "model").eval()
    processor = AutoProcessor.from_pretrained(workspace / "model")
    from conftest import make_images

    inputs = processor(images=make_images()[:2], text=["USER : <image> what is the color ? ASSISTANT :"] * 2,
                       return_tensors="pt", padding=True)
    pruned = PrunedVLM(model, head.plan())
    ids = pruned.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert ids.shape == (2, inputs["input_ids"].shape[1] + 2)
    assert pruned.last_kept["stage1"].shape == (2, head.config.n1)
    assert pruned.last_kept["stage2"].shape == (2, head.config.n2)


def test_print_config(tiny_workspace, tmp_path):
    proc = run_trainer(["fit", "--config", CONFIG, "--print_config"], tiny_workspace, tmp_path)
    assert f"model: {tiny_workspace}/model" in proc.stdout and "n1: 6" in proc.stdout
    assert "class_path: modules.distill.DistillPruner" in proc.stdout


def test_fit_export_load_prune(tiny_workspace, tmp_path):
    proc = run_trainer(["fit", "--config", CONFIG, "--trainer.max_epochs", "1"], tiny_workspace, tmp_path)
    assert "train: skipped 0 of 32 records" in proc.stdout + proc.stderr
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(k.startswith("pruned.selector.") for k in state)  # frozen VLM not stored
    export(["--ckpt", str(ckpt), "--out", str(tmp_path / "head")])
    head_prunes(tmp_path / "head", tiny_workspace)
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for name in ("train/kl_step", "val/teacher_agreement", "val/kept_ratio", "val/accuracy"):
        assert name in metrics


def final_metrics(runs: Path) -> str:
    versions = sorted((runs / "lightning_logs").iterdir())
    lines = (versions[-1] / "metrics.csv").read_text().strip().splitlines()
    header = lines[0].split(",")
    last_val = [line for line in lines if line.split(",")[header.index("val/kl")]][-1]
    return dict(zip(header, last_val.split(",")))


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tiny_workspace, tmp_path):
    args = ["fit", "--config", CONFIG, "--trainer.max_epochs", "3"]
    run_trainer(args, tiny_workspace, tmp_path / "straight")

    killed = tmp_path / "killed"
    # same callbacks as configs/tiny.yaml, plus one that kills the run as step 4 starts (epoch 1's first batch:
    # epochs are 4 steps) whatever the machine's load; lists given in a second --config replace the first's.
    # Mid-epoch kills resume to the same metrics but not bit-identical weights: the sampler keeps no mid-epoch state.
    kill_config = tmp_path / "kill.yaml"
    kill_config.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {killed / 'checkpoints'}, save_last: true, every_n_train_steps: 1}}\n"
        "    - class_path: kill_callback.KillAtStep\n      init_args: {step: 4}\n")
    env = trainer_env(tiny_workspace, killed)
    env["PYTHONPATH"] += os.pathsep + str(REPO / "tests" / "scripts")
    proc = subprocess.run([sys.executable, "-m", "trainer", *args, "--config", str(kill_config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (killed / "checkpoints" / "epoch=0-step=4.ckpt").exists()
    assert not (killed / "checkpoints" / "epoch=1-step=5.ckpt").exists()
    run_trainer([*args, "--ckpt_path", "last"], tiny_workspace, killed)

    straight, resumed = final_metrics(tmp_path / "straight"), final_metrics(killed)
    for key in ("val/kl", "val/teacher_agreement", "val/accuracy", "epoch", "step"):
        assert float(resumed[key]) == pytest.approx(float(straight[key]), rel=1e-6, abs=1e-9), key
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_multi_process_fit_export_load(strategy, tiny_workspace, tmp_path):
    run_trainer(["fit", "--config", CONFIG, "--trainer.max_epochs", "1", "--trainer.devices", "2",
                 "--trainer.strategy", strategy], tiny_workspace, tmp_path, timeout=300)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    run_trainer(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "head")], tiny_workspace, tmp_path)
    head_prunes(tmp_path / "head", tiny_workspace)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["demo.yaml", "toyworld/pruner.yaml"])
def test_toyworld_recipe_runs_on_the_shipped_teacher(config, tmp_path):
    """The quick-start demo and the shipped pruner's recipe run as written (step counts cut, data shrunk to two
    batches per epoch: more steps than batches is what made them crash before validation was step-based), print
    the unpruned-vs-pruned report and export a head that loads."""
    teacher = str(REPO / "checkpoints" / "toyworld-teacher")
    env = trainer_env(tmp_path, tmp_path)
    env["TOYWORLD_DATA"] = str(tmp_path / "data")
    args = ["fit", "--config", str(REPO / "configs" / config), "--model.init_args.model", teacher,
            "--data.init_args.processor", teacher, "--data.init_args.n_train", "64", "--data.init_args.n_val", "32",
            "--data.init_args.n_test", "32", "--trainer.max_steps", "3"]
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Validation answer accuracy -- unpruned (64 visual tokens)" in proc.stdout + proc.stderr
    exported = {"demo.yaml": "outputs/demo/pruner", "toyworld/pruner.yaml": "outputs/toyworld/pruner"}[config]
    head = PrunerHead.from_pretrained(tmp_path / exported)
    assert head.config.n1 == 4 and head.config.num_tokens == 64
