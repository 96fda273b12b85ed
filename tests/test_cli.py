"""`python -m trainer`: config printing, fit -> export -> load -> prune, resume, and multi-process strategies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from data.datamodule import LlavaDataModule
from modules.distill import DistillPruner
from modules.head import PrunerHead
from modules.pruned_vlm import PrunedVLM
from modules.serve import trained_plan
from trainer.callbacks import ReportAccuracy
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
    pruned = PrunedVLM(model, trained_plan(head))
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


@pytest.fixture(scope="module")
def straight_run(tiny_workspace, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run (12 steps of 8 records) for the resume tests to match."""
    runs = tmp_path_factory.mktemp("straight")
    run_trainer(["fit", "--config", CONFIG, "--trainer.max_epochs", "3"], tiny_workspace, runs)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resume_after_kill_matches_uninterrupted_run(tiny_workspace, straight_run, tmp_path, seed):
    """SIGKILL as a random step starts (steps 7, 3, 1 of 12: mid-epoch), resume from `last`: the same final
    metrics and bit-identical weights as the uninterrupted run. Exact mid-epoch too, because the data module saves
    the training loader's position (data/resumable.py): the resumed epoch goes on with the batches not yet seen."""
    import random

    step = random.Random(seed).randrange(1, 12)
    args = ["fit", "--config", CONFIG, "--trainer.max_epochs", "3"]
    killed = tmp_path / "killed"
    # same callbacks as configs/tiny.yaml, plus one that kills the run as `step` starts (after that step's
    # checkpoint is written) whatever the machine's load; lists given in a second --config replace the first's.
    kill_config = tmp_path / "kill.yaml"
    kill_config.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {killed / 'checkpoints'}, save_last: true, every_n_train_steps: 1}}\n"
        f"    - class_path: kill_callback.KillAtStep\n      init_args: {{step: {step}}}\n")
    env = trainer_env(tiny_workspace, killed)
    env["PYTHONPATH"] += os.pathsep + str(REPO / "tests" / "scripts")
    proc = subprocess.run([sys.executable, "-m", "trainer", *args, "--config", str(kill_config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step
    run_trainer([*args, "--ckpt_path", "last"], tiny_workspace, killed)

    straight, after = final_metrics(straight_run), final_metrics(killed)
    for key in ("val/kl", "val/teacher_agreement", "val/accuracy", "epoch", "step"):
        assert float(after[key]) == pytest.approx(float(straight[key]), rel=1e-6, abs=1e-9), key
    a = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def probe_config(path: Path, runs: Path, extra_callbacks: str = "", trainer_extra: str = "",
                 model_extra: str = "") -> Path:
    """A second --config: tiny.yaml's checkpoint callback plus tests/scripts/probe_callback.StrategyProbe
    (lists in a later --config replace the earlier ones) reporting to `<path without suffix>/rank<r>.json`,
    and optional extra trainer/model settings."""
    path.write_text(
        "trainer:\n" + trainer_extra + "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {runs / 'checkpoints'}, save_last: true, every_n_train_steps: 1}}\n"
        f"    - class_path: probe_callback.StrategyProbe\n      init_args: {{out: {path.with_suffix('')}}}\n"
        + extra_callbacks
        + (f"model:\n  init_args:\n{model_extra}" if model_extra else ""))
    return path


def run_probed(args: list[str], workspace: Path, runs: Path, config: Path, timeout: int = 300):
    """`python -m trainer` with the probe config; returns (process, {rank: probe report})."""
    env = trainer_env(workspace, runs)
    env["PYTHONPATH"] += os.pathsep + str(REPO / "tests" / "scripts")
    proc = subprocess.run([sys.executable, "-m", "trainer", *args, "--config", str(config)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    probes = [json.loads(f.read_text()) for f in sorted(config.with_suffix("").glob("rank*.json"))]
    return proc, {p["rank"]: p for p in probes}


def deepspeed_module_states(ckpt: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The module state of a DeepSpeed checkpoint directory (prefix of Lightning's wrapper stripped) and the
    bytes of its model-states file(s)."""
    files = sorted((ckpt / "checkpoint").glob("*model_states.pt"))
    assert files, f"{ckpt} holds no DeepSpeed model states"
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    state = {k.removeprefix("_forward_module."): v for k, v in saved["module"].items()}
    return state, sum(f.stat().st_size for f in files)


HEAD = "pruned.selector."


def assert_trainable_keys_only(state: dict[str, torch.Tensor], lora: bool) -> None:
    head = [k for k in state if k.startswith("pruned.selector.")]
    adapters = [k for k in state if ".lora_" in k]
    assert head, sorted(state)[:10]
    assert bool(adapters) == lora, sorted(state)[:10]
    assert sorted(head + adapters) == sorted(state), sorted(set(state) - set(head) - set(adapters))[:10]


def assert_export_matches(head_dir: Path, consolidated: dict[str, torch.Tensor], lora: bool) -> None:
    """The exported head holds full (not partitioned) weights equal to the checkpoint's consolidated ones."""
    from safetensors.torch import load_file

    head = PrunerHead.from_pretrained(head_dir)
    expected = {k: v.shape for k, v in head.state_dict().items()}  # a head built from the saved config
    weights = load_file(str(head_dir / "model.safetensors"))
    assert {k: v.shape for k, v in weights.items()} == expected
    for name, value in weights.items():
        torch.testing.assert_close(value, consolidated["pruned.selector." + name].float(), rtol=0, atol=0)
    if lora:
        adapter = load_file(str(head_dir / "adapter" / "adapter_model.safetensors"))
        lora_keys = {k.removeprefix("pruned.model."): v for k, v in consolidated.items() if ".lora_" in k}
        assert adapter.keys() == lora_keys.keys() and adapter
        for name, value in adapter.items():
            torch.testing.assert_close(value, lora_keys[name].float(), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_multi_process_fit_export_load(strategy, tiny_workspace, tmp_path):
    """`--trainer.strategy NAME` reaches the trainer: the DeepSpeed names run learnprune's DeepSpeed strategy
    at the stage asked (CPU, 2 ranks) and write a DeepSpeed checkpoint that holds only the trained weights;
    export works from it; stage 2 resumes from it with `--ckpt_path last`."""
    from trainer.cli import load_training_checkpoint

    config = probe_config(tmp_path / "probe.yaml", tmp_path)
    args = ["fit", "--config", CONFIG, "--trainer.max_epochs", "1", "--trainer.devices", "2",
            "--trainer.strategy", strategy]
    _, probes = run_probed(args, tiny_workspace, tmp_path, config)
    assert sorted(probes) == [0, 1], probes
    deepspeed = strategy.startswith("deepspeed")
    for probe in probes.values():
        assert probe["world_size"] == 2
        if deepspeed:
            assert (probe["module"], probe["strategy"]) == ("trainer.strategies", "DeepSpeedStrategy"), probe
            assert probe["stage"] == int(strategy[-1]) and probe["exclude_frozen_parameters"] is True, probe
        else:
            assert probe["strategy"] == "DDPStrategy", probe

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    if deepspeed:  # a directory of per-rank shards, not a Lightning .ckpt file
        assert ckpt.is_dir() and len(list((ckpt / "checkpoint").glob("*optim_states.pt"))) == 2
        state, size = deepspeed_module_states(ckpt)
        assert_trainable_keys_only(state, lora=False)
        print(f"{strategy}: {len(state)} module keys, {size} bytes of model states")
    else:
        assert ckpt.is_file()
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert_trainable_keys_only(state, lora=False)
    consolidated = load_training_checkpoint(ckpt)
    assert "pruner_config" in consolidated
    run_trainer(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "head")], tiny_workspace, tmp_path)
    assert_export_matches(tmp_path / "head", consolidated["state_dict"], lora=False)
    head_prunes(tmp_path / "head", tiny_workspace)

    if strategy == "deepspeed_stage_2":
        # resume: the probe reads the restored step and the trained weights as the second epoch starts
        trained = sum(v.double().sum().item() for k, v in consolidated["state_dict"].items()
                      if k.startswith("pruned.selector."))
        _, resumed = run_probed([*args[:4], "2", *args[5:], "--ckpt_path", "last"], tiny_workspace, tmp_path,
                                probe_config(tmp_path / "resumed.yaml", tmp_path))
        for probe in resumed.values():
            assert probe["start_step"] == consolidated["global_step"] == 2, probe
            assert probe["start_head_sum"] == pytest.approx(trained, rel=1e-9, abs=1e-9), probe


@pytest.mark.slow
def test_zero3_partitioned_stage2_lora_report_and_export(tiny_workspace, tmp_path):
    """ZeRO-3 with every parameter partitioned (tests/scripts/zero3_partition_all.json: persistence threshold
    0; the preset's 1e5 keeps every tiny weight whole), 2 CPU ranks, stage 2 at layer 2 and LoRA on the
    language model: the stage-2 q/k recompute, the CLS-attention recompute, the head and LoRA run on
    partitioned weights; ReportAccuracy evaluates and exports on every rank (rank 0 prints what one process
    computes from the consolidated checkpoint, and writes full weights equal to the ones `trainer export`
    consolidates from it); the run resumes from its checkpoint."""
    from trainer.cli import load_training_checkpoint

    strategy = (
        "  strategy:\n    class_path: trainer.strategies.DeepSpeedStrategy\n"
        f"    init_args: {{config: {REPO / 'tests' / 'scripts' / 'zero3_partition_all.json'}}}\n")
    report = ("    - class_path: trainer.callbacks.ReportAccuracy\n"
              f"      init_args: {{export_dir: {tmp_path / 'reported'}, max_batches: 1}}\n")
    args = ["fit", "--config", CONFIG, "--trainer.max_epochs", "1", "--trainer.devices", "2"]
    config = probe_config(tmp_path / "probe.yaml", tmp_path, report, strategy, "    lora: {r: 4}\n")
    proc, probes = run_probed(args, tiny_workspace, tmp_path, config)
    assert sorted(probes) == [0, 1], probes
    for probe in probes.values():
        assert probe["strategy"] == "DeepSpeedStrategy" and probe["stage"] == 3, probe
        assert probe["exclude_frozen_parameters"] is True, probe
        params = probe["params"]
        assert {"language.q_proj", "language.k_proj", "language.q_proj.lora_A", "vision.q_proj",
                "vision.k_proj"} <= params.keys() and any(k.startswith("head.") for k in params), params
        for name, state in params.items():
            # partitioned and released outside forward: each rank keeps its shard only
            assert state is not None and not state["persist"], (name, state)
            assert state["data"] == 0 and state["shard"] < state["numel"], (name, state)
    out = proc.stdout + proc.stderr
    assert out.count("Validation answer accuracy -- unpruned") == 1, out[-3000:]  # rank 0 alone prints

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state, size = deepspeed_module_states(ckpt)
    assert_trainable_keys_only(state, lora=True)
    print(f"zero3 partitioned + LoRA: {len(state)} module keys, {size} bytes of model states")
    # in-process: test_multi_process_fit_export_load runs the `python -m trainer export` entry point
    export(["--ckpt", str(ckpt), "--out", str(tmp_path / "exported")])
    checkpoint = load_training_checkpoint(ckpt)
    consolidated = checkpoint["state_dict"]

    # the report computed on partitioned weights == one process evaluating the consolidated weights
    def init_args(hparams):  # LightningCLI adds "_class_path" and "_instantiator" to the hyper-parameters
        return {k: v for k, v in hparams.items() if not k.startswith("_")}

    module = DistillPruner(**init_args(checkpoint["hyper_parameters"]))
    assert not set(module.load_state_dict(consolidated, strict=False).unexpected_keys)
    data = LlavaDataModule(**init_args(checkpoint["datamodule_hyper_parameters"]))
    data.setup("validate")
    values = module.evaluate(data.val_dataloader(), max_batches=1)
    assert ReportAccuracy.message(values, module.pruned.adapter.num_image_tokens) in out, out[-3000:]
    assert_export_matches(tmp_path / "reported", consolidated, lora=True)  # ReportAccuracy's (end of fit)
    assert_export_matches(tmp_path / "exported", consolidated, lora=True)  # python -m trainer export's
    head_prunes(tmp_path / "exported", tiny_workspace)

    trained = sum(v.double().sum().item() for k, v in consolidated.items() if k.startswith(HEAD))
    resume_config = probe_config(tmp_path / "resumed.yaml", tmp_path, "", strategy, "    lora: {r: 4}\n")
    _, resumed = run_probed([*args[:4], "2", *args[5:], "--ckpt_path", "last"], tiny_workspace, tmp_path,
                            resume_config)
    for probe in resumed.values():
        assert probe["start_step"] == 2 and probe["start_head_sum"] == pytest.approx(trained, rel=1e-9), probe


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
