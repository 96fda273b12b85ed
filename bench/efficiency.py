"""Prefill latency and decoding speed of pruned vs unpruned inference on a randomly initialised LLaVA.

    python bench/efficiency.py --geometry tiny
    python bench/efficiency.py --geometry llava15-7b --text-layers 4 --vision-layers 4   # 7B widths, reduced depth

Prints a markdown table; numbers, not assertions. Random weights: latency depends on shapes, not on values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from modules.budget import effective_budget
from modules.pruned_vlm import PrunedVLM, PruningPlan

GEOMETRIES = {
    # vision: hidden, layers, heads, image, patch | text: hidden, layers, heads, kv heads, ffn
    "tiny": dict(v=(32, 3, 4, 32, 8), t=(64, 4, 4, 2, 128)),
    "llava15-7b": dict(v=(1024, 24, 16, 336, 14), t=(4096, 32, 32, 32, 11008)),
}


def build(geometry: str, text_layers: int | None, vision_layers: int | None, dtype) -> LlavaForConditionalGeneration:
    (vh, vl, vheads, img, patch), (th, tl, theads, kv, ffn) = GEOMETRIES[geometry]["v"], GEOMETRIES[geometry]["t"]
    vision = CLIPVisionConfig(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vision_layers or vl,
                              num_attention_heads=vheads, image_size=img, patch_size=patch)
    text = LlamaConfig(vocab_size=32064, hidden_size=th, intermediate_size=ffn, num_hidden_layers=text_layers or tl,
                       num_attention_heads=theads, num_key_value_heads=kv, max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2)
    cfg._attn_implementation = "sdpa"
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--text-layers", type=int)
    parser.add_argument("--vision-layers", type=int)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build(args.geometry, args.text_layers, args.vision_layers, getattr(torch, args.dtype))
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    n_layers = model.config.text_config.num_hidden_layers
    ids = torch.randint(10, 1000, (args.batch, args.text_tokens))
    ids = torch.cat([ids[:, :5], torch.full((args.batch, n), model.config.image_token_id), ids[:, 5:]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(args.batch, 3, vc.image_size, vc.image_size, dtype=model.dtype)}
    k = max(1, n_layers // 2)
    n2 = max(1, n // 18)
    plans = {
        "unpruned": PruningPlan(),
        f"random n1={n // 4}": PruningPlan(stage1="random", n1=n // 4),
        f"random n1={n // 9}": PruningPlan(stage1="random", n1=n // 9),
        f"random n1={n // 4} + fastv n2={n2} @K={k}": PruningPlan(stage1="random", n1=n // 4, stage2="fastv",
                                                              n2=n2, layer=k),
    }
    print(f"geometry={args.geometry} N={n} text layers={n_layers} batch={args.batch} dtype={args.dtype} "
          f"threads={torch.get_num_threads()}")
    print("| plan | n_eff | prefill ms | speed-up | decode tok/s |")
    print("|---|---|---|---|---|")
    base = None
    for name, plan in plans.items():
        pruned = PrunedVLM(model, plan)
        n1, n2 = plan.budgets(n)
        n_eff = effective_budget(n1, n2, k, n_layers)
        with torch.no_grad():
            prefill = timed(lambda p=pruned: p(**inputs, logits_to_keep=1), args.repeats)
            total = timed(lambda p=pruned: p.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False,
                                                      min_new_tokens=args.new_tokens), args.repeats)
        base = base or prefill
        decode = args.batch * (args.new_tokens - 1) / max(total - prefill, 1e-9)
        print(f"| {name} | {n_eff:.0f} | {prefill * 1e3:.1f} | {base / prefill:.2f}x | {decode:.1f} |")


if __name__ == "__main__":
    main()
