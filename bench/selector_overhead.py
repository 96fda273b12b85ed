"""Time of each stage-1 selector at LLaVA-1.5 scale, and its share of a LLaVA-1.5-7B-shaped prefill.

    python bench/selector_overhead.py [--batch 8] [--tokens 576] [--dim 1024] [--repeats 5]

The prefill reference is measured on ONE decoder layer at Llama-7B width (4096 hidden, 11008 FFN, 32 heads)
over batch-1 sequences of N visual + 64 text tokens, then scaled to 32 layers and the batch (prefill cost is
linear in both at this length); the vision tower and LM head are left out, which makes the share an upper
bound. Prints a markdown table; numbers, not assertions.
"""

from __future__ import annotations

import argparse

import torch
from efficiency import timed  # bench/ is on sys.path when this script runs
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from modules.selectors import DEFAULT_SELECTORS
from modules.vlm import VisionTokens


def prefill_layer_seconds(seq_len: int, repeats: int) -> float:
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    rope = LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, seq_len, 4096)
    pos = torch.arange(seq_len).unsqueeze(0)
    cos_sin = rope(x, pos)
    with torch.no_grad():
        return timed(lambda: layer(x, position_embeddings=cos_sin, position_ids=pos), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    side = int(args.tokens**0.5)
    grid = (side, side) if side * side == args.tokens else None
    gen = torch.Generator().manual_seed(0)
    tokens = VisionTokens(
        feats=torch.randn(args.batch, args.tokens, args.dim, generator=gen),
        pre=torch.randn(args.batch, args.tokens, args.dim, generator=gen),
        cls_attn=torch.softmax(torch.randn(args.batch, args.tokens, generator=gen), dim=-1),
        grid=grid,
    )
    layer_s = prefill_layer_seconds(args.tokens + 64, max(1, args.repeats // 2))
    prefill_s = layer_s * 32 * args.batch
    print(f"N={args.tokens} D={args.dim} batch={args.batch} budget={args.budget} threads={torch.get_num_threads()}; "
          f"7B-shaped prefill ~ {prefill_s:.1f} s (one layer {layer_s * 1e3:.0f} ms x 32 layers x batch)")
    print("| selector | ms / batch | share of prefill |")
    print("|---|---|---|")
    for selector in DEFAULT_SELECTORS:
        with torch.no_grad():
            t = timed(lambda s=selector: s.select(tokens, args.budget), args.repeats)
        print(f"| {selector.name} | {t * 1e3:.2f} | {100 * t / prefill_s:.3f}% |")


if __name__ == "__main__":
    main()
