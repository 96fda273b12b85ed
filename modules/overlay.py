"""Kept-token overlays: which visual tokens each pruning stage kept, drawn over the original pictures.

Pure functions (numpy / PIL, no matplotlib, no model calls). Two halves:

- **Geometry** (`grid_views`): every visual item of a call as one or more `GridView`s: a (rows, cols) grid of
  tokens, where those tokens start among the item's N_i (`start`), and the pixel box of the ORIGINAL picture the
  grid covers (`box`, which may reach outside the picture: padding; or stay inside it: a centre crop). A token of
  a grid is then the box cut into rows x cols equal cells, i.e. the exact inverse of what the processor did:
    - LLaVA-1.5: the processor's fit (`ImageFit`: pad to square / resize / centre crop), read by the adapter, gives
      the frame the (g x g) patch grid tiles; the frame mapped back onto the picture is the box.
    - Qwen2-VL / 2.5-VL / 3-VL: `smart_resize` resizes the whole picture (no pad, no crop) to (h, w) patches; the
      (h / merge) x (w / merge) merged tokens (`image_grid_thw`) tile it, so the box is the whole picture. Video:
      one grid per temporal patch (shown on its first frame), over the whole frame.
    - LLaVA-NeXT / OneVision (AnyRes): the base view is the whole picture squashed (box = the picture); the tiles
      are the picture resized into the best pinpoint canvas keeping its aspect ratio and centred, cut into tiles;
      the model unpads the tiles' token grid (HF's own `unpad_image`, run here on a grid of coordinates) and
      OneVision may shrink it bilinearly (anyres_max): the final grid's shape is read from the model's own packing
      (the adapter's content mask), its box is the unpadded canvas region mapped back onto the picture. A lone
      OneVision view of a multi-image prompt is the picture padded to a centred square.
  TEMPORARY (asked for in the report): the adapters expose this only through private methods (`_views`,
  `_content`, `_segments`, `image_fit`); the AnyRes tile box is recomputed here from the same processor functions
  the adapter calls (`select_best_resolution`, `get_patch_output_size`). A public `VLMAdapter.item_geometry(...)`
  returning these `GridView`s should replace `grid_views`' family branches.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from modules.vlm.base import box_valid_mask

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


@dataclass(frozen=True)
class GridView:
    """One grid of a visual item's tokens over one picture.

    item:    the visual item (index into `out.pruning.kept[stage]`, `EncodedImages` order).
    start:   index of the grid's first token among the item's N_i tokens (its tokens are start .. start+rows*cols-1,
             row-major).
    grid:    (rows, cols).
    box:     (top, left, bottom, right) in the picture's pixels that the grid covers; cells are equal parts of it.
    picture: ("image", i) for the i-th image of the call, ("video", v, f) for frame f of the v-th video.
    label:   a short name ("image 0", "image 0 tiles", "video 0 frame 4", ...).
    """

    item: int
    start: int
    grid: tuple[int, int]
    box: tuple[float, float, float, float]
    picture: tuple
    label: str

    @property
    def size(self) -> int:
        return self.grid[0] * self.grid[1]

    def scaled(self, sy: float, sx: float) -> GridView:
        """The same grid over the picture resized by (sy, sx)."""
        t, left, b, r = self.box
        return replace(self, box=(t * sy, left * sx, b * sy, r * sx))

    def padding(self, picture_size: tuple[int, int]) -> np.ndarray:
        """(rows * cols,) bool: cells more than half outside a picture of (height, width) -- the padding tokens
        (the same rule as the adapters' `valid` mask, `box_valid_mask`)."""
        top, left, bottom, right = self.box
        h, w = picture_size
        inside = (-top, -left, h - top, w - left)  # the picture in the box's own coordinates
        valid = box_valid_mask(inside, self.grid, (bottom - top, right - left))
        return ~valid.numpy()


def _int_sizes(sizes) -> list[tuple[int, int]]:
    return [(int(h), int(w)) for h, w in torch.as_tensor(sizes).view(-1, 2).tolist()]


def grid_views(adapter, inputs: dict, image_sizes=None, video_sizes=None, processor=None) -> list[GridView]:
    """The `GridView`s of every visual item of one call, in item order.

    adapter: the call's `VLMAdapter` (`PrunedVLM.adapter`: its `view_unit` / `video_unit` follow the plan).
    inputs: the processor's output for the call (pixel_values, image_grid_thw, image_sizes, ...).
    image_sizes: (n_images, 2) original (height, width) of every image, in batch order (default:
        `inputs["image_sizes"]`). video_sizes: (n_videos, 2) of every video's frames.
    processor: the processor that made `inputs`, when the adapter was built without one (LLaVA-1.5 needs its fit).
    """
    from modules.vlm.llava import LlavaAdapter
    from modules.vlm.llava_next import AnyResAdapter
    from modules.vlm.qwen import QwenVLAdapter

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
    if isinstance(adapter, LlavaAdapter):
        return _llava_views(adapter, images, processor)
    if isinstance(adapter, QwenVLAdapter):
        return _qwen_views(adapter, inputs, images, videos)
    if isinstance(adapter, AnyResAdapter):
        return _anyres_views(adapter, inputs, images, videos)
    raise ValueError(f"no overlay geometry for adapter {type(adapter).__name__}")


def _llava_views(adapter, images: list[tuple[int, int]], processor) -> list[GridView]:
    from modules.vlm.llava import ImageFit

    fit = adapter.image_fit
    if fit is None:
        if processor is None:
            raise ValueError("the LLaVA overlay needs the processor that made pixel_values (its resize, crop or "
                             "pad decides which part of the picture each token shows): pass processor=")
        fit = ImageFit.from_processor(processor)
    g = adapter.patch_grid
    start = 1 - adapter._drop_cls  # the "full" strategy keeps [CLS] as token 0: no place in the picture
    views = []
    for i, (h, w) in enumerate(images):
        (t, left, b, r), (fh, fw) = fit.content_box(h, w)
        sy, sx = h / (b - t), w / (r - left)  # frame pixels -> picture pixels
        box = (-t * sy, -left * sx, (fh - t) * sy, (fw - left) * sx)
        views.append(GridView(item=i, start=start, grid=(g, g), box=box, picture=("image", i), label=f"image {i}"))
    return views


def _qwen_views(adapter, inputs: dict, images, videos) -> list[GridView]:
    merge = adapter.merge
    views, item = [], 0
    grids = inputs.get("image_grid_thw")
    grids = torch.as_tensor(grids).view(-1, 3).tolist() if grids is not None else []
    if len(grids) != len(images):
        raise ValueError(f"image_grid_thw has {len(grids)} images, image_sizes {len(images)}")
    for i, ((_, h, w), (ph, pw)) in enumerate(zip(grids, images, strict=True)):
        views.append(GridView(item=item, start=0, grid=(h // merge, w // merge), box=(0.0, 0.0, ph, pw),
                              picture=("image", i), label=f"image {i}"))
        item += 1
    grids = inputs.get("video_grid_thw")
    step = getattr(adapter.config.vision_config, "temporal_patch_size", 2)
    for v, (t, h, w) in enumerate(torch.as_tensor(grids).view(-1, 3).tolist() if grids is not None else []):
        rows, cols = h // merge, w // merge
        fh, fw = videos[v]
        for f in range(t):
            per_frame = adapter.video_unit == "frame"
            views.append(GridView(item=item + (f if per_frame else 0), start=0 if per_frame else f * rows * cols,
                                  grid=(rows, cols), box=(0.0, 0.0, fh, fw), picture=("video", v, f * step),
                                  label=f"video {v} frames {f * step}-{f * step + step - 1}"))
        item += t if adapter.video_unit == "frame" else 1
    return views


def _anyres_tile_box(adapter, h: int, w: int) -> tuple[float, float, float, float]:
    """The picture box the unpadded tile grid of an (h, w) image covers (before any anyres_max shrink, which
    resamples the same region): the processor's canvas (best pinpoint, aspect-preserving resize, centred),
    the model's own `unpad_image` run on a grid of token coordinates, mapped back to picture pixels."""
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension

    canvas_h, canvas_w = select_best_resolution((h, w), adapter.config.image_grid_pinpoints)
    probe = np.broadcast_to(np.zeros(1, dtype=np.uint8), (1, h, w))
    new_h, new_w = get_patch_output_size(probe, (canvas_h, canvas_w), input_data_format=ChannelDimension.FIRST)
    top, left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2
    rows, cols = canvas_h // adapter.tile * adapter.side, canvas_w // adapter.tile * adapter.side
    coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")).float()
    kept = adapter._module.unpad_image(coords, [h, w])
    r0, c0 = int(kept[0, 0, 0]), int(kept[1, 0, 0])
    r1, c1 = int(kept[0, -1, 0]) + 1, int(kept[1, 0, -1]) + 1
    patch = adapter.tile / adapter.side  # canvas pixels per token
    sy, sx = h / new_h, w / new_w
    return ((r0 * patch - top) * sy, (c0 * patch - left) * sx, (r1 * patch - top) * sy, (c1 * patch - left) * sx)


def _anyres_views(adapter, inputs: dict, images, videos) -> list[GridView]:
    views, item = [], 0
    side = adapter.side
    if images:
        sizes = torch.as_tensor(inputs["image_sizes"]).view(-1, 2)
        counts = adapter._views(inputs)
        contents = adapter._content(counts, sizes)
        for i, ((h, w), v, content) in enumerate(zip(images, counts, contents, strict=True)):
            base = (0.0, 0.0, float(h), float(w))  # the base view squashes the whole picture
            if v == 1:
                if adapter.family == "llava_onevision":  # a lone view of a multi-image prompt: centred square
                    s = max(h, w)
                    t, left = (s - h) // 2, (s - w) // 2
                    base = (-t, -left, s - t, s - left)
                views.append(GridView(item, 0, (side, side), base, ("image", i), f"image {i}"))
                item += 1
                continue
            tiles = content[side * side:]
            rows = int((~tiles).sum())  # one newline per row of the (unpadded, possibly shrunk) tile grid
            cols = int(tiles.sum()) // rows
            tile_box = _anyres_tile_box(adapter, h, w)
            apart = adapter.view_unit == "view"
            views.append(GridView(item, 0, (side, side), base, ("image", i), f"image {i} base"))
            views.append(GridView(item + apart, 0 if apart else side * side, (rows, cols), tile_box, ("image", i),
                                  f"image {i} tiles"))
            item += 1 + apart
    for b, first, content in adapter._video_items(inputs):
        per = math.ceil(side / 2)
        frames = int(content.sum()) // (per * per)
        fh, fw = videos[b]
        for f in range(frames):
            views.append(GridView(item, f * per * per, (per, per), (0.0, 0.0, fh, fw), ("video", b, first + f),
                                  f"video {b} frame {first + f}"))
        item += 1
    return views


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
