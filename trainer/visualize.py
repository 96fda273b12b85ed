"""`python -m trainer visualize`: draw which visual tokens each pruning stage keeps on one prompt.

    python -m trainer visualize --pruner DIR --model MODEL --image a.jpg [--image b.jpg ...] \\
        --question "what is the color ?" --out kept.png [--device cpu] [--dtype bfloat16]
    python -m trainer visualize --plan plan.yaml --model MODEL --image a.jpg --question Q --out kept.png

Loads the VLM (`AutoModelForImageTextToText`) and its processor (`data.processors.load_processor`), renders the
question with the processor's chat template (the images first, then the question, as one user turn with the
generation prompt), runs the pruned model once (a forward pass, no generation) and writes a PNG: one row per
grid of tokens (an image; AnyRes: its base view and its unpadded tile grid), one column per stage (stage 1, and
stage 2 when the plan has one). What each pixel shows is described in `modules/overlay.py`; the PNG's
"learnprune" text chunk holds the layout (panels, grids, kept cells) as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from modules.overlay import check_views, grid_views, overlay_figure, save_png


def run_and_draw(pruned, inputs: dict, images: list, title: str = "", max_side: int = 448,
                 **forward_kwargs) -> tuple[np.ndarray, dict, Any]:
    """Run `pruned` (a `PrunedVLM`) once on `inputs` (one call's model inputs, with `image_sizes`: each image's
    original (height, width)) and draw the kept tokens of every stage over `images` (the call's original images,
    in batch order). Returns (figure RGB array, layout, model output)."""
    with torch.no_grad():
        out = pruned(**inputs, use_cache=False, **forward_kwargs)
    pruning = getattr(out, "pruning", None)
    views = grid_views(pruned.adapter, inputs, image_sizes=[(im.height, im.width) for im in images])
    if pruning is None:  # the empty plan: the plain model ran, every token stays
        kept = {"stage1": None}
    else:
        check_views(views, pruning.num_tokens)
        kept = dict(pruning.kept)
    pictures = {("image", i): image for i, image in enumerate(images)}
    array, layout = overlay_figure(pictures, views, kept, title=title, max_side=max_side)
    return array, layout, out


def prompt_inputs(processor, images: list[Image.Image], question: str) -> dict:
    """The processor's inputs for one user turn showing `images` then asking `question` (chat template, with the
    generation prompt), plus `image_sizes` (original (height, width)) when the processor does not return them."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    image_processor = getattr(processor, "image_processor", None)
    nested = "batch_num_images" in getattr(image_processor, "model_input_names", ())  # OneVision: per prompt
    inputs = processor(images=[images] if nested else images, text=[text], return_tensors="pt", padding=True)
    inputs = dict(inputs)
    if inputs.get("image_sizes") is None:
        inputs["image_sizes"] = torch.tensor([[im.height, im.width] for im in images], dtype=torch.long)
    return inputs


def to_device(inputs: dict, device: torch.device, dtype: torch.dtype | None) -> dict:
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value):
            value = value.to(device)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--pruner", help="a pruner directory (pruner_config.json + model.safetensors) or hub id: "
                                       "its head, the plan it was trained for, its LoRA adapters")
    what.add_argument("--plan", help="a PruningPlan file (.yaml, .yml or .json)")
    parser.add_argument("--model", required=True, help="the VLM: a local directory or hub id")
    parser.add_argument("--processor", help="the processor (default: --model)")
    parser.add_argument("--image", action="append", required=True, help="an image file; repeat for several")
    parser.add_argument("--question", required=True, help="the question asked about the image(s)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, help="load the model in this dtype (e.g. bfloat16)")
    parser.add_argument("--views", choices=("image", "view"), default=None,
                        help="AnyRes: override the plan's `views` (one budget per image, or per view)")
    parser.add_argument("--max-side", type=int, default=448, help="shrink pictures whose longer side exceeds this")
    return parser.parse_args(argv)


def visualize(argv: list[str]) -> Path:
    opts = parse_args(argv)
    from transformers import AutoModelForImageTextToText

    from data.processors import load_processor
    from modules.pruned_vlm import PrunedVLM, PruningPlan
    from modules.serve import load_pruned

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, opts.dtype) if opts.dtype else None
    images = []
    for path in opts.image:
        if not Path(path).is_file():
            raise ValueError(f"image {path!r} does not exist")
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    processor = load_processor(opts.processor or opts.model)
    model = AutoModelForImageTextToText.from_pretrained(opts.model, dtype=dtype).to(device).eval()
    if opts.pruner is not None:
        pruned = load_pruned(model, opts.pruner, processor=processor)
    else:
        pruned = PrunedVLM(model, PruningPlan.load(opts.plan), processor=processor)
    if opts.views is not None and opts.views != pruned.plan.views:
        pruned = PrunedVLM(model, dataclasses.replace(pruned.plan, views=opts.views), processor=processor)
    pruned.to(device).eval()
    inputs = to_device(prompt_inputs(processor, images, opts.question), device, dtype)
    plan = pruned.plan
    stages = [] if plan.selector is None else [f"stage 1: {getattr(plan.selector, 'name', '?')} n1={plan.n1}"]
    if plan.scorer is not None:
        stages.append(f"stage 2: {getattr(plan.scorer, 'name', '?')} n2={plan.n2} at layer {pruned.layer}")
    array, layout, out = run_and_draw(pruned, inputs, images, max_side=opts.max_side,
                                      title=f"Q: {opts.question} | " + ("; ".join(stages) or "no pruning"))
    tokenizer = getattr(processor, "tokenizer", processor)
    next_token = tokenizer.decode([int(out.logits[0, -1].argmax())])
    layout["next_token"] = next_token
    path = save_png(array, opts.out, layout)
    print(f"wrote {path} ({len(layout['grids'])} grid(s) x {len(layout['stages'])} stage(s); "
          f"next token {next_token!r})")
    return path
