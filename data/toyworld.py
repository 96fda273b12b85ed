"""ToyWorld: a procedural fine-grained VQA world whose answers depend on a few small image regions.

A scene is a canvas (aspect 1:2..2:1, long side IMAGE_SIZE) with 3-6 coloured shapes; questions ask about the
colour, shape, count, relative position or quadrant of objects. Everything is deterministic by seed, and the
generator also emits dense per-patch labels (which object, colour, shape and canvas quadrant covers each vision
patch) in the frame the model sees: LLaVA-1.5 pads the canvas to a centred square, and since the long side already
equals IMAGE_SIZE the processor's resize is the identity, so the labels are pixel-exact.

    python -m data.toyworld ROOT --train 20000 --val 1000 --test 1000

Shapes are rasterised with numpy (a pixel belongs to a shape when its centre does), and the same id map drives
both the rendered image and the labels, so they can never disagree.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from data.tiny import tiny_llava_processor, tiny_tokenizer

IMAGE_SIZE = 96
PATCH = 12
GRID = IMAGE_SIZE // PATCH

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
COLOR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 190),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
SIZE_RADIUS = {"small": 7, "large": 13}
QUESTION_TYPES = ("color_of_shape", "shape_of_color", "count_of_color", "left_of", "quadrant")

BACKGROUND_RGB = (235, 235, 235)
# LlavaImageProcessorPil pads with tuple(int(m * 255) for m in OPENAI_CLIP_MEAN) when do_pad=True.
PAD_RGB = (122, 116, 104)
COLOR_CLASSES = COLORS + ("background", "padding")
BACKGROUND_CLASS = COLOR_CLASSES.index("background")
PADDING_CLASS = COLOR_CLASSES.index("padding")
IGNORE = -100

MIN_OBJECTS, MAX_OBJECTS = 3, 6
MAX_PER_COLOR = 3  # count answers stop at "three"
COLOR_REUSE_P = 0.4  # repeated colours make count answers two/three (and unique-colour failures) common enough
EDGE = 1  # background pixels kept between an object's pixel box and the canvas border
GAP = 2  # background pixels kept between two objects' pixel boxes
MIN_OBJECT_PIXELS = 6  # per PATCH x PATCH patch; scaled with patch area for other grids
LEFT_OF_MIN_DX = 8.0
QUADRANT_MARGIN = 4.0  # centres this close to a midline are ambiguous to a viewer

COUNT_WORDS = ("zero", "one", "two", "three")
QUADRANT_WORDS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
ANSWERS = {
    "color_of_shape": COLORS,
    "shape_of_color": SHAPES,
    "count_of_color": COUNT_WORDS,
    "left_of": ("yes", "no"),
    "quadrant": SHAPES,
}
QUESTION_WORDS = ("what", "is", "the", "color", "of", "shape", "object", "objects", "how", "many", "are",
                  "there", "left", "right", "top", "bottom", "in", "?")
VOCAB = ("USER", "ASSISTANT", ":") + QUESTION_WORDS + COLORS + SHAPES + COUNT_WORDS + ("yes", "no")

SPLITS = ("train", "val", "test")

_SCENE_TRIES = 200


@dataclass
class ToyObject:
    """One shape. Centre (cx, cy) and radius r (half the side of its bounding box) in canvas pixels."""

    id: int
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float


@dataclass
class Scene:
    """A canvas of width x height pixels; object ids are 0..len(objects)-1 in list order."""

    width: int
    height: int
    objects: list[ToyObject] = field(default_factory=list)


@dataclass
class Question:
    """A question (space-separated words ending with " ?"), its one-word answer and the objects it is about.

    refs[i] is the index (in question.split(" ")) of the word that closes the phrase naming targets[i] ("circle"
    in "the red circle"); empty when the targets are not named one by one (counts, quadrants). The teacher's
    grounding loss reads it.
    """

    qtype: str
    question: str
    answer: str
    targets: list[int]
    refs: list[int] = field(default_factory=list)


# -- scenes ----------------------------------------------------------------------------------------------------------


def make_scene(rng: random.Random) -> Scene:
    """A random scene: aspect log-uniform in [1:2, 2:1] with the long side IMAGE_SIZE, 3..6 non-overlapping
    objects fully inside the canvas, no repeated (color, shape) pair, at most three objects of one colour."""
    while True:
        ratio = 2.0 ** rng.uniform(-1.0, 1.0)  # width / height
        if ratio >= 1.0:
            width, height = IMAGE_SIZE, max(IMAGE_SIZE // 2, min(IMAGE_SIZE, round(IMAGE_SIZE / ratio)))
        else:
            width, height = max(IMAGE_SIZE // 2, min(IMAGE_SIZE, round(IMAGE_SIZE * ratio))), IMAGE_SIZE
        target = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
        objects: list[ToyObject] = []
        used: set[tuple[str, str]] = set()
        for _ in range(target):
            counts = Counter(o.color for o in objects)
            reusable = [c for c in counts if counts[c] < MAX_PER_COLOR and any((c, s) not in used for s in SHAPES)]
            if reusable and rng.random() < COLOR_REUSE_P:
                color = rng.choice(sorted(reusable, key=COLORS.index))
            else:
                allowed = [c for c in COLORS if counts[c] < MAX_PER_COLOR and any((c, s) not in used for s in SHAPES)]
                color = rng.choice(allowed)
            shape = rng.choice([s for s in SHAPES if (color, s) not in used])
            placed = _place(rng, width, height, objects, color, shape, rng.choice(SIZES))
            if placed is None:  # crowded canvas: a small object may still fit
                placed = _place(rng, width, height, objects, color, shape, "small")
            if placed is not None:
                objects.append(placed)
                used.add((color, shape))
        if len(objects) >= MIN_OBJECTS:
            return Scene(width, height, objects)


def _place(rng: random.Random, width: int, height: int, objects: list[ToyObject], color: str, shape: str,
           size: str) -> ToyObject | None:
    """Uniform over every free centre pixel (exact, so a crowded canvas never fails by bad luck), or None."""
    r = SIZE_RADIUS[size]
    lo = r + EDGE
    free = np.zeros((height, width), dtype=bool)
    free[lo:height - r - EDGE, lo:width - r - EDGE] = True
    for o in objects:
        # centre pixels k (centre k + 0.5) whose pixel box would come within GAP pixels of o's on both axes
        need = r + o.r + 1 + GAP
        ox, oy = o.cx - 0.5, o.cy - 0.5
        x0, x1 = max(0, int(np.floor(ox - need)) + 1), int(np.ceil(ox + need))
        y0, y1 = max(0, int(np.floor(oy - need)) + 1), int(np.ceil(oy + need))
        free[y0:y1, x0:x1] = False
    spots = np.flatnonzero(free)
    if not len(spots):
        return None
    ky, kx = divmod(int(spots[rng.randrange(len(spots))]), width)
    # centres on pixel centres keep every shape symmetric on the pixel grid
    return ToyObject(len(objects), shape, color, size, kx + 0.5, ky + 0.5, float(r))


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Which pixel centres at offsets (dx, dy) from the object centre lie inside the shape."""
    if shape == "circle":
        # the quarter-pixel slack removes the one-pixel nubs an exact r^2 test leaves at the four extremes
        return dx * dx + dy * dy <= (r + 0.25) ** 2
    if shape == "square":
        # slightly inset so a square's area stays close to a circle's: size, not shape, should carry area
        half = 0.85 * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # apex up, base the full box width
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = 0.34 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


