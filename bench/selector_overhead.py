"""Overhead of every stage-1 selector and stage-2 scorer, as a share of the unpruned prefill of the same geometry.

    python bench/selector_overhead.py [--batch 1] [--tokens 576,1296,2916] [--repeats 5] [--threads 8]
                                      [--device cpu] [--dtype float32]

For each N in --tokens (a square h x h grid when N is a square, else a 1 x N strip; 576 = 24 x 24 is LLaVA-1.5,
1296 = 36 x 36 and 2916 = 54 x 54 are Qwen2.5-VL-scale images) it times, with the median of --repeats calls after
one warm-up:

- every selector of `modules.selectors.DEFAULT_SELECTORS`: `selector.select(tokens, n)` with n = round(N / 9)
  (64 at N = 576) on VisionTokens with feats (B, N, 4096), pre (B, N, 1024), a softmaxed cls_attn (B, N), the
  grid, and `valid` with a pad-to-square band (h // 8 rows at the top and at the bottom, at least one each from
  h = 3 on);
- every scorer of `modules.scorers.DEFAULT_SCORERS`: `scorer.score(ctx)` and then `topk_per_image` (the selection
  `PrunedVLM` makes from the scores), on a `Stage2Context` over N visual + 64 text tokens (5 before the image, 59
  after it) scoring all N visual tokens with a budget of round(N * 0.05) per image. Its `logits_fn` is the real
  per-query recompute (`VLMAdapter.attention_logits`: input norm, q for the query rows, k for all rows, RoPE) of a
  Llama-7B-width decoder layer, so the time includes the q/k recompute the scorer triggers.

Calibrated components (`Calibrated`: debiased selector and scorer, agilepruner, finepruner scorer) are timed in
their serving state: a copy of each is calibrated first (`start_calibration` / `observe` / `finish_calibration`) on
two other random batches of the same geometry, so the debiased wrappers apply one fitted rate (no per-image trend
fit), AgilePruner uses a fitted erank_scale and the FinePruner scorer a fitted prior. The default instances are
never modified. The learned head (`needs_weights`) is not in DEFAULT_SELECTORS and is not timed.

Inputs are synthetic but not white noise, because the cosine structure drives how long k-means (finepruner) and
AgilePruner's diversity gate run: each token is a shared direction + the direction of its spatial region (a 6 x 6
lattice of regions over the grid) + noise (cosine ~0.8 within a region, ~0.4 across), and padding tokens are one
near-constant vector. Random weights: times depend on shapes and on this structure, not on trained values.

Reference ("unpruned prefill"): ONE Llama decoder layer at LLaVA-1.5-7B width (hidden 4096, 32 heads, FFN 11008,
SDPA, causal) over the whole batch of N + 64-token sequences, times 32 layers. Not included: the vision tower and
projector, the embedding lookup, the final norm and LM head, and any decoding. Leaving them out makes the
reference smaller, so the shares are upper bounds (the vision tower alone is a sizeable part of the real prefill).
Not included in the component times: computing cls_attn in the vision tower, the splice of the kept tokens, and
the row gathers stage 2 does in later layers.

Targets (of the efficiency issue): < 2% of the unpruned prefill at N <= 1000 (N = 576), < 5% at N >= 2000
(N ~ 2900); sizes in between have no stated target. Rows over target are marked OVER.

Prints a markdown table and writes it with a JSON record to bench/out/selector_overhead.{md,json} (bench/out/ is
git-ignored). Numbers, not assertions. The shares are those of the machine and device it runs on: a CPU run says
nothing about a GPU one, where per-token Python loops cost relatively more.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from modules.pruned_vlm import topk_per_image
from modules.scorers import DEFAULT_SCORERS, Stage2Context
from modules.selectors import DEFAULT_SELECTORS
from modules.selectors.base import Calibrated
from modules.vlm.base import VisionTokens, VLMAdapter

OUT = Path(__file__).resolve().parent / "out"
TEXT_BEFORE_IMAGE = 5  # "USER: " and the like; the rest of the text tokens follow the image
REGIONS = 6  # a REGIONS x REGIONS lattice of spatially coherent regions, whatever the grid
CALIBRATION_BATCHES = 2


def target_share(n: int) -> float | None:
    """The efficiency issue's bound on a component's share of the unpruned prefill at N tokens, or None."""
    if n <= 1000:
        return 0.02
    if n >= 2000:
        return 0.05
    return None


def grid_of(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def round_half_up(x: float) -> int:
    return max(1, math.floor(x + 0.5))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- synthetic inputs --------------------------------------------------------------------------------------------

def padding_band(grid: tuple[int, int], batch: int) -> torch.Tensor:
    """(B, N) bool: False on the top and bottom h // 8 rows (at least one each once h >= 3), as pad-to-square of a
    landscape image leaves them."""
    h, w = grid
    band = max(1, h // 8) if h >= 3 else 0
    rows = torch.arange(h).repeat_interleave(w)
    valid = (rows >= band) & (rows < h - band)
    return valid.expand(batch, -1).clone()


def structured_features(batch: int, grid: tuple[int, int], dim: int, valid: torch.Tensor,
                        gen: torch.Generator) -> torch.Tensor:
    """(B, N, dim) float32: shared direction + the direction of the token's spatial region + noise; padding tokens
    one near-constant vector per image."""
    h, w = grid
    idx = torch.arange(h * w)
    region = (idx // w * REGIONS // h) * REGIONS + (idx % w * REGIONS // w)
    shared = torch.randn(batch, 1, dim, generator=gen)
    centres = torch.randn(batch, REGIONS * REGIONS, dim, generator=gen)
    feats = shared + centres[:, region] + 0.7 * torch.randn(batch, h * w, dim, generator=gen)
    pad = torch.randn(batch, 1, dim, generator=gen) + 0.05 * torch.randn(batch, h * w, dim, generator=gen)
    return torch.where(valid.unsqueeze(-1), feats, pad)


def vision_tokens(batch: int, n: int, width: int, pre_dim: int, seed: int, device, dtype) -> VisionTokens:
    gen = torch.Generator().manual_seed(seed)
    grid = grid_of(n)
    valid = padding_band(grid, batch)
    feats = structured_features(batch, grid, width, valid, gen)
    pre = structured_features(batch, grid, pre_dim, valid, gen)
    cls_attn = torch.softmax(2.0 * torch.randn(batch, n, generator=gen), dim=-1)
    return VisionTokens(feats=feats.to(device, dtype), pre=pre.to(device, dtype), cls_attn=cls_attn.to(device, dtype),
                        valid=valid.to(device), grid=grid)


class _OneLayer:
    """The slice of a VLMAdapter that `VLMAdapter.attention_logits` reads: one decoder layer."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer

    def language_layers(self):
        return [self.layer]


