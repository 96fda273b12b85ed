"""A tiny synthetic workspace for smoke-scale training runs: a random tiny LLaVA saved with its processor, and
LLaVA-format JSON splits over small images of coloured shapes.

    python -m data.tiny outputs/tiny     # then: python -m trainer fit --config configs/tiny.yaml

The model is random: this exercises the real loading, data and training paths, it does not learn anything
meaningful. ToyWorld (data/toyworld.py) is the world in which pruning quality is measurable.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from modules.vlm.tiny import tiny_llava, tiny_llava_processor, tiny_tokenizer

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("circle", "square", "triangle")


def _draw(color: str, shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    w, h = size
    r = min(w, h) // 3
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def write_tiny_workspace(root: str | Path, n_train: int = 48, n_eval: int = 12, seed: int = 0) -> Path:
    """Write `model/` (tiny LLaVA + processor), `images/` and `train.json`, `val.json`, `test.json` under root."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    tiny_llava(tokenizer, seed=seed).save_pretrained(root / "model")
    tiny_llava_processor(tokenizer).save_pretrained(root / "model")
    rng = random.Random(seed)
    for split, count in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        records = []
        for i in range(count):
            color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
            size = (rng.randint(24, 64), rng.randint(24, 64))
            name = f"{split}_{i:04d}.png"
            _draw(color, shape, size, rng).save(root / "images" / name)
            question, answer = (("what is the color ?", color) if i % 2 == 0 else ("what is the shape ?", shape))
            records.append({"id": f"{split}-{i}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
        (root / f"{split}.json").write_text(json.dumps(records, indent=1))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="outputs/tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {write_tiny_workspace(args.root, seed=args.seed)}")


if __name__ == "__main__":
    main()