_STENCILS: dict[tuple[str, float], np.ndarray] = {}


def _stencil(shape: str, r: float) -> np.ndarray:
    """Mask of a shape centred on a pixel centre, (2r+1) x (2r+1) for integer r: generated scenes reuse a handful."""
    key = (shape, r)
    if key not in _STENCILS:
        off = np.arange(-int(r), int(r) + 1, dtype=np.float32)
        _STENCILS[key] = _shape_mask(shape, off[None, :], off[:, None], r)
    return _STENCILS[key]


def _canvas_ids(scene: Scene) -> np.ndarray:
    """(height, width) int16: 0 background, id + 1 for the object covering each pixel (later objects on top)."""
    ids = np.zeros((scene.height, scene.width), dtype=np.int16)
    for obj in scene.objects:
        kx, ky = obj.cx - 0.5, obj.cy - 0.5
        if float(obj.r).is_integer() and kx.is_integer() and ky.is_integer():
            # fast path (every generated object): a cached stencil, clipped to the canvas
            r, kx, ky = int(obj.r), int(kx), int(ky)
            x0, y0 = kx - r, ky - r
            mask = _stencil(obj.shape, float(r))
            cx0, cy0 = max(0, -x0), max(0, -y0)
            cx1 = min(mask.shape[1], scene.width - x0)
            cy1 = min(mask.shape[0], scene.height - y0)
            if cx0 < cx1 and cy0 < cy1:
                ids[y0 + cy0:y0 + cy1, x0 + cx0:x0 + cx1][mask[cy0:cy1, cx0:cx1]] = obj.id + 1
            continue
        x0, x1 = max(0, int(np.floor(obj.cx - obj.r))), min(scene.width, int(np.ceil(obj.cx + obj.r)) + 1)
        y0, y1 = max(0, int(np.floor(obj.cy - obj.r))), min(scene.height, int(np.ceil(obj.cy + obj.r)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - obj.cx)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - obj.cy)[:, None]
        ids[y0:y1, x0:x1][_shape_mask(obj.shape, dx, dy, obj.r)] = obj.id + 1
    return ids


