"""Speed, memory and FLOPs of pruned vs unpruned inference, side by side with the usual way of pruning.

    python bench/efficiency.py --geometry llava15-7b --text-layers 2 --vision-layers 2     # CPU: reduced depth
    python bench/efficiency.py --geometry llava15-7b --device cuda --dtype bfloat16         # GPU: full depth
    python bench/efficiency.py --geometry qwen25vl-7b --text-layers 2 --vision-layers 4 --batches 1
    python bench/efficiency.py --geometry tiny                                              # seconds (tests)

A randomly initialised VLM at the real widths (LLaVA-1.5-7B: CLIP ViT-L/336, 576 tokens, Llama-7B layers; or
Qwen2.5-VL-7B with one 1008 x 1008 image, 1296 tokens); latency depends on shapes, not values. For each batch size and each budget n_eff (FLOPs-equivalent visual tokens
per layer: `all`, 192, 128, 64, 32) the plan is FasterVLM at stage 1 (n1 = 1.5 n_eff) and FastV at stage 2
(n2 = 0.5 n_eff from layer K = L/2), so (K n1 + (L - K) n2) / L = n_eff. Reported per configuration:

- prefill ms (one forward over the prompt, cache on, logits for the last position), time to first token (generate
  one token), decode tokens/s (the rest of `--new-tokens`), peak memory above the model (CUDA: allocator peak; CPU:
  resident-set peak sampled every 2 ms after returning freed heap memory to the OS), KV-cache bytes after prefill;
- FLOPs of the configuration (bench/flops.py: vision tower, projector, LM before and after K, the pruner's own
  products), the achieved prefill speed-up, the FLOPs-ideal speed-up of the same configuration and their ratio,
  and the ideal speed-up of the full-depth model for reference;
- `usual`: the same plan run the usual way, with eager attention in the whole language model and
  `output_attentions=True` (what attention-score pruning needs without a q/k recompute): its prefill ms and peak
  memory; and the stage-2 scoring cost of each way: ours is the scorer's own time inside the prefill (q/k
  recompute of the query rows included), the usual way's is what eager attention with `output_attentions` adds
  to the layers (prefill with stage 1 alone, eager + output_attentions minus SDPA).

Writes bench/out/efficiency.{md,json,png}. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import threading
import time
from pathlib import Path

import psutil
import torch
from flops import Geometry, prefill_flops, qwen25_vl_prefill_flops  # bench/ is on sys.path when run
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from modules.budget import effective_budget
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.selectors import SELECTORS

GEOMETRIES = {
    # vision: hidden, layers, heads, MLP, image, patch | text: hidden, layers, heads, kv heads, MLP, vocab
    "tiny": dict(v=(32, 3, 4, 64, 32, 8), t=(64, 4, 4, 2, 128, 64)),
    "llava15-7b": dict(v=(1024, 24, 16, 4096, 336, 14), t=(4096, 32, 32, 32, 11008, 32064)),
}
BUDGETS = ("all", 192, 128, 64, 32)
# Qwen2.5-VL-7B (Qwen/Qwen2.5-VL-7B-Instruct config.json): vision 1280 wide, 16 heads, MLP 3420, 32 blocks with
# full attention in 7/15/23/31 (windows of 112 px elsewhere); LM 3584 wide, 28 layers, 28 heads, 4 kv heads, MLP
# 18944. The vocabulary is cut to 32064 (it only sizes the LM head's one row); one 1008 x 1008 image = 72 x 72
# patches = 1296 merged tokens.
QWEN25_VL_7B = dict(vision=dict(hidden_size=1280, num_heads=16, intermediate_size=3420, depth=32, patch_size=14,
                                window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584,
                                spatial_merge_size=2, temporal_patch_size=2),
                    text=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                              intermediate_size=18944, vocab_size=32064, max_position_embeddings=8192,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                               "mrope_section": [16, 24, 24]}),
                    grid=(72, 72))


def build_qwen25_vl(text_layers: int | None, vision_layers: int | None, dtype, attn: str = "sdpa"):
    """A random Qwen2.5-VL at 7B widths; with reduced vision depth the full-attention blocks keep their share (the
    last block of every quarter)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(QWEN25_VL_7B["vision"])
    if vision_layers:
        vision["depth"] = vision_layers
        quarter = max(1, vision_layers // 4)
        vision["fullatt_block_indexes"] = sorted({min(vision_layers, i + quarter) - 1
                                                  for i in range(0, vision_layers, quarter)})
    text = dict(QWEN25_VL_7B["text"])
    if text_layers:
        text["num_hidden_layers"] = text_layers
    vocab = text["vocab_size"]
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1,
                           video_token_id=vocab - 2, vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def build(geometry: str, text_layers: int | None, vision_layers: int | None, dtype, attn: str = "sdpa"
          ) -> LlavaForConditionalGeneration:
    if geometry == "qwen25vl-7b":
        return build_qwen25_vl(text_layers, vision_layers, dtype, attn)
    (vh, vl, vheads, vffn, img, patch), (th, tl, theads, kv, ffn, vocab) = (GEOMETRIES[geometry]["v"],
                                                                           GEOMETRIES[geometry]["t"])
    vision = CLIPVisionConfig(hidden_size=vh, intermediate_size=vffn, num_hidden_layers=vision_layers or vl,
                              num_attention_heads=vheads, image_size=img, patch_size=patch)
    text = LlamaConfig(vocab_size=vocab, hidden_size=th, intermediate_size=ffn, num_hidden_layers=text_layers or tl,
                       num_attention_heads=theads, num_key_value_heads=kv, max_position_embeddings=4096)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1, vision_feature_layer=-2)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
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


