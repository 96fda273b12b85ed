"""A run killed while it writes a checkpoint never leaves one that loads but is corrupt: Lightning's checkpoints
and learnprune's pruner exports are written under a temporary name and renamed into place."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict

import torch
from test_cli import CONFIG, REPO, trainer_env

from modules.distill import HEAD_PREFIX, export_pruner
from modules.head import PrunerHead


def test_kill_while_writing_a_training_checkpoint_leaves_the_previous_one(tiny_workspace, tmp_path):
    config = tmp_path / "kill.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {tmp_path / 'checkpoints'}, save_last: true, save_top_k: -1,"
        " every_n_train_steps: 1}\n"
        "    - class_path: kill_callback.KillDuringSave\n      init_args: {step: 3}\n")
    env = trainer_env(tiny_workspace, tmp_path)
    env["PYTHONPATH"] += os.pathsep + str(REPO / "tests" / "scripts")
    proc = subprocess.run([sys.executable, "-m", "trainer", "fit", "--config", CONFIG, "--config", str(config),
                           "--trainer.max_epochs", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.suffix == ".ckpt")
    assert names == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"], names  # step 3's never appeared
    for name in names:  # and everything under a checkpoint name loads whole
        assert torch.load(tmp_path / "checkpoints" / name, weights_only=False)["global_step"] in (1, 2)
    # what did reach the disk is a stray temporary file, under no name a resume would pick
    strays = [p for p in (tmp_path / "checkpoints").iterdir() if p.suffix != ".ckpt"]
    assert all(p.stat().st_size > 0 for p in strays)


def test_kill_while_exporting_a_pruner_leaves_the_previous_export(tmp_path):
    from test_hub import small_head

    first, second = small_head(), small_head()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
    export_pruner(tmp_path / "pruner", asdict(first.config), {HEAD_PREFIX + k: v for k, v in first.state_dict().items()})
    torch.save({k: v for k, v in second.state_dict().items()}, tmp_path / "second.pt")
    script = textwrap.dedent(f"""
        import os, signal, sys
        from dataclasses import asdict
        import safetensors.torch as st
        import torch
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from modules.distill import HEAD_PREFIX, export_pruner
        from modules.head import PrunerHead
        state = torch.load({str(tmp_path / 'second.pt')!r})
        original = st.save_file
        def half_then_die(tensors, filename, metadata=None):
            original(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        st.save_file = half_then_die
        import modules.head
        modules.head.save_file = half_then_die
        from test_hub import small_head
        export_pruner({str(tmp_path / 'pruner')!r}, asdict(small_head().config),
                      {{HEAD_PREFIX + k: v for k, v in state.items()}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    loaded = PrunerHead.from_pretrained(tmp_path / "pruner")  # the previous export, whole
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), first.state_dict().values()))
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".pruner.partial-")]
    assert len(partial) == 1  # the interrupted export stayed under its temporary name