def _palette(scene: Scene) -> np.ndarray:
    max_id = max((o.id for o in scene.objects), default=-1)
    pal = np.empty((max_id + 2, 3), dtype=np.uint8)
    pal[0] = BACKGROUND_RGB
    for o in scene.objects:
        pal[o.id + 1] = COLOR_RGB[o.color]
    return pal


def _render_ids(scene: Scene, ids: np.ndarray) -> Image.Image:
    # a palette image converted in C is ~3x faster than numpy fancy indexing into an RGB array
    if ids.max(initial=0) > 255:
        return Image.fromarray(np.take(_palette(scene), ids, axis=0))
    im = Image.frombytes("P", (scene.width, scene.height), ids.astype(np.uint8).tobytes())
    im.putpalette(_palette(scene).tobytes())
    return im.convert("RGB")


def render(scene: Scene) -> Image.Image:
    """The RGB canvas (scene.width x scene.height), unpadded: what is saved to disk and fed to the processor."""
    return _render_ids(scene, _canvas_ids(scene))


def pad_offsets(width: int, height: int) -> tuple[int, int]:
    """(top, left) of the canvas inside its max(width, height) square, as LlavaImageProcessorPil.pad_to_square
    places it (integer floor of half the difference)."""
    side = max(width, height)
    if width > height:
        return (side - height) // 2, 0
    return 0, (side - width) // 2


def _padded_ids(scene: Scene, canvas_ids: np.ndarray, size: int) -> np.ndarray:
    side = max(scene.width, scene.height)
    top, left = pad_offsets(scene.width, scene.height)
    square = np.full((side, side), -1, dtype=np.int16)
    square[top:top + scene.height, left:left + scene.width] = canvas_ids
    if size == side:
        return square
    # nearest neighbour: ToyWorld canvases already have side == IMAGE_SIZE, other sizes are for other grids/tests
    idx = np.minimum(((np.arange(size) + 0.5) * side / size).astype(np.int64), side - 1)
    return square[np.ix_(idx, idx)]