class PeakMemory:
    """Peak memory of a block above what was in use when it started: the CUDA allocator's peak, or on CPU the
    resident set sampled every 2 ms (a lower bound of the true peak)."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        _release_free_memory()  # so that what the block allocates shows up as resident growth
        self.process, self.base, self.running = psutil.Process(), psutil.Process().memory_info().rss, True
        self.peak_rss = self.base

        def sample():
            while self.running:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = self.peak_rss - self.base


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc), so the resident set starts from what is really in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the CPU peak is then a lower bound
        pass


def kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def qwen_inputs(model, batch: int, text: int, device: str) -> dict:
    """One image of QWEN25_VL_7B["grid"] patches per prompt: flat patches, grid, placeholder ids, token types."""
    cfg, (h, w) = model.config, QWEN25_VL_7B["grid"]
    vc = cfg.vision_config
    n = h * w // vc.spatial_merge_size**2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (batch, text), generator=gen)
    image = torch.cat([torch.tensor([cfg.vision_start_token_id]), torch.full((n,), cfg.image_token_id),
                       torch.tensor([cfg.vision_end_token_id])]).expand(batch, -1)
    ids = torch.cat([ids[:, :5], image, ids[:, 5:]], dim=1)
    pixels = torch.randn(batch * h * w, 3 * vc.temporal_patch_size * vc.patch_size**2, generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "mm_token_type_ids": (ids == cfg.image_token_id).long().to(device),
            "pixel_values": pixels.to(device, model.dtype),
            "image_grid_thw": torch.tensor([[1, h, w]] * batch).to(device)}


def inputs_for(model, batch: int, text: int, device: str) -> dict:
    if model.config.model_type == "qwen2_5_vl":
        return qwen_inputs(model, batch, text, device)
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, min(1000, model.config.image_token_id), (batch, text), generator=gen)
    ids = torch.cat([ids[:, :5], torch.full((batch, n), model.config.image_token_id), ids[:, 5:]], dim=1)
    pixels = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, model.dtype)}


def plan_for(budget, n: int, layers: int, selector: str = "fastervlm") -> tuple[PruningPlan, PruningPlan]:
    """(the two-stage plan of n_eff = budget, its stage-1-alone part) at K = L / 2."""
    if budget == "all":
        return PruningPlan(), PruningPlan()
    n1, n2 = min(n, round(1.5 * budget)), max(1, round(0.5 * budget))
    stage1 = dict(stage1=selector, n1=n1)
    return PruningPlan(**stage1, stage2="fastv", n2=n2, layer=layers // 2), PruningPlan(**stage1)


def measure(model, plan: PruningPlan, inputs: dict, args, device: str, **kwargs) -> dict:
    pruned = PrunedVLM(model, plan)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def prefill():
        out = pruned(**inputs, use_cache=True, logits_to_keep=1, **kwargs)
        sync()
        return out

    with torch.no_grad():
        ms = timed(prefill, args.repeats) * 1e3
        with PeakMemory(device) as memory:
            out = prefill()
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        result = {"prefill_ms": ms, "peak_mb": memory.peak / 2**20, "kv_mb": kv_bytes(cache) / 2**20}
        if not kwargs:
            gen = dict(do_sample=False, pad_token_id=0)
            ttft = timed(lambda: (pruned.generate(**inputs, max_new_tokens=1, **gen), sync()), args.repeats)
            total = timed(lambda: (pruned.generate(**inputs, max_new_tokens=args.new_tokens,
                                                   min_new_tokens=args.new_tokens, **gen), sync()), args.repeats)
            batch = inputs["input_ids"].shape[0]
            # None when timing noise swamps the decode steps (a single repeat of a slow prefill)
            decode = batch * (args.new_tokens - 1) / (total - ttft) if total - ttft > 0.05 * ttft else None
            result.update(ttft_ms=ttft * 1e3, decode_tok_s=decode)
    return result


def scoring_ms(model, plan: PruningPlan, inputs: dict, device: str) -> float:
    """Milliseconds stage 2 takes inside one pruned prefill: the keys' RoPE, the query rows' q recompute, the
    scorer, the per-image top-k and the surviving rows (`PrunedVLM._stage2_rows`)."""
    spent = []
    original = PrunedVLM._stage2_rows

    def timed_rows(self, state):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        rows = original(self, state)
        if device == "cuda":
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - start)
        return rows

    PrunedVLM._stage2_rows = timed_rows
    try:
        with torch.no_grad():
            for _ in range(3):
                PrunedVLM(model, plan)(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        PrunedVLM._stage2_rows = original
    return statistics.median(spent[1:]) * 1e3


def run(args) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    model = build(args.geometry, args.text_layers, args.vision_layers, dtype).to(device)
    usual = build(args.geometry, args.text_layers, args.vision_layers, dtype, attn="eager").to(device) \
        if args.usual else None
    if usual is not None:
        usual.load_state_dict(model.state_dict())
    qwen = args.geometry == "qwen25vl-7b"
    if qwen:
        grid = QWEN25_VL_7B["grid"]
        n, layers = grid[0] * grid[1] // 4, model.config.text_config.num_hidden_layers
        full_layers = QWEN25_VL_7B["text"]["num_hidden_layers"]

        score = SELECTORS.build(args.stage1).needs_attention()  # the [CLS]-free score costs a full attention

        def flops_of(text, n1, n2, layer, batch, depth=None):
            return qwen25_vl_prefill_flops(model.config, grid, text, n1, n2, layer, batch=batch, layers=depth,
                                           score=score)
    else:
        g = Geometry.from_llava_config(model.config)
        full_layers = GEOMETRIES[args.geometry]["t"][1]
        n, layers = g.num_tokens, g.layers

        def flops_of(text, n1, n2, layer, batch, depth=None):
            return prefill_flops(g, text, n1, n2, layer, batch=batch, layers=depth)
    rows = []
    for batch in args.batches:
        inputs = inputs_for(model, batch, args.text_tokens, device)
        text = inputs["input_ids"].shape[1] - n  # Qwen: the vision start/end tokens count as text
        base = base_flops = full_base = None
        for budget in args.budgets:
            plan, stage1_only = plan_for(budget, n, layers, args.stage1)
            n1, n2 = plan.budgets(n) if not plan.is_noop else (None, None)
            row = {"batch": batch, "budget": budget, "n1": n1, "n2": n2, "layer": plan.layer,
                   "n_eff": n if plan.is_noop else effective_budget(n1, n2, layers // 2, layers)}
            row.update(measure(model, plan, inputs, args, device))
            flops = flops_of(text, n1, n2, layers // 2 if n2 else None, batch)
            full = flops_of(text, n1, n2, full_layers // 2 if n2 else None, batch, full_layers)
            if plan.is_noop:
                base, base_flops, full_base = row["prefill_ms"], flops["total"], full["total"]
            row.update(gflops=flops["total"] / 1e9, flops_parts={k: v / 1e9 for k, v in flops.items()},
                       speedup=base / row["prefill_ms"], ideal=base_flops / flops["total"],
                       full_depth_ideal=full_base / full["total"])
            row["of_ideal"] = row["speedup"] / row["ideal"]
            if usual is not None and not plan.is_noop:
                eager = measure(usual, plan, inputs, args, device, output_attentions=True)
                # the usual way pays for attention weights in every layer before K: eager kernels that write
                # (B, H, L, L) tensors instead of SDPA; ours pays for one recompute of Q rows against L keys
                eager1 = measure(usual, stage1_only, inputs, args, device, output_attentions=True)
                ours1 = measure(model, stage1_only, inputs, args, device, output_attentions=False)
                row.update(usual_prefill_ms=eager["prefill_ms"], usual_peak_mb=eager["peak_mb"],
                           scoring_ms=scoring_ms(model, plan, inputs, device),
                           usual_scoring_ms=max(eager1["prefill_ms"] - ours1["prefill_ms"], 0.0))
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


COLUMNS = ("batch", "n_eff", "n1/n2", "prefill ms", "TTFT ms", "decode tok/s", "peak MB", "KV MB", "GFLOPs",
           "speed-up", "ideal", "of ideal", "full-depth ideal", "usual prefill ms", "usual peak MB",
           "scoring ms (ours / usual)")


def format_row(r: dict) -> str:
    def f(key, fmt):
        return fmt.format(r[key]) if r.get(key) is not None else "-"

    cells = [str(r["batch"]), f"{r['n_eff']:.0f}", "-" if r["n1"] is None else f"{r['n1']}/{r['n2']}",
             f("prefill_ms", "{:.0f}"), f("ttft_ms", "{:.0f}"), f("decode_tok_s", "{:.1f}"), f("peak_mb", "{:.0f}"),
             f("kv_mb", "{:.1f}"), f("gflops", "{:.1f}"), f("speedup", "{:.2f}x"), f("ideal", "{:.2f}x"),
             f("of_ideal", "{:.0%}"), f("full_depth_ideal", "{:.2f}x"), f("usual_prefill_ms", "{:.0f}"),
             f("usual_peak_mb", "{:.0f}"),
             "-" if r.get("scoring_ms") is None else f"{r['scoring_ms']:.0f} / {r['usual_scoring_ms']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def write(rows: list[dict], args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header = (f"geometry={args.geometry} stage 1={args.stage1} text layers={args.text_layers or 'full'} vision layers="
              f"{args.vision_layers or 'full'} dtype={args.dtype} device={args.device} threads={torch.get_num_threads()}"
              f" text tokens={args.text_tokens}")
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + [format_row(r) for r in rows]
    (out / "efficiency.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (out / "efficiency.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the PNG is optional; the table and JSON are the record
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in args.batches:
        sel = [r for r in rows if r["batch"] == batch]
        ax.plot([r["n_eff"] for r in sel], [r["speedup"] for r in sel], "o-", label=f"achieved, batch {batch}")
        ax.plot([r["n_eff"] for r in sel], [r["ideal"] for r in sel], "k--", alpha=0.5,
                label="FLOPs-ideal" if batch == args.batches[0] else None)
    ax.set_xscale("log")
    ax.set_xlabel("n_eff (visual tokens per layer)")
    ax.set_ylabel("prefill speed-up")
    ax.set_title(header.split(" dtype")[0], fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "efficiency.png", dpi=120)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES) + ["qwen25vl-7b"], default="tiny")
    parser.add_argument("--text-layers", type=int)
    parser.add_argument("--vision-layers", type=int)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--budgets", type=lambda s: [x if x == "all" else int(x) for x in s.split(",")],
                        default=list(BUDGETS))
    parser.add_argument("--stage1", default="fastervlm",
                        help="stage-1 selector (a learned head costs like 'pool': it reads no attention)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-usual", dest="usual", action="store_false", help="skip the eager baseline")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.geometry == "tiny":
        args.budgets = [b if b == "all" else max(1, b // 16) for b in args.budgets]
    print(f"| {' | '.join(COLUMNS)} |\n|" + "---|" * len(COLUMNS))
    rows = run(args)
    write(rows, args, args.out)
    return rows


if __name__ == "__main__":
    main()
