"""`python -m trainer fit` on tiny Qwen2.5-VL / Qwen3-VL workspaces (`python -m data.tiny --family ...`): the
images-only processor saves and loads (data/processors.py), the head trains with ratio budgets, exports, and the
exported pruner serves the tiny model keeping round(r * N_i) tokens of each image at each stage."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from test_cli import REPO, run_trainer
from transformers import AutoModelForImageTextToText

from conftest import make_images
from data.processors import load_processor
from data.tiny import TinyQwen2_5_VLProcessor, TinyQwen3VLProcessor
from modules.head import PrunerHead
from modules.serve import load_pruned
from trainer.cli import export

FAMILIES = {"qwen2_5_vl": ("tiny_qwen25vl.yaml", TinyQwen2_5_VLProcessor),
            "qwen3_vl": ("tiny_qwen3vl.yaml", TinyQwen3VLProcessor)}


def fit_and_export(family: str, config: str, mode: str, tmp_path, timeout: int = 300):
    """Write the family's tiny workspace, `python -m trainer fit` one epoch in `mode`, export the head to
    tmp_path/head; returns the workspace. Checks that no record was skipped and the metrics were logged."""
    workspace, runs = tmp_path / "ws", tmp_path / "runs"
    subprocess.run([sys.executable, "-m", "data.tiny", str(workspace), "--family", family], cwd=REPO, check=True,
                   capture_output=True)
    proc = run_trainer(["fit", "--config", str(REPO / "configs" / config), "--trainer.max_epochs", "1",
                        "--model.init_args.head.mode", mode, "--model.init_args.policy_samples", "2"],
                       workspace, runs, timeout=timeout)
    assert "train: skipped 0 of 48 records" in proc.stdout + proc.stderr
    metrics = (runs / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for name in ("train/kl_step", "val/teacher_agreement", "val/kept_ratio"):
        assert name in metrics
    export(["--ckpt", str(runs / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "head")])
    return workspace


@pytest.mark.parametrize(("family", "mode"), [("qwen2_5_vl", "straight_through"), ("qwen3_vl", "straight_through"),
                                            ("qwen2_5_vl", "policy"), ("qwen3_vl", "soft_mask")])
def test_fit_export_load_prune(family, mode, tmp_path):
    """Every training mode of the head on variable-N images: policy samples several selections of each prompt's
    images from one encoding (flat Qwen patches are not replicated), soft masks bias every visual key."""
    config, processor_class = FAMILIES[family]
    workspace = fit_and_export(family, config, mode, tmp_path)
    assert type(load_processor(workspace / "model")) is processor_class  # AutoProcessor would give the tokenizer

    head = PrunerHead.from_pretrained(tmp_path / "head")
    assert (head.config.n1, head.config.n2, head.config.layer) == (0.5, 0.25, 3)
    model = AutoModelForImageTextToText.from_pretrained(workspace / "model").eval()
    processor = load_processor(workspace / "model")
    content = [{"type": "image"}, {"type": "text", "text": "what is the color ?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = make_images(((100, 60), (64, 130), (90, 90)))[:3]
    inputs = processor(images=images, text=[text] * 3, return_tensors="pt", padding=True)
    n_tokens = (inputs["image_grid_thw"].prod(dim=1) // 4).tolist()
    assert len(set(n_tokens)) > 1  # variable tokens per image

    pruned = load_pruned(model, tmp_path / "head", processor=processor)
    with torch.no_grad():
        ids = pruned.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert ids.shape == (3, inputs["input_ids"].shape[1] + 2)
    for stage, ratio in (("stage1", 0.5), ("stage2", 0.25)):
        assert [len(k) for k in pruned.last_kept[stage]] == [int(np.floor(ratio * n + 0.5)) for n in n_tokens]