def id_map(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) int16 in the padded-square frame the model sees: -1 padding, 0 background, id + 1 objects."""
    return _padded_ids(scene, _canvas_ids(scene), size)


# -- dense labels ----------------------------------------------------------------------------------------------------


def _labels_from_ids(scene: Scene, padded: np.ndarray, grid: int) -> dict[str, torch.Tensor]:
    size = padded.shape[0]
    if size % grid:
        raise ValueError(f"grid {grid} does not divide the image size {size}")
    p = size // grid
    n_patch = grid * grid
    values = padded.astype(np.int64) + 1  # 0 padding, 1 background, id + 2 objects
    n_cls = int(values.max()) + 1
    cells = values.reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(n_patch, p * p)
    flat = (np.arange(n_patch)[:, None] * n_cls + cells).ravel()
    counts = np.bincount(flat, minlength=n_patch * n_cls).reshape(n_patch, n_cls)

    obj_label = np.zeros(n_patch, dtype=np.int64)
    if n_cls > 2:
        obj_counts = counts[:, 2:]
        best = obj_counts.argmax(axis=1)
        has_obj = obj_counts[np.arange(n_patch), best] >= MIN_OBJECT_PIXELS * (p * p) / (PATCH * PATCH)
    else:
        best = np.zeros(n_patch, dtype=np.int64)
        has_obj = np.zeros(n_patch, dtype=bool)
    # padding when less than half of the patch is canvas, matching modules.vlm.llava.pad_to_square_valid_mask
    is_pad = ~has_obj & (2 * (p * p - counts[:, 0]) < p * p)
    obj_label[has_obj] = best[has_obj] + 1
    obj_label[is_pad] = -1

    color_of = np.full(n_cls, BACKGROUND_CLASS, dtype=np.int64)
    shape_of = np.full(n_cls, IGNORE, dtype=np.int64)
    for o in scene.objects:
        color_of[o.id + 1] = COLORS.index(o.color)
        shape_of[o.id + 1] = SHAPES.index(o.shape)
    lookup = np.maximum(obj_label, 0)
    color = color_of[lookup]
    color[is_pad] = PADDING_CLASS
    shape = shape_of[lookup]
    shape[~has_obj] = IGNORE

    rows, cols = np.divmod(np.arange(n_patch), grid)
    # canvas midlines in this frame; quadrant by the patch centre
    side = max(scene.width, scene.height)
    top, left = pad_offsets(scene.width, scene.height)
    scale = size / side
    mid_x, mid_y = (left + scene.width / 2) * scale, (top + scene.height / 2) * scale
    quadrant = 2 * ((rows + 0.5) * p >= mid_y) + ((cols + 0.5) * p >= mid_x)
    quadrant[is_pad] = IGNORE

    as_t = torch.from_numpy
    return {"object": as_t(obj_label), "color": as_t(color), "shape": as_t(shape), "row": as_t(rows),
            "col": as_t(cols), "quadrant": as_t(quadrant.astype(np.int64))}


def patch_labels(scene: Scene, grid: int = GRID) -> dict[str, torch.Tensor]:
    """Dense per-patch labels, each (grid * grid,) long, row-major over the padded square.

    "object": -1 padding, 0 background, id + 1 (the object with most pixels in the patch, if it covers at least
    6 px per 12 x 12 patch; else padding when less than half the patch is canvas, else background).
    "color": index into COLOR_CLASSES (6 background, 7 padding); "shape": index into SHAPES, -100 off objects;
    "row", "col"; "quadrant": 0..3 (TL, TR, BL, BR of the canvas, by patch centre), -100 on padding.
    """
    return _labels_from_ids(scene, id_map(scene, IMAGE_SIZE), grid)


# -- questions -------------------------------------------------------------------------------------------------------


def _quadrant_hosts(scene: Scene) -> dict[int, ToyObject]:
    """Quadrants (0..3) holding exactly one object centre, with no other centre near enough to be ambiguous."""
    mx, my = scene.width / 2, scene.height / 2
    hosts = {}
    for q in range(4):
        right, bottom = q % 2, q // 2
        sure, maybe = [], 0
        for o in scene.objects:
            sx = (o.cx - mx) if right else (mx - o.cx)
            sy = (o.cy - my) if bottom else (my - o.cy)
            if sx > -QUADRANT_MARGIN and sy > -QUADRANT_MARGIN:
                maybe += 1
                if sx >= QUADRANT_MARGIN and sy >= QUADRANT_MARGIN:
                    sure.append(o)
        if maybe == 1 and len(sure) == 1:
            hosts[q] = sure[0]
    return hosts


def _candidates(scene: Scene, qtype: str) -> dict[str, list[Question]]:
    """Every unambiguous question of `qtype` the scene can host, grouped by answer."""
    out: dict[str, list[Question]] = {}

    def add(text: str, answer: str, targets: list[int], refs: tuple[int, ...] = ()) -> None:
        out.setdefault(answer, []).append(Question(qtype, text + " ?", answer, targets, list(refs)))

    objs = scene.objects
    if qtype == "color_of_shape":
        by_shape = Counter(o.shape for o in objs)
        for o in objs:
            if by_shape[o.shape] == 1:
                add(f"what is the color of the {o.shape}", o.color, [o.id], refs=(6,))
    elif qtype == "shape_of_color":
        by_color = Counter(o.color for o in objs)
        for o in objs:
            if by_color[o.color] == 1:
                add(f"what is the shape of the {o.color} object", o.shape, [o.id], refs=(7,))
    elif qtype == "count_of_color":
        for c in COLORS:
            ids = [o.id for o in objs if o.color == c]
            if len(ids) < len(COUNT_WORDS):
                add(f"how many {c} objects are there", COUNT_WORDS[len(ids)], ids)
    elif qtype == "left_of":
        for a in objs:
            for b in objs:
                if a is not b and abs(a.cx - b.cx) > LEFT_OF_MIN_DX:
                    add(f"is the {a.color} {a.shape} left of the {b.color} {b.shape}",
                        "yes" if a.cx < b.cx else "no", [a.id, b.id], refs=(3, 8))
    elif qtype == "quadrant":
        for q, o in _quadrant_hosts(scene).items():
            add("what shape is in the {} {}".format(*QUADRANT_WORDS[q]), o.shape, [o.id])
    else:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    return out


def make_question(scene: Scene, rng: random.Random, qtype: str | None = None,
                  answer: str | None = None) -> Question | None:
    """A random unambiguous question about `scene`, or None when the scene cannot host one.

    qtype None draws a type uniformly. The answer is drawn uniformly among those the scene can host, then the
    question among those with that answer; `answer` forces it (None if the scene cannot host it), which is how
    `sample` makes every answer of a type equally likely.
    """
    qtype = qtype if qtype is not None else rng.choice(QUESTION_TYPES)
    cands = _candidates(scene, qtype)
    if answer is None:
        if not cands:
            return None
        answer = rng.choice([a for a in ANSWERS[qtype] if a in cands])
    elif answer not in ANSWERS[qtype]:
        raise ValueError(f"{answer!r} is not an answer of {qtype!r}; expected one of {ANSWERS[qtype]}")
    if answer not in cands:
        return None
    return rng.choice(cands[answer])


# Question types whose answer is a colour or shape name: make_scene treats colour names and shape names
# symmetrically, so relabelling a scene by swapping two of them keeps its distribution.
_ANSWER_ATTR = {"color_of_shape": "color", "shape_of_color": "shape", "quadrant": "shape"}


def _swap(scene: Scene, q: Question, attr: str, target: str) -> tuple[Scene, Question]:
    """Relabel scene and question so the answer becomes `target`, exchanging it with the current answer."""
    swap = {q.answer: target, target: q.answer}
    objects = [ToyObject(o.id, o.shape, o.color, o.size, o.cx, o.cy, o.r) for o in scene.objects]
    for o in objects:
        setattr(o, attr, swap.get(getattr(o, attr), getattr(o, attr)))
    text = " ".join(swap.get(w, w) for w in q.question.split(" "))
    return Scene(scene.width, scene.height, objects), Question(q.qtype, text, target, list(q.targets), list(q.refs))


def _scene_and_question(rng: random.Random, qtype: str) -> tuple[Scene, Question]:
    """A scene and a question of `qtype` whose answer is uniform over the type's answers.

    Colour/shape answers: any hosted question, then a symmetric relabelling to a uniformly drawn answer (no
    rejected scenes). Counts and left_of: the answer is drawn first and scenes are rejected until one hosts it.
    """
    answer = rng.choice(ANSWERS[qtype])
    attr = _ANSWER_ATTR.get(qtype)
    for _ in range(_SCENE_TRIES):
        scene = make_scene(rng)
        if attr is None:
            q = make_question(scene, rng, qtype, answer=answer)
        else:
            q = make_question(scene, rng, qtype)
            if q is not None:
                scene, q = _swap(scene, q, attr, answer)
        if q is not None:
            return scene, q
    raise RuntimeError(f"no scene hosted a {qtype!r} question with answer {answer!r} in {_SCENE_TRIES} tries")


def _rng(split: str, index: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    # str seeds hash with SHA-512 (independent of PYTHONHASHSEED), so splits get disjoint, stable streams
    return random.Random(f"toyworld/{split}/{index}")


def qtype_weight_list(qtype_weights: dict[str, float]) -> list[float]:
    """The weights of QUESTION_TYPES in order (absent types weigh 0); a clear error for a mapping that cannot draw."""
    weights = [float(qtype_weights.get(q, 0.0)) for q in QUESTION_TYPES]
    if set(qtype_weights) - set(QUESTION_TYPES) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"qtype_weights={qtype_weights}: give non-negative weights, not all zero, for "
                         f"types among {QUESTION_TYPES}")
    return weights


def sample(index: int, split: str, qtype_weights: dict[str, float] | None = None) -> dict:
    """Sample `index` of `split` (deterministic; splits use disjoint seeds). Question type uniform over
    QUESTION_TYPES (or drawn with `qtype_weights`, a training curriculum; absent types weigh 0), answer uniform
    within the type.

    Returns {"scene": Scene, "image": PIL canvas (unpadded), "question": Question, "labels": patch_labels(scene)}.
    """
    rng = _rng(split, index)
    if qtype_weights is None:
        qtype = rng.choice(QUESTION_TYPES)
    else:
        qtype = rng.choices(QUESTION_TYPES, qtype_weight_list(qtype_weights))[0]
    scene, question = _scene_and_question(rng, qtype)
    ids = _canvas_ids(scene)
    return {"scene": scene, "image": _render_ids(scene, ids), "question": question,
            "labels": _labels_from_ids(scene, _padded_ids(scene, ids, IMAGE_SIZE), GRID)}


def majority_baselines(n: int = 2000, seed: int = 0) -> dict:
    """Majority-answer rate of each question type over n sampled questions per type, plus "overall" (their
    mean: types are equally likely in `sample`). What a model that ignores the image can reach at best."""
    rng = random.Random(seed)
    out = {}
    for qtype in QUESTION_TYPES:
        counts = Counter(_scene_and_question(rng, qtype)[1].answer for _ in range(n))
        out[qtype] = max(counts.values()) / n
    out["overall"] = sum(out[t] for t in QUESTION_TYPES) / len(QUESTION_TYPES)
    return out


# -- text side -------------------------------------------------------------------------------------------------------


def toyworld_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every ToyWorld question/answer word, the chat words and the special tokens."""
    return tiny_tokenizer(VOCAB)