def stage2_context(layer: torch.nn.Module, rope: torch.nn.Module, batch: int, n: int, text: int, seed: int,
                   device, dtype) -> Stage2Context:
    """N visual tokens between TEXT_BEFORE_IMAGE and text - TEXT_BEFORE_IMAGE text tokens; all N scored, a budget
    of round(N * 0.05) per image; logits from `layer`'s own projections and RoPE (the adapter's recompute)."""
    tokens = vision_tokens(batch, n, layer.hidden_size, 8, seed, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    length = n + text
    before = min(TEXT_BEFORE_IMAGE, text)
    hidden = torch.randn(batch, length, layer.hidden_size, generator=gen)
    hidden[:, before:before + n] = tokens.feats
    hidden = hidden.to(device, dtype)
    position_ids = torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
    cos_sin = rope(hidden, position_ids)
    adapter = _OneLayer(layer)

    def logits_fn(query_index: torch.Tensor) -> torch.Tensor:
        # keys rebuilt per call: the timed scorer pays for the whole recompute, as the pruned forward does
        return VLMAdapter.attention_logits(adapter, 0, hidden, cos_sin)(query_index)

    slots = torch.arange(before, before + n, device=device).expand(batch, -1)
    return Stage2Context(
        logits_fn=logits_fn,
        attention_mask=torch.ones(batch, length, dtype=torch.long, device=device),
        vision_slots=slots,
        vision_index=torch.arange(n, device=device).expand(batch, -1),
        vision_valid=tokens.valid.to(device),
        vision_hidden=hidden[:, before:before + n],
        budget=torch.full((batch, 1), round_half_up(n * 0.05), dtype=torch.long, device=device),
        vision_image=torch.zeros(batch, n, dtype=torch.long, device=device),
        vision_grid=torch.tensor(tokens.grid, device=device).expand(batch, n, 2),
    )


# ---- components --------------------------------------------------------------------------------------------------

def label(component) -> str:
    inner = getattr(component, "inner", None)
    return f"{component.name}({inner.name})" if inner is not None and hasattr(inner, "name") else component.name


def serving_copy(component, calibration_inputs) -> tuple[object, str]:
    """A calibrated copy of a `Calibrated` component (fitted on `calibration_inputs()`), else the component."""
    if not isinstance(component, Calibrated):
        return component, "no calibration"
    component = copy.deepcopy(component)
    component.start_calibration()
    with torch.no_grad():
        for inputs in calibration_inputs():
            component.observe(inputs)
    component.finish_calibration()
    return component, f"calibrated on {CALIBRATION_BATCHES} batches"


def build_layer(width: int, heads: int, ffn: int, device, dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    cfg = LlamaConfig(hidden_size=width, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device, dtype).eval()
    layer.hidden_size = width
    return layer, LlamaRotaryEmbedding(cfg).to(device)


def prefill_layer_seconds(layer, rope, batch: int, length: int, repeats: int, device, dtype) -> float:
    x = torch.randn(batch, length, layer.hidden_size, device=device, dtype=dtype)
    pos = torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
    cos_sin = rope(x, pos)
    with torch.no_grad():
        return timed(lambda: layer(x, position_embeddings=cos_sin, position_ids=pos), repeats, device)


def time_components(layer, rope, batch: int, n: int, text: int, pre_dim: int, repeats: int, device, dtype):
    """Yield (component, stage, budget, state, seconds) for every default selector and scorer at N = n."""
    width = layer.hidden_size
    inputs = vision_tokens(batch, n, width, pre_dim, 0, device, dtype)
    n1 = round_half_up(n / 9)
    for base in DEFAULT_SELECTORS:
        selector, state = serving_copy(base, lambda: [vision_tokens(batch, n, width, pre_dim, 100 + i, device, dtype)
                                                      for i in range(CALIBRATION_BATCHES)])
        with torch.no_grad():
            seconds = timed(lambda s=selector: s.select(inputs, n1), repeats, device)
        yield selector, 1, n1, state, seconds

    ctx = stage2_context(layer, rope, batch, n, text, 0, device, dtype)
    for base in DEFAULT_SCORERS:
        scorer, state = serving_copy(base, lambda: [stage2_context(layer, rope, batch, n, text, 100 + i, device, dtype)
                                                    for i in range(CALIBRATION_BATCHES)])
        with torch.no_grad():
            seconds = timed(lambda s=scorer: topk_per_image(s.score(ctx), ctx), repeats, device)
        yield scorer, 2, int(ctx.budget[0, 0]), state, seconds


def run(tokens: list[int], batch: int = 1, repeats: int = 5, width: int = 4096, heads: int = 32, ffn: int = 11008,
        layers: int = 32, pre_dim: int = 1024, text: int = 64, device: str = "cpu", dtype: str = "float32",
        log=print) -> dict:
    """Time every component at every N; returns {"config", "prefill", "rows"} (see `markdown`)."""
    device = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    layer, rope = build_layer(width, heads, ffn, device, torch_dtype)
    config = dict(batch=batch, repeats=repeats, width=width, heads=heads, ffn=ffn, layers=layers, pre_dim=pre_dim,
                  text_tokens=text, device=str(device), dtype=dtype, threads=torch.get_num_threads(),
                  torch=torch.__version__)
    prefill, rows = {}, []
    for n in tokens:
        layer_s = prefill_layer_seconds(layer, rope, batch, n + text, max(1, repeats // 2), device, torch_dtype)
        prefill_s = layer_s * layers
        prefill[n] = dict(grid=list(grid_of(n)), sequence=n + text, layer_ms=layer_s * 1e3, prefill_ms=prefill_s * 1e3)
        log(f"N={n} grid={grid_of(n)}: one layer {layer_s * 1e3:.1f} ms, unpruned prefill ~ {prefill_s * 1e3:.0f} ms")
        for component, stage, budget, state, seconds in time_components(layer, rope, batch, n, text, pre_dim,
                                                                          repeats, device, torch_dtype):
            share, target = seconds / prefill_s, target_share(n)
            rows.append(dict(component=label(component), stage=stage, n=n, budget=budget, state=state,
                             ms=seconds * 1e3, share=share, target=target,
                             over=None if target is None else bool(share >= target)))
            log(f"  stage {stage} {label(component)}: {seconds * 1e3:.2f} ms ({100 * share:.3f}%)")
    return dict(config=config, prefill=prefill, rows=rows)


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"batch {cfg['batch']}, {cfg['device']} {cfg['dtype']}, {cfg['threads']} threads, median of "
        f"{cfg['repeats']}; reference: one {cfg['width']}-wide decoder layer (FFN {cfg['ffn']}, {cfg['heads']} heads, "
        f"SDPA) over N + {cfg['text_tokens']} tokens x {cfg['layers']} layers",
        "",
        "| N | grid | one layer (ms) | unpruned prefill (ms) |",
        "|---|---|---|---|",
    ]
    for n, p in result["prefill"].items():
        lines.append(f"| {n} | {p['grid'][0]}x{p['grid'][1]} | {p['layer_ms']:.1f} | {p['prefill_ms']:.0f} |")
    lines += ["", "| component | stage | N | budget | state | ms per batch | % of unpruned prefill | target |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mark = "-" if r["target"] is None else f"< {100 * r['target']:.0f}%" + (" **OVER**" if r["over"] else " ok")
        lines.append(f"| {r['component']} | {r['stage']} | {r['n']} | {r['budget']} | {r['state']} | {r['ms']:.2f} | "
                     f"{100 * r['share']:.3f}% | {mark} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", default="576,1296,2916", help="comma-separated N (squares get a square grid)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    # the reference geometry (LLaVA-1.5-7B); smaller values are for smoke tests
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--pre-dim", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT, help="folder for selector_overhead.{md,json}")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    result = run(tokens, batch=args.batch, repeats=args.repeats, width=args.width, heads=args.heads, ffn=args.ffn,
                 layers=args.layers, pre_dim=args.pre_dim, text=args.text_tokens, device=args.device,
                 dtype=args.dtype, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    table = markdown(result)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selector_overhead.md").write_text(table + "\n")
    (args.out / "selector_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out / 'selector_overhead.md'} and .json", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
