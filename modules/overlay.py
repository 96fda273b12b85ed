"""Kept-token overlays: which visual tokens each pruning stage kept, drawn over the original pictures.

Pure functions (numpy / PIL, no matplotlib, no model calls). Two halves:

- **Geometry** (`grid_views`): every visual item of a call as one or more `GridView`s (modules/vlm/base.py): a
  (rows, cols) grid of tokens, where those tokens start among the item's N_i (`start`), and the pixel box of the
  ORIGINAL picture the grid covers (`box`, which may reach outside the picture: padding; or stay inside it: a
  centre crop). A token of a grid is then the box cut into rows x cols equal cells, i.e. the exact inverse of what
  the processor did. How a family's processor and model place the tokens is the adapter's business: `grid_views`
  checks the sizes and asks `VLMAdapter.item_geometry` (each adapter's docstring there says how it lays them out).
- **Drawing** (`render_grid`, `overlay_figure`): a canvas in the picture's own pixel coordinates (extended to the
  grid's box), where
    - pixels of KEPT cells inside the picture are the picture's pixels, unchanged;
    - pixels of DROPPED cells inside the picture are `dim(picture)` (x `DROPPED_BRIGHTNESS`);
    - padding (canvas pixels outside the picture that a cell covers) is striped: orange for kept cells, dark
      orange for dropped ones; a cell more than half padding (a token the adapter marks invalid) is also framed
      by those stripes;
    - picture pixels no token covers (cropped away by the processor) are grey and dark (`unseen`);
    - canvas pixels neither in the picture nor in a cell are `BACKGROUND`.
  `overlay_figure` lays out one panel per (grid, stage) with titles (PIL text) and returns the RGB array and a
  layout (where each panel sits, its grid, origin and kept cells), which `save_png` stores in the PNG's text
  chunk "learnprune" as JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from modules.vlm.base import GridView

DROPPED_BRIGHTNESS = 0.3
UNSEEN_BRIGHTNESS = 0.25
PAD_KEPT = (255, 170, 0)
PAD_DROPPED = (110, 70, 0)
PAD_STRIPE = (40, 40, 40)
BACKGROUND = (0, 0, 0)
FIGURE_BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
STRIPE_PERIOD = 6  # pixels: stripes alternate every half period along the anti-diagonal
PNG_KEY = "learnprune"


# ---- geometry -----------------------------------------------------------------------------------------------------


def _int_sizes(sizes) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in torch.as_tensor(sizes).view(-1, 2).tolist()]


def grid_views(adapter, inputs: dict, image_sizes=None, video_sizes=None, processor=None) -> list[GridView]:
    """The `GridView`s of every visual item of one call, in item order (`VLMAdapter.item_geometry`).

    adapter: the call's `VLMAdapter` (`PrunedVLM.adapter`: its `view_unit` / `video_unit` follow the plan).
    inputs: the processor's output for the call (pixel_values, image_grid_thw, image_sizes, ...).
    image_sizes: (n_images, 2) original (height, width) of every image, in batch order (default:
        `inputs["image_sizes"]`). video_sizes: (n_videos, 2) of every video's frames.
    processor: the processor that made `inputs`, for adapters built without one that need its fit.
    """
    if image_sizes is None and inputs.get("image_sizes") is not None:
        image_sizes = inputs["image_sizes"]
    has_images = inputs.get("pixel_values") is not None
    if has_images and image_sizes is None:
        raise ValueError("grid_views needs the original (height, width) of every image: pass image_sizes")
    images = _int_sizes(image_sizes) if has_images else []
    has_videos = inputs.get("pixel_values_videos") is not None
    if has_videos and video_sizes is None:
        raise ValueError("grid_views needs the frame (height, width) of every video: pass video_sizes")
    videos = _int_sizes(video_sizes) if has_videos else []
    return adapter.item_geometry(inputs, image_sizes=images, video_sizes=videos, processor=processor)


def check_views(views: list[GridView], num_tokens: list[int]) -> None:
    """Every item's grids fit in its N_i tokens (a geometry that disagrees with the model's count fails here)."""
    items = {v.item for v in views}
    if items != set(range(len(num_tokens))):
        raise ValueError(f"the overlay geometry has items {sorted(items)}, the call had {len(num_tokens)}")
    for i, n in enumerate(num_tokens):
        used = sum(v.size for v in views if v.item == i)
        end = max(v.start + v.size for v in views if v.item == i)
        if end > n or used < n - 1:  # at most one token ([CLS], kept by the "full" strategy) is not drawn
            raise ValueError(f"item {i}: the overlay's grids cover {used} of its {n} tokens")


def kept_per_item(kept) -> list[np.ndarray]:
    """`out.pruning.kept[stage]` ((n_items, n) tensor or list of 1-D tensors) as one index array per item."""
    if torch.is_tensor(kept):
        return [row.detach().cpu().numpy() for row in kept]
    return [torch.as_tensor(k).detach().cpu().numpy() for k in kept]


def local_kept(view: GridView, kept: np.ndarray | None) -> np.ndarray:
    """(rows * cols,) bool: which cells of `view` its item kept (all when `kept` is None: nothing pruned)."""
    mask = np.zeros(view.size, dtype=bool)
    if kept is None:
        mask[:] = True
        return mask
    local = np.asarray(kept, dtype=np.int64) - view.start
    mask[local[(local >= 0) & (local < view.size)]] = True
    return mask


# ---- drawing ------------------------------------------------------------------------------------------------------


def as_rgb(picture) -> np.ndarray:
    """(H, W, 3) uint8 of a PIL image or an array."""
    if isinstance(picture, Image.Image):
        return np.asarray(picture.convert("RGB"), dtype=np.uint8)
    array = np.asarray(picture)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return array[..., :3]


def dim(pixels: np.ndarray) -> np.ndarray:
    """What a dropped cell shows of the picture."""
    return (pixels.astype(np.float32) * DROPPED_BRIGHTNESS).astype(np.uint8)


def unseen(pixels: np.ndarray) -> np.ndarray:
    """What picture pixels no token covers (cropped away) show: grey, dark."""
    grey = pixels.astype(np.float32).mean(axis=-1, keepdims=True) * UNSEEN_BRIGHTNESS
    return np.repeat(grey, 3, axis=-1).astype(np.uint8)


@dataclass
class Rendered:
    """A drawn grid: `array` (Hc, Wc, 3) uint8; the picture's pixel (0, 0) sits at `origin` (row, col) of it; cell
    (r, c) spans rows row_edges[r]:row_edges[r + 1] and columns col_edges[c]:col_edges[c + 1]; `kept` and
    `padding`: (rows * cols,) bool per cell."""

    array: np.ndarray
    origin: tuple[int, int]
    row_edges: np.ndarray
    col_edges: np.ndarray
    kept: np.ndarray
    padding: np.ndarray


def _edges(lo: float, hi: float, count: int, offset: int, limit: int) -> np.ndarray:
    edges = np.floor(lo + np.arange(count + 1) * (hi - lo) / count + 0.5).astype(np.int64) + offset
    return np.clip(edges, 0, limit)


def render_grid(picture, view: GridView, kept: np.ndarray | None) -> Rendered:
    """Draw one grid over its picture; `kept`: indices into the item's N_i tokens (None: all kept). See the module
    doc for what each pixel shows."""
    pixels = as_rgb(picture)
    h, w = pixels.shape[:2]
    top, left, bottom, right = view.box
    oy, ox = -min(0, math.floor(top + 0.5)), -min(0, math.floor(left + 0.5))
    height = max(h, math.floor(bottom + 0.5)) + oy
    width = max(w, math.floor(right + 0.5)) + ox
    rows, cols = view.grid
    row_edges = _edges(top, bottom, rows, oy, height)
    col_edges = _edges(left, right, cols, ox, width)
    keep = local_kept(view, kept)
    padding = view.padding((h, w))

    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    in_picture = np.zeros((height, width), dtype=bool)
    in_picture[oy:oy + h, ox:ox + w] = True
    canvas[oy:oy + h, ox:ox + w] = unseen(pixels)
    yy, xx = np.mgrid[0:height, 0:width]
    stripe = ((yy + xx) % STRIPE_PERIOD) < STRIPE_PERIOD // 2
    dimmed = dim(pixels)
    for r in range(rows):
        for c in range(cols):
            y0, y1, x0, x1 = row_edges[r], row_edges[r + 1], col_edges[c], col_edges[c + 1]
            if y0 >= y1 or x0 >= x1:
                continue
            k = r * cols + c
            # the picture's part of the cell
            py0, py1 = max(y0, oy), min(y1, oy + h)
            px0, px1 = max(x0, ox), min(x1, ox + w)
            if py0 < py1 and px0 < px1:
                source = pixels if keep[k] else dimmed
                canvas[py0:py1, px0:px1] = source[py0 - oy:py1 - oy, px0 - ox:px1 - ox]
            # its padding part: stripes
            block = ~in_picture[y0:y1, x0:x1]
            if block.any():
                colour = np.where(stripe[y0:y1, x0:x1, None], PAD_KEPT if keep[k] else PAD_DROPPED, PAD_STRIPE)
                canvas[y0:y1, x0:x1][block] = colour[block].astype(np.uint8)
            if padding[k]:  # a padding token: framed by its stripes too
                colour = np.array(PAD_KEPT if keep[k] else PAD_DROPPED, dtype=np.uint8)
                canvas[y0, x0:x1] = canvas[y1 - 1, x0:x1] = colour
                canvas[y0:y1, x0] = canvas[y0:y1, x1 - 1] = colour
    return Rendered(canvas, (oy, ox), row_edges, col_edges, keep, padding)


# ---- figures -------------------------------------------------------------------------------------------------------


STAGE_TITLES = {"stage1": "stage 1", "stage2": "stage 2"}


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the bitmap font
        return ImageFont.load_default()


def overlay_figure(pictures: dict, views: list[GridView], kept: dict[str, Any], title: str = "",
                   max_side: int = 448, margin: int = 6) -> tuple[np.ndarray, dict]:
    """One panel per grid (rows) and stage (columns, `kept`'s order) as an RGB array, and its layout.

    pictures: {view.picture key: PIL image or array} (e.g. {("image", 0): image}).
    kept: {stage: `out.pruning.kept[stage]` or a list of per-item index arrays (None: every token kept)}.
    max_side: pictures with a longer side are shrunk to it first (the grid boxes with them).
    layout: {"title", "stages", "grids": [{label, item, start, grid, picture}], "panels": [{stage, grid (index into
        grids), x, y, width, height (where the drawn array sits in the figure), origin, row_edges, col_edges,
        kept (cell indices), padding (cell indices), scale}]}.
    """
    stages = list(kept)
    per_item = {s: (None if kept[s] is None else kept_per_item(kept[s])) for s in stages}
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = int(measure.textbbox((0, 0), "Ag", font=font)[3]) + 4
    cells = []  # (row, col, rendered, caption, scale)
    shrunk = {}
    for key, picture in pictures.items():
        pixels = as_rgb(picture)
        h, w = pixels.shape[:2]
        s = min(1.0, max_side / max(h, w))
        if s < 1.0:
            size = (max(1, round(w * s)), max(1, round(h * s)))
            pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS))
        shrunk[key] = (pixels, pixels.shape[0] / h, pixels.shape[1] / w)
    for r, view in enumerate(views):
        if view.picture not in shrunk:
            raise ValueError(f"no picture for {view.label} ({view.picture})")
        pixels, sy, sx = shrunk[view.picture]
        shown = view.scaled(sy, sx)
        for c, stage in enumerate(stages):
            items = per_item[stage]
            item_kept = None if items is None else items[view.item]
            rendered = render_grid(pixels, shown, item_kept)
            n_kept = int(rendered.kept.sum())
            caption = (f"{view.label} {view.grid[0]}x{view.grid[1]} | {STAGE_TITLES.get(stage, stage)}: "
                       f"{n_kept}/{view.size} kept")
            cells.append((r, c, rendered, caption, (sy, sx)))
    widths = [0] * len(stages)
    heights = [0] * len(views)
    for r, c, rendered, caption, _ in cells:
        widths[c] = max(widths[c], rendered.array.shape[1], int(measure.textlength(caption, font=font)))
        heights[r] = max(heights[r], rendered.array.shape[0] + line)
    header = line if title else 0
    title_width = int(measure.textlength(title, font=font)) if title else 0
    total_w = max(sum(widths) + margin * (len(stages) + 1), title_width + 2 * margin)
    total_h = header + sum(heights) + margin * (len(views) + 1)
    figure = Image.new("RGB", (total_w, total_h), FIGURE_BACKGROUND)
    draw = ImageDraw.Draw(figure)
    if title:
        draw.text((margin, 2), title, fill=TEXT, font=font)
    panels = []
    for r, c, rendered, caption, (sy, sx) in cells:
        x = margin + sum(widths[:c]) + margin * c
        y = header + margin + sum(heights[:r]) + margin * r
        draw.text((x, y), caption, fill=TEXT, font=font)
        figure.paste(Image.fromarray(rendered.array), (x, y + line))
        panels.append({"stage": stages[c], "grid": r, "x": x, "y": y + line, "width": rendered.array.shape[1],
                       "height": rendered.array.shape[0], "origin": list(rendered.origin),
                       "row_edges": rendered.row_edges.tolist(), "col_edges": rendered.col_edges.tolist(),
                       "kept": np.flatnonzero(rendered.kept).tolist(),
                       "padding": np.flatnonzero(rendered.padding).tolist(), "scale": [sy, sx]})
    layout = {"title": title, "stages": stages,
              "grids": [{**{k: v for k, v in asdict(view).items() if k != "box"}, "box": list(view.box)}
                        for view in views],
              "panels": panels}
    return np.asarray(figure), layout


def save_png(array: np.ndarray, path: str | Path, layout: dict | None = None) -> Path:
    """Write the figure; its layout goes into the PNG's "learnprune" text chunk (JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if layout is not None:
        info.add_text(PNG_KEY, json.dumps(layout))
    Image.fromarray(array).save(path, pnginfo=info)
    return path


def read_layout(path: str | Path) -> dict:
    """The layout `save_png` stored in a PNG."""
    with Image.open(path) as image:
        return json.loads(image.text[PNG_KEY])
