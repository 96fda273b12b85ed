"""Stage-2 scoring as the sequence grows: our q/k recompute under SDPA vs the usual `output_attentions` way.

    python bench/stage2_memory.py --geometry llava15-7b --text-layers 2 --vision-layers 2    # CPU, minutes
    python bench/stage2_memory.py --geometry tiny                                            # seconds (tests)

One image (LLaVA-1.5-7B: 576 visual tokens) and a prompt of T text tokens after it, T in --text-tokens, so the
sequence is L = 576 + T. The plan is stage 2 alone (FastV at layer K = L_layers / 2 keeping --n2 tokens) scored
with every text token as a query (`query="text"`, the heaviest stage-2 read). Per L, batch 1:

- ours: prefill ms with SDPA, its peak memory above the model, and the stage-2 time inside it
  (`PrunedVLM._stage2_rows`: the keys' RoPE, the query rows' recompute, scorer, top-k, surviving rows);
- usual: the same plan with eager attention in the whole language model and `output_attentions=True`: prefill ms,
  peak memory, and what scoring costs that way (that prefill minus the SDPA prefill of the same plan);
- the bytes of one layer's (B, H, L, L) attention tensor in the model's dtype, for reference: what the usual way
  holds per layer, and what ours never builds.

Peak memory is measured as in bench/efficiency.py (CUDA allocator peak; CPU resident-set peak sampled every 2 ms).
Writes bench/out/stage2_memory.{md,json}. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from efficiency import GEOMETRIES, PeakMemory, build, inputs_for, scoring_ms, timed  # bench/ is on sys.path

from modules.pruned_vlm import PrunedVLM, PruningPlan

COLUMNS = ("L", "text tokens", "ours prefill ms", "ours peak MB", "ours scoring ms", "usual prefill ms",
           "usual peak MB", "usual scoring ms", "(L, L) per layer MB", "scoring speed-up")


def prefill(model, plan: PruningPlan, inputs: dict, repeats: int, device: str, **kwargs) -> tuple[float, float]:
    """(median prefill ms, peak MB above the model) of one pruned prefill."""
    pruned = PrunedVLM(model, plan)

    def once():
        out = pruned(**inputs, use_cache=True, logits_to_keep=1, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.no_grad():
        ms = timed(once, repeats) * 1e3
        with PeakMemory(device) as memory:
            out = once()
        del out
    return ms, memory.peak / 2**20


def run(args) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    model = build(args.geometry, args.text_layers, args.vision_layers, dtype).to(device)
    usual = build(args.geometry, args.text_layers, args.vision_layers, dtype, attn="eager").to(device)
    usual.load_state_dict(model.state_dict())
    layers = model.config.text_config.num_hidden_layers
    heads = model.config.text_config.num_attention_heads
    plan = PruningPlan(stage2={"name": "fastv", "query": "text"}, n2=args.n2, layer=max(1, layers // 2))
    rows = []
    for text in args.text_tokens:
        inputs = inputs_for(model, 1, text, device)
        length = inputs["input_ids"].shape[1]
        ours_ms, ours_mb = prefill(model, plan, inputs, args.repeats, device)
        usual_ms, usual_mb = prefill(usual, plan, inputs, args.repeats, device, output_attentions=True)
        ours_score = scoring_ms(model, plan, inputs, device)
        row = {"length": length, "text_tokens": text, "ours_prefill_ms": ours_ms, "ours_peak_mb": ours_mb,
               "ours_scoring_ms": ours_score, "usual_prefill_ms": usual_ms, "usual_peak_mb": usual_mb,
               # the usual way reads the weights eager attention returns: its scoring cost is what eager +
               # output_attentions adds over SDPA for the same plan (both runs pay for our recompute)
               "usual_scoring_ms": max(usual_ms - ours_ms, 0.0),
               "square_mb": heads * length * length * torch.finfo(dtype).bits / 8 / 2**20}
        row["scoring_speedup"] = row["usual_scoring_ms"] / max(ours_score, 1e-9)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    cells = [str(r["length"]), str(r["text_tokens"]), f"{r['ours_prefill_ms']:.0f}", f"{r['ours_peak_mb']:.0f}",
             f"{r['ours_scoring_ms']:.1f}", f"{r['usual_prefill_ms']:.0f}", f"{r['usual_peak_mb']:.0f}",
             f"{r['usual_scoring_ms']:.0f}", f"{r['square_mb']:.0f}", f"{r['scoring_speedup']:.1f}x"]
    return "| " + " | ".join(cells) + " |"


def write(rows: list[dict], args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"geometry={args.geometry} text layers={args.text_layers or 'full'} vision layers="
              f"{args.vision_layers or 'full'} dtype={args.dtype} device={args.device} threads={torch.get_num_threads()}"
              f" stage 2=fastv(query=text) n2={args.n2}")
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] + [format_row(r) for r in rows]
    (args.out / "stage2_memory.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "stage2_memory.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2) + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--text-layers", type=int)
    parser.add_argument("--vision-layers", type=int)
    parser.add_argument("--text-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[64, 512, 1024, 2048])
    parser.add_argument("--n2", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.geometry == "tiny":
        args.n2 = min(args.n2, 4)
    print(f"| {' | '.join(COLUMNS)} |\n|" + "---|" * len(COLUMNS))
    rows = run(args)
    write(rows, args)
    return rows


if __name__ == "__main__":
    main()
