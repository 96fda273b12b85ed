"""The shipped 8-GPU recipes parse through `python -m trainer fit --print_config` and hold what their comments say:
the real hub ids, DeepSpeed, bf16, and ratio budgets for the families whose images have their own token counts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from test_cli import REPO

RECIPES = {
    "llava15_7b": ("llava-hf/llava-1.5-7b-hf", int),
    "qwen25vl_7b": ("Qwen/Qwen2.5-VL-7B-Instruct", float),
    "qwen3vl_8b": ("Qwen/Qwen3-VL-8B-Instruct", float),
    "llava_next_7b": ("llava-hf/llava-v1.6-mistral-7b-hf", float),
    "llava_onevision_7b": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", float),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses_with_its_promises(name):
    model_id, budget_type = RECIPES[name]
    proc = subprocess.run([sys.executable, "-m", "trainer", "fit", "--config",
                           str(REPO / "configs" / name / "learnpruner.yaml"), "--print_config"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = yaml.safe_load(proc.stdout)
    args = config["model"]["init_args"]
    assert args["model"] == model_id and config["data"]["init_args"]["processor"] == model_id
    assert config["trainer"]["strategy"].startswith("deepspeed_stage_")
    assert config["trainer"]["precision"] == "bf16-mixed" and config["trainer"]["devices"] == 8
    assert isinstance(args["n1"], budget_type) and isinstance(args["n2"], budget_type) and args["n2"] <= args["n1"]
