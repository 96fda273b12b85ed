"""Kept-token overlays (modules/overlay.py), `python -m trainer visualize` and the `KeptTokenOverlays` callback.

- geometry: each overlay cell covers what the processor put in its token (a picture painted one colour per cell
  goes through the real processor; every non-padding token's pixels have its cell's colour), for LLaVA-1.5 pad
  to square and centre crop, Qwen2.5-VL smart resize, LLaVA-NeXT base view + unpadded tiles, OneVision's lone
  pad-to-square view; the cells the overlay marks as padding are exactly the adapter's invalid tokens.
- drawing: kept cells show the picture unchanged, dropped cells `dim(picture)`, and the set of bright cells is
  exactly `out.pruning.kept` (read back from the PNG the command wrote, against an independent pruned run).
- callback: a one-epoch tiny fit logs one image per sample to TensorBoard, equal to a redraw with the trained
  head; with a CSV logger it warns once and logs nothing.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from data.tiny import (
    tiny_llava,
    tiny_llava_next,
    tiny_llava_next_processor,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
    tiny_llava_onevision_tokenizer,
    tiny_llava_processor,
    tiny_qwen,
    tiny_qwen_processor,
    tiny_qwen_tokenizer,
    tiny_tokenizer,
    write_tiny_workspace,
)
from modules.head import PrunerHead
from modules.overlay import GridView, check_views, dim, grid_views, read_layout, render_grid
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.vlm import get_adapter

QUESTION = "what is the color ?"


# ---- helpers ---------------------------------------------------------------------------------------------------


def palette(n: int, seed: int = 0) -> np.ndarray:
    """n distinct colours, at least 50 apart on some channel."""
    levels = np.array([20, 70, 120, 170, 220])
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    if n > len(grid):
        raise ValueError(n)
    return grid[np.random.default_rng(seed).permutation(len(grid))[:n]].astype(np.uint8)


def cell_rects(box, grid, height, width):
    """Independent of modules/overlay: cell (r, c) of a box as picture pixel ranges (clipped to the picture)."""
    top, left, bottom, right = box
    rows, cols = grid
    ys = [math.floor(top + r * (bottom - top) / rows + 0.5) for r in range(rows + 1)]
    xs = [math.floor(left + c * (right - left) / cols + 0.5) for c in range(cols + 1)]
    return {(r, c): (max(ys[r], 0), min(ys[r + 1], height), max(xs[c], 0), min(xs[c + 1], width))
            for r in range(rows) for c in range(cols)}


def painted(view: GridView, height: int, width: int, colours: np.ndarray) -> Image.Image:
    """A picture whose pixels under cell k of `view` are colours[k] (grey where no cell reaches)."""
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    for (r, c), (y0, y1, x0, x1) in cell_rects(view.box, view.grid, height, width).items():
        pixels[y0:y1, x0:x1] = colours[r * view.grid[1] + c]
    return Image.fromarray(pixels)


def unnormalize(values: torch.Tensor, image_processor) -> np.ndarray:
    """(..., 3) normalised channel values -> 0..255."""
    mean = np.array(image_processor.image_mean)
    std = np.array(image_processor.image_std)
    return (values.numpy() * std + mean) * 255


def assert_cells_show(measured: dict, view: GridView, colours: np.ndarray, size: tuple[int, int]) -> None:
    """Every cell k lying (almost) wholly in the picture shows colours[k] in its token (the nearest colour of the
    palette, within a few levels); cells partly over padding blend with it at their centre and are not read."""
    top, left, bottom, right = view.box
    rows, cols = view.grid
    ch, cw = (bottom - top) / rows, (right - left) / cols
    checked = 0
    for k, colour in measured.items():
        r, c = divmod(k, cols)
        y0, x0 = top + r * ch, left + c * cw
        inside = (max(0.0, min(y0 + ch, size[0]) - max(y0, 0.0)) * max(0.0, min(x0 + cw, size[1]) - max(x0, 0.0)))
        if inside < 0.9 * ch * cw:
            continue
        distance = np.abs(colours.astype(float) - colour).max(axis=1)
        assert distance.argmin() == k and distance[k] < 8, (view.label, k, colour, colours[k], distance[k])
        checked += 1
    assert checked >= view.size // 2


def frame_patch_colour(frame: torch.Tensor, r: int, c: int, patch: int, image_processor) -> np.ndarray:
    """Mean colour of the central half (4x4 of 8x8) of patch (r, c) of a (3, H, W) normalised frame."""
    lo, hi = patch // 4, patch - patch // 4
    block = frame[:, r * patch + lo:r * patch + hi, c * patch + lo:c * patch + hi]
    return unnormalize(block.mean(dim=(1, 2)), image_processor)


# ---- geometry: the cells are what the processor put in each token -----------------------------------------------


@pytest.mark.parametrize("pad", [True, False], ids=["pad_to_square", "centre_crop"])
@pytest.mark.parametrize("size", [(72, 120), (120, 60)])
def test_llava_cells_follow_the_processor(pad, size):
    tokenizer = tiny_tokenizer()
    processor = tiny_llava_processor(tokenizer, pad_to_square=pad)
    adapter = get_adapter(tiny_llava(tokenizer), processor)
    h, w = size
    [view] = grid_views(adapter, {"pixel_values": torch.zeros(1)}, image_sizes=[(h, w)])
    side = max(h, w)
    if pad:  # hand-computed: the picture centred in a side x side square, which the 4x4 grid tiles
        assert view.box == pytest.approx((-((side - h) // 2), -((side - w) // 2), side - (side - h) // 2,
                                          side - (side - w) // 2))
    else:  # shortest edge -> 32 (the long one -> int(32 * long / short)), then a centred 32 x 32 crop
        short, long = min(h, w), max(h, w)
        spans = (short, 32 * long / int(32 * long / short))
        spans = spans if h <= w else spans[::-1]
        assert (view.box[2] - view.box[0], view.box[3] - view.box[1]) == pytest.approx(spans)
        assert view.box[0] + view.box[2] == pytest.approx(h, abs=3) and view.box[1] + view.box[3] == pytest.approx(w, abs=3)
    colours = palette(view.size)
    image = painted(view, h, w, colours)
    frame = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
    measured = {r * 4 + c: frame_patch_colour(frame, r, c, 8, processor.image_processor)
                for r in range(4) for c in range(4)}
    assert_cells_show(measured, view, colours, (h, w))
    # the overlay's padding cells are the adapter's invalid tokens
    tokens = adapter.encode(frame[None], torch.tensor([[h, w]]))
    valid = torch.ones(16, dtype=torch.bool) if tokens.valid is None else tokens.valid[0]
    assert np.array_equal(view.padding((h, w)), ~valid.numpy())
    assert view.padding((h, w)).any() == (pad and h != w)


def test_qwen_cells_follow_smart_resize():
    tokenizer = tiny_qwen_tokenizer(family="qwen2_5_vl")
    processor = tiny_qwen_processor("qwen2_5_vl", tokenizer)
    adapter = get_adapter(tiny_qwen("qwen2_5_vl", tokenizer), processor)
    h, w = 80, 150  # smart_resize: 84 x 140 pixels = 6 x 10 patches = 3 x 5 merged tokens
    image = Image.new("RGB", (w, h))
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    [view] = grid_views(adapter, dict(inputs), image_sizes=[(h, w)])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 10]]
    assert view.grid == (3, 5) and view.box == (0.0, 0.0, h, w)
    colours = palette(view.size)
    inputs = processor.image_processor(images=[painted(view, h, w, colours)], return_tensors="pt")
    patches = inputs["pixel_values"].view(-1, 4, 3, 2, 14, 14)  # merged tokens (raster), 2x2 patches, C, T, p, p
    corners = torch.stack([patches[:, 0, :, 0, 13, 13], patches[:, 1, :, 0, 13, 0], patches[:, 2, :, 0, 0, 13],
                           patches[:, 3, :, 0, 0, 0]], dim=1).mean(dim=1)  # the 2x2 pixels at each token's centre
    measured = {k: unnormalize(corners[k], processor.image_processor) for k in range(view.size)}
    assert_cells_show(measured, view, colours, (h, w))
    assert not view.padding((h, w)).any()


def test_qwen_video_grids_per_temporal_patch():
    """A clip of t temporal patches: t grids over the whole frame, one item (clip) or t items (frame)."""
    tokenizer = tiny_qwen_tokenizer(family="qwen2_5_vl")
    adapter = get_adapter(tiny_qwen("qwen2_5_vl", tokenizer))
    inputs = {"pixel_values_videos": torch.zeros(1), "video_grid_thw": torch.tensor([[3, 4, 6]])}
    clip = grid_views(adapter, inputs, video_sizes=[(50, 70)])
    assert [(v.item, v.start, v.grid, v.picture) for v in clip] == [
        (0, 0, (2, 3), ("video", 0, 0)), (0, 6, (2, 3), ("video", 0, 2)), (0, 12, (2, 3), ("video", 0, 4))]
    check_views(clip, [18])
    adapter.video_unit = "frame"
    frames = grid_views(adapter, inputs, video_sizes=[(50, 70)])
    assert [(v.item, v.start) for v in frames] == [(0, 0), (1, 0), (2, 0)]
    with pytest.raises(ValueError, match="cover"):
        check_views(clip, [20])


def anyres_tile_colours(pixels: torch.Tensor, view: GridView, model, image_processor, size) -> dict:
    """The colour of every token of the unpadded tile grid of a LLaVA-NeXT image, read from its tile views: token
    (r, c) is canvas token (r + pr, c + pc), pr / pc the rows / columns the model's unpadding removed on each side."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    side = 4
    tiles_h, tiles_w = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, 32)
    rows, cols = view.grid
    pr, pc = (tiles_h * side - rows) // 2, (tiles_w * side - cols) // 2
    out = {}
    for r in range(rows):
        for c in range(cols):
            gr, gc = r + pr, c + pc
            tile = pixels[1 + (gr // side) * tiles_w + gc // side]
            out[r * cols + c] = frame_patch_colour(tile, gr % side, gc % side, 8, image_processor)
    return out


@pytest.mark.parametrize("size", [(60, 100), (100, 44), (70, 70)])
def test_llava_next_base_and_tile_cells_follow_the_processor(size):
    tokenizer = tiny_tokenizer()
    processor = tiny_llava_next_processor(tokenizer)
    model = tiny_llava_next(tokenizer)
    h, w = size
    inputs = dict(processor.image_processor(images=[Image.new("RGB", (w, h))], return_tensors="pt"))
    for views_unit, items in (("image", [0, 0]), ("view", [0, 1])):
        pruned = PrunedVLM(model, PruningPlan(views=views_unit), processor=processor)
        views = grid_views(pruned.adapter, inputs)
        assert [v.item for v in views] == items and [v.label for v in views] == ["image 0 base", "image 0 tiles"]
    base, tiles = views
    assert base.box == (0.0, 0.0, h, w) and base.grid == (4, 4)
    n_tiles = pruned.adapter._content(pruned.adapter._views(inputs), inputs["image_sizes"])[0]
    assert tiles.size == int(n_tiles.sum()) - 16  # the model's own count of unpadded tile tokens
    for view in views:
        colours = palette(view.size)
        pixels = processor.image_processor(images=[painted(view, h, w, colours)], return_tensors="pt")
        pixels = pixels["pixel_values"][0]
        if view is base:
            measured = {r * 4 + c: frame_patch_colour(pixels[0], r, c, 8, processor.image_processor)
                        for r in range(4) for c in range(4)}
        else:
            measured = anyres_tile_colours(pixels, view, model, processor.image_processor, (h, w))
        assert_cells_show(measured, view, colours, (h, w))


def test_onevision_lone_view_is_padded_to_square():
    """Each image of a multi-image OneVision prompt is one pad-to-square view; its padding cells are the
    adapter's invalid tokens, its other cells show what the processor put there."""
    tokenizer = tiny_llava_onevision_tokenizer()
    processor = tiny_llava_onevision_processor(tokenizer)
    pruned = PrunedVLM(tiny_llava_onevision(tokenizer), PruningPlan(), processor=processor)
    sizes = [(48, 96), (90, 50)]
    blank = [Image.new("RGB", (w, h)) for h, w in sizes]
    inputs = dict(processor.image_processor(images=[blank], return_tensors="pt"))
    views = grid_views(pruned.adapter, inputs)
    assert len(views) == 2 and all(v.grid == (4, 4) for v in views)
    painted_images = [painted(v, h, w, palette(16, seed=i)) for i, (v, (h, w)) in enumerate(zip(views, sizes))]
    inputs = dict(processor.image_processor(images=[painted_images], return_tensors="pt"))
    encoded = pruned.adapter.encode_images(inputs).items()
    for i, (view, (h, w)) in enumerate(zip(views, sizes)):
        assert view.padding((h, w)).any()
        assert np.array_equal(view.padding((h, w)), ~encoded[i].valid[0].numpy())
        frame = inputs["pixel_values"][i, 0]
        measured = {r * 4 + c: frame_patch_colour(frame, r, c, 8, processor.image_processor)
                    for r in range(4) for c in range(4)}
        assert_cells_show(measured, view, palette(16, seed=i), (h, w))


# ---- drawing ---------------------------------------------------------------------------------------------------


def random_picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 256, size=(h, w, 3), dtype=np.uint8)


def bright_and_dim(panel: np.ndarray, picture: np.ndarray, origin, rects: dict, cols: int,
                   skip: set | None = None) -> tuple[set, set]:
    """Cells whose picture part in `panel` equals the picture (bright) / dim(picture) (dimmed)."""
    oy, ox = origin
    bright, dimmed = set(), set()
    for (r, c), (y0, y1, x0, x1) in rects.items():
        k = r * cols + c
        if y0 >= y1 or x0 >= x1 or (skip and k in skip):
            continue
        shown = panel[y0 + oy:y1 + oy, x0 + ox:x1 + ox]
        if np.array_equal(shown, picture[y0:y1, x0:x1]):
            bright.add(k)
        elif np.array_equal(shown, dim(picture[y0:y1, x0:x1])):
            dimmed.add(k)
    return bright, dimmed


def test_render_grid_kept_bright_dropped_dim_padding_striped():
    picture = random_picture(20, 40)
    view = GridView(item=0, start=1, grid=(4, 4), box=(-10.0, 0.0, 30.0, 40.0), picture=("image", 0), label="x")
    kept = np.array([1 + 5, 1 + 6, 1 + 0, 1 + 15, 0, 99])  # item indices; 0 ([CLS]) and 99 are not grid cells
    rendered = render_grid(picture, view, kept)
    assert rendered.array.shape == (40, 40, 3) and rendered.origin == (10, 0)
    padding = view.padding((20, 40))
    assert np.flatnonzero(padding).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    rects = cell_rects(view.box, view.grid, 20, 40)
    bright, dimmed = bright_and_dim(rendered.array, picture, rendered.origin, rects, 4, skip=set(np.flatnonzero(padding)))
    assert bright == {5, 6} and dimmed == {4, 7, 8, 9, 10, 11}
    # padding: striped orange where kept (cell 0), dark orange where dropped (cell 1), never the picture
    assert (rendered.array[0:10, 0:10] == (255, 170, 0)).all(-1).any()
    assert not (rendered.array[0:10, 10:20] == (255, 170, 0)).all(-1).any()
    assert (rendered.array[0:10, 10:20] == (110, 70, 0)).all(-1).any()
    # nothing pruned: every cell bright
    rendered = render_grid(picture, view, None)
    bright, _ = bright_and_dim(rendered.array, picture, rendered.origin, rects, 4, skip=set(np.flatnonzero(padding)))
    assert bright == {4, 5, 6, 7, 8, 9, 10, 11}


def test_render_grid_centre_crop_leaves_unseen_margins():
    picture = random_picture(30, 60)
    view = GridView(0, 0, (2, 2), (0.0, 15.0, 30.0, 45.0), ("image", 0), "x")
    rendered = render_grid(picture, view, np.array([0, 3]))
    assert rendered.array.shape == (30, 60, 3)
    rects = cell_rects(view.box, view.grid, 30, 60)
    assert bright_and_dim(rendered.array, picture, (0, 0), rects, 2) == ({0, 3}, {1, 2})
    margin = rendered.array[:, :15]
    assert (margin[..., 0] == margin[..., 1]).all() and not np.array_equal(margin, picture[:, :15])


# ---- python -m trainer visualize -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize")
    return {family: write_tiny_workspace(root / family, n_train=8, n_eval=4, family=family)
            for family in ("llava", "qwen2_5_vl", "llava_next")}


def save_pictures(tmp_path, sizes) -> list:
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = tmp_path / f"picture{i}.png"
        Image.fromarray(random_picture(h, w, seed=i)).save(path)
        paths.append(path)
    return paths


def expected_run(model_dir, pruned_from, images, processor_loader):
    """The kept tokens of an independent pruned run on the same prompt (chat template built here)."""
    from transformers import AutoModelForImageTextToText

    processor = processor_loader(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    pruned = pruned_from(model, processor)
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = dict(processor(images=images, text=[text], return_tensors="pt"))
    inputs.setdefault("image_sizes", torch.tensor([[im.height, im.width] for im in images]))
    with torch.no_grad():
        out = pruned(**inputs)
    return out.pruning, inputs


def check_png(path, images, expected, stages, boxes=None):
    """The PNG's panels: one per (grid, stage); in each, the bright cells are exactly the stage's kept tokens of
    that grid and every other non-padding cell is dimmed. `boxes`: independently known grid boxes, per grid."""
    layout = read_layout(path)
    figure = np.asarray(Image.open(path).convert("RGB"))
    assert layout["stages"] == stages
    assert len(layout["panels"]) == len(layout["grids"]) * len(stages)
    for panel in layout["panels"]:
        grid = layout["grids"][panel["grid"]]
        rows, cols = grid["grid"]
        picture = np.asarray(images[grid["picture"][1]])
        h, w = picture.shape[:2]
        box = boxes[panel["grid"]] if boxes is not None else grid["box"]
        assert grid["box"] == pytest.approx(list(box))
        array = figure[panel["y"]:panel["y"] + panel["height"], panel["x"]:panel["x"] + panel["width"]]
        view = GridView(grid["item"], grid["start"], (rows, cols), tuple(box), tuple(grid["picture"]), "")
        padding = set(np.flatnonzero(view.padding((h, w))).tolist())
        bright, dimmed = bright_and_dim(array, picture, panel["origin"], cell_rects(box, (rows, cols), h, w), cols,
                                        skip=padding)
        kept = expected[panel["stage"]][grid["item"]] - grid["start"]
        kept = {int(k) for k in kept if 0 <= k < rows * cols}
        assert bright == kept - padding, (panel["stage"], grid["label"])
        assert bright | dimmed == set(range(rows * cols)) - padding
        assert sorted(kept) == panel["kept"]
    return layout


def per_item(kept):
    return [np.asarray(k) for k in (kept.tolist() if torch.is_tensor(kept) else [k.tolist() for k in kept])]


def test_visualize_llava_pruner(workspaces, tmp_path):
    """--pruner: a learned head with stage 2; two pad-to-square images of different shapes."""
    from data.processors import load_processor
    from modules.serve import load_pruned
    from trainer.cli import main

    ws = workspaces["llava"]
    model_dir = ws / "model"
    from transformers import AutoModelForImageTextToText

    adapter = get_adapter(AutoModelForImageTextToText.from_pretrained(model_dir))
    torch.manual_seed(0)
    head = PrunerHead.for_model(adapter, d_model=32, depth=1, heads=2)
    head.config.n1, head.config.n2, head.config.layer, head.config.stage2 = 6, 3, 2, {"name": "fastv"}
    head.save_pretrained(tmp_path / "pruner")
    sizes = [(20, 40), (48, 24)]
    paths = save_pictures(tmp_path, sizes)
    out = tmp_path / "out" / "kept.png"
    main(["visualize", "--pruner", str(tmp_path / "pruner"), "--model", str(model_dir), "--image", str(paths[0]),
          "--image", str(paths[1]), "--question", QUESTION, "--out", str(out), "--device", "cpu"])
    assert out.is_file()
    images = [Image.open(p).convert("RGB") for p in paths]
    pruning, _ = expected_run(model_dir, lambda m, p: load_pruned(m, tmp_path / "pruner", processor=p), images,
                              load_processor)
    expected = {stage: per_item(kept) for stage, kept in pruning.kept.items()}
    assert [len(k) for k in expected["stage1"]] == [6, 6] and [len(k) for k in expected["stage2"]] == [3, 3]
    # hand-computed: a (h, w) picture centred in a square of its longer side
    boxes = [(-10, 0, 30, 40), (0, -12, 48, 36)]
    layout = check_png(out, images, expected, ["stage1", "stage2"], boxes)
    assert len(layout["grids"]) == 2


def test_visualize_qwen_plan(workspaces, tmp_path):
    """--plan with stage 1 only: one column; a grid of (h/2) x (w/2) merged tokens over each whole picture."""
    from data.processors import load_processor
    from trainer.cli import main

    ws = workspaces["qwen2_5_vl"]
    plan = PruningPlan(stage1="fastervlm", n1=0.5)
    plan.save(tmp_path / "plan.yaml")
    sizes = [(56, 112), (84, 56)]  # 2 x 4 and 3 x 2 merged tokens, 28-pixel cells
    paths = save_pictures(tmp_path, sizes)
    out = tmp_path / "kept.png"
    main(["visualize", "--plan", str(tmp_path / "plan.yaml"), "--model", str(ws / "model"), "--image",
          str(paths[0]), "--image", str(paths[1]), "--question", QUESTION, "--out", str(out)])
    images = [Image.open(p).convert("RGB") for p in paths]
    pruning, inputs = expected_run(ws / "model", lambda m, p: PrunedVLM(m, plan, processor=p), images, load_processor)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 8], [1, 6, 4]]
    expected = {"stage1": per_item(pruning.kept["stage1"])}
    layout = check_png(out, images, expected, ["stage1"], [(0, 0, 56, 112), (0, 0, 84, 56)])
    assert [g["grid"] for g in layout["grids"]] == [[2, 4], [3, 2]]