def toyworld_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """A real LlavaProcessor for ToyWorld: pad to square, IMAGE_SIZE pixels, PATCH patches (GRID**2 tokens)."""
    return tiny_llava_processor(tokenizer or toyworld_tokenizer(), image_size=IMAGE_SIZE, patch_size=PATCH,
                                pad_to_square=True)


# -- files -----------------------------------------------------------------------------------------------------------


def write_split(root: str | Path, split: str, n: int) -> Path:
    """Write samples 0..n-1 of `split`: root/images/{split}_{i:06d}.png (canvas, unpadded), root/{split}.json
    (LLaVA conversation format) and root/{split}_meta.json (per id: qtype, answer, targets, width, height,
    object_patches and target_patches as GRID patch indices). Returns the JSON path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records, meta = [], {}
    for i in range(n):
        s = sample(i, split)
        q, scene = s["question"], s["scene"]
        name = f"{split}_{i:06d}"
        s["image"].save(root / "images" / f"{name}.png")
        records.append({"id": name, "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + q.question}, {"from": "gpt", "value": q.answer}]})
        obj = s["labels"]["object"]
        targets = torch.tensor([t + 1 for t in q.targets], dtype=torch.long)
        meta[name] = {
            "qtype": q.qtype, "answer": q.answer, "targets": q.targets, "width": scene.width, "height": scene.height,
            "object_patches": torch.nonzero(obj > 0).flatten().tolist(),
            "target_patches": torch.nonzero(torch.isin(obj, targets)).flatten().tolist(),
        }
    path = root / f"{split}.json"
    path.write_text(json.dumps(records))
    (root / f"{split}_meta.json").write_text(json.dumps(meta))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=1000)
    args = parser.parse_args()
    for split in SPLITS:
        n = getattr(args, split)
        if n > 0:
            print(f"wrote {write_split(args.root, split, n)} ({n} samples)")


if __name__ == "__main__":
    main()
