"""The benchmark's FLOPs model (bench/flops.py) equals PyTorch's own count of every matrix product of a pruned
prefill, on a tiny LLaVA with eager attention (FlopCounterMode does not see CPU SDPA kernels), for the unpruned
model, stage 1 and stage 1 + 2; and a hand count of one small configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from data.tiny import tiny_llava, tiny_tokenizer
from modules.pruned_vlm import PrunedVLM, PruningPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from flops import Geometry, prefill_flops  # noqa: E402


@pytest.mark.parametrize("plan_args", [{}, {"n1": 6}, {"n1": 6, "n2": 3, "layer": 2}],
                         ids=["unpruned", "stage1", "stage1+2"])
def test_flops_model_equals_pytorchs_count(plan_args):
    model = tiny_llava(tiny_tokenizer())
    model.config._attn_implementation = "eager"
    g = Geometry.from_llava_config(model.config)
    text, batch = 10, 2
    ids = torch.randint(10, 30, (batch, text))
    ids = torch.cat([ids[:, :3], torch.full((batch, g.num_tokens), model.config.image_token_id), ids[:, 3:]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(batch, 3, g.image, g.image)}
    plan = PruningPlan(**({"stage1": "random", "n1": plan_args["n1"]} if plan_args else {}),
                       **({"stage2": "fastv", "n2": plan_args["n2"], "layer": plan_args["layer"]}
                          if "n2" in plan_args else {}))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        PrunedVLM(model, plan)(**inputs, logits_to_keep=1)
    assert counter.get_total_flops() == prefill_flops(g, text, batch=batch, **plan_args)["total"]


def test_flops_model_by_hand():
    # one 2x2-patch image (N = 4, T = 5 with [CLS]), d_v = 2, f_v = 4, one vision layer; LM: D = 4, one head of 4,
    # no GQA, f = 8, 2 layers, V = 10; 3 text tokens -> L = 7; patch 1 pixel, 3 channels
    g = Geometry(v_hidden=2, v_layers=1, v_ffn=4, image=2, patch=1, hidden=4, layers=2, heads=1, kv_heads=1,
                 head_dim=4, ffn=8, vocab=10)
    vision = 2 * 4 * 3 * 1 * 2 + (2 * 5 * (4 * 4 + 2 * 2 * 4) + 4 * 25 * 2)  # 48 + 520
    projector = 2 * 4 * (2 * 4 + 4 * 4)  # 192
    layer = 2 * 7 * (16 + 2 * 16 + 16 + 3 * 32) + 4 * 49 * 4  # 2240 + 784
    parts = prefill_flops(g, text=3)
    assert parts["vision"] == vision == 568 and parts["projector"] == projector == 192
    assert parts["lm_before_k"] == 2 * layer and parts["lm_head"] == 80
    assert parts["total"] == 568 + 192 + 2 * 3024 + 80
    # keeping 2 of 4 tokens in layer 1 only: L = 5 there
    pruned = prefill_flops(g, text=3, n1=4, n2=2, layer=1)
    assert pruned["lm_after_k"] == 2 * 5 * 160 + 4 * 25 * 4


def test_efficiency_benchmark_runs_at_tiny_size(tmp_path):
    """The benchmark's whole path (ours, the usual eager way, FLOPs, outputs) at tiny size; no timing asserted.
    KV-cache bytes after prefill follow the tokens kept in each layer (stage 2 halves the cache of layers >= K)."""
    from efficiency import main

    rows = main(["--geometry", "tiny", "--batches", "1", "--repeats", "1", "--new-tokens", "2", "--out",
                 str(tmp_path)])
    assert [r["budget"] for r in rows] == ["all", 12, 8, 4, 2]
    assert {"efficiency.md", "efficiency.json"} <= {p.name for p in tmp_path.iterdir()}
    base = rows[0]
    for r in rows[1:]:
        assert r["usual_prefill_ms"] > 0 and r["ideal"] > 1.0 and r["gflops"] < base["gflops"]
        text = 64 + 0  # text tokens of the prompt (the image adds N = 16)
        layers, k = 4, 2
        expected = (k * (text + r["n1"]) + (layers - k) * (text + r["n2"])) / (layers * (text + 16))
        assert abs(r["kv_mb"] / base["kv_mb"] - expected) < 1e-6


@pytest.mark.parametrize("plan_args", [{}, {"n1": 4}, {"n1": 4, "n2": 2, "layer": 3},
                                       {"n1": 4, "selector": "fastervlm"}],
                         ids=["unpruned", "stage1", "stage1+2", "attention-score"])
def test_qwen25_vl_flops_model_equals_pytorchs_count(plan_args):
    """Windowed and full-attention vision blocks (the model's own window partition), the merger, M-RoPE layers."""
    import numpy as np
    from flops import qwen25_vl_prefill_flops
    from PIL import Image

    from data.tiny import tiny_qwen, tiny_qwen_processor, tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer(family="qwen2_5_vl")
    processor = tiny_qwen_processor("qwen2_5_vl", tokenizer)
    model = tiny_qwen("qwen2_5_vl", tokenizer, attn_implementation="eager")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (130, 64, 3), dtype=np.uint8))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                        "text": "red"}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    _, h, w = inputs["image_grid_thw"][0].tolist()
    plan_args = dict(plan_args)
    selector = plan_args.pop("selector", "random")
    plan = PruningPlan(**({"stage1": selector, "n1": plan_args["n1"]} if plan_args else {}),
                       **({"stage2": "fastv", "n2": plan_args["n2"], "layer": plan_args["layer"]}
                          if "n2" in plan_args else {}))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        PrunedVLM(model, plan)(**inputs, logits_to_keep=1)
    text_tokens = inputs["input_ids"].shape[1] - h * w // 4
    score = plan.selector is not None and plan.selector.needs_attention()  # "random" reads no attention
    expected = qwen25_vl_prefill_flops(model.config, (h, w), text_tokens, **plan_args, score=score)
    assert counter.get_total_flops() == expected["total"]


def test_stage2_memory_benchmark_runs_at_tiny_size(tmp_path):
    """The sequence sweep's whole path (ours, the usual eager way, the (L, L) reference) at tiny size; no timing
    asserted. The (L, L) column is one layer's (H, L, L) fp32 attention."""
    from stage2_memory import main

    rows = main(["--geometry", "tiny", "--text-tokens", "8,40", "--repeats", "1", "--out", str(tmp_path)])
    assert [r["length"] for r in rows] == [16 + 8, 16 + 40]
    assert {"stage2_memory.md", "stage2_memory.json"} <= {p.name for p in tmp_path.iterdir()}
    for r in rows:
        assert r["square_mb"] == pytest.approx(4 * r["length"] ** 2 * 4 / 2**20)
        assert r["ours_scoring_ms"] > 0 and r["usual_prefill_ms"] > 0