@pytest.mark.parametrize("views", ["image", "view"])
def test_visualize_llava_next(workspaces, tmp_path, views):
    """AnyRes: the base view and the unpadded tile grid drawn as two grids over the picture, both stages; with
    the plan's views="image" they are one item (the tiles start after the base view's tokens), with --views view
    two items with budgets of their own."""
    from data.processors import load_processor
    from trainer.cli import main

    ws = workspaces["llava_next"]
    plan = PruningPlan(stage1="pool", n1=0.5, stage2="fastv", n2=0.25, layer=2)
    plan.save(tmp_path / "plan.yaml")
    paths = save_pictures(tmp_path, [(60, 100)])
    out = tmp_path / "kept.png"
    main(["visualize", "--plan", str(tmp_path / "plan.yaml"), "--model", str(ws / "model"), "--image",
          str(paths[0]), "--question", QUESTION, "--out", str(out)] + (["--views", "view"] if views == "view" else []))
    images = [Image.open(paths[0]).convert("RGB")]
    run_plan = PruningPlan(stage1="pool", n1=0.5, stage2="fastv", n2=0.25, layer=2, views=views)
    pruning, _ = expected_run(ws / "model", lambda m, p: PrunedVLM(m, run_plan, processor=p), images,
                              load_processor)
    assert len(pruning.num_tokens) == (2 if views == "view" else 1)
    expected = {stage: per_item(kept) for stage, kept in pruning.kept.items()}
    layout = check_png(out, images, expected, ["stage1", "stage2"])
    grids = layout["grids"]
    assert [g["label"] for g in grids] == ["image 0 base", "image 0 tiles"]
    assert [(g["item"], g["start"]) for g in grids] == ([(0, 0), (1, 0)] if views == "view" else [(0, 0), (0, 16)])
    assert grids[0]["box"] == [0.0, 0.0, 60.0, 100.0]
    # the model's unpadding keeps canvas token rows 2..5 of 8 (int(round(4.8, 7)) = 4 rows): a band of the picture
    assert grids[1]["grid"] == [4, 8] and grids[1]["box"] == pytest.approx([(16 - 12) * 60 / 39, 0, (48 - 12) * 60 / 39, 100])


def test_visualize_needs_a_pruner_or_a_plan(workspaces, tmp_path, capsys):
    from trainer.cli import main

    with pytest.raises(SystemExit):
        main(["visualize", "--model", str(workspaces["llava"] / "model"), "--image", "x.png", "--question", "q",
              "--out", str(tmp_path / "o.png")])
    assert "one of the arguments --pruner --plan is required" in capsys.readouterr().err
    plan = tmp_path / "plan.yaml"
    PruningPlan(stage1="random", n1=4).save(plan)
    with pytest.raises(ValueError, match="does not exist"):
        main(["visualize", "--plan", str(plan), "--model", str(workspaces["llava"] / "model"), "--image",
              str(tmp_path / "missing.png"), "--question", "q", "--out", str(tmp_path / "o.png")])


# ---- the callback ----------------------------------------------------------------------------------------------


def tiny_fit(workspace, root, logger, callback, epochs: int = 1):
    import lightning as L

    from data.datamodule import LlavaDataModule
    from modules.distill import DistillPruner

    module = DistillPruner(model=str(workspace / "model"), n1=6, n2=3, stage2="fastv", layer=2,
                           head={"d_model": 32, "depth": 1, "heads": 2}, lr=3e-3)
    data = LlavaDataModule(image_root=str(workspace / "images"), train_json=str(workspace / "train.json"),
                           val_json=str(workspace / "val.json"), processor=str(workspace / "model"), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=logger, callbacks=[callback],
                        default_root_dir=str(root), enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    return trainer, module, data


@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")
def test_callback_logs_overlays_to_tensorboard(workspaces, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from modules.distill import MODEL_INPUTS
    from trainer.callbacks import KeptTokenOverlays
    from trainer.visualize import run_and_draw

    ws = workspaces["llava"]
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer, module, data = tiny_fit(ws, tmp_path, logger, KeptTokenOverlays(num_samples=2))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["kept_tokens/sample_0", "kept_tokens/sample_1"]
    [logged] = events.Images("kept_tokens/sample_0")  # one validation epoch (the sanity check logs nothing)
    assert logged.step == trainer.global_step == 2
    import io

    shown = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)).convert("RGB"))
    # the same sample redrawn with the trained head: identical pixels
    dataset = data.datasets["validate"]
    item = dataset[0]
    collate = trainer.val_dataloaders.collate_fn
    batch = collate([item])
    module.eval()
    array, layout, _ = run_and_draw(module.pruned, {k: batch[k] for k in MODEL_INPUTS if k in batch},
                                    item["images"], title=f"epoch 0 step 2 sample 0 ({item['id']})",
                                    prompt_end=batch["prompt_end"])
    assert layout["stages"] == ["stage1", "stage2"] and len(layout["panels"]) == 2
    assert np.array_equal(shown, array)


@pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")
def test_callback_without_tensorboard_warns_once(workspaces, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from trainer.callbacks import KeptTokenOverlays

    callback = KeptTokenOverlays(num_samples=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_fit(workspaces["llava"], tmp_path, CSVLogger(str(tmp_path)), callback, epochs=2)
    mine = [w for w in caught if "KeptTokenOverlays" in str(w.message)]
    assert len(mine) == 1 and "CSVLogger" in str(mine[0].message)
