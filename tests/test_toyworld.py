"""ToyWorld: determinism, scene invariants, question correctness, dense labels in the processor's frame, files."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from data import toyworld as tw
from data.toyworld import (
    COLOR_CLASSES,
    COLORS,
    GRID,
    IMAGE_SIZE,
    PAD_RGB,
    QUESTION_TYPES,
    SHAPES,
    Scene,
    ToyObject,
    id_map,
    make_question,
    make_scene,
    patch_labels,
    render,
    sample,
)
from modules.vlm.llava import pad_to_square_valid_mask


def obj(i, shape, color, size, cx, cy):
    return ToyObject(i, shape, color, size, cx, cy, float(tw.SIZE_RADIUS[size]))


@pytest.fixture(scope="module")
def processor():
    return tw.toyworld_processor()


def unnormalised(processor, image) -> np.ndarray:
    """(H, W, 3) pixel values the processor produced, back in 0..255."""
    ip = processor.image_processor
    pv = ip(images=[image], return_tensors="np")["pixel_values"][0]
    mean, std = np.array(ip.image_mean)[:, None, None], np.array(ip.image_std)[:, None, None]
    return ((pv * std + mean) * 255).transpose(1, 2, 0)


# -- an independent oracle: parse the question text and answer it from the scene ------------------------------------


def oracle(scene: Scene, question: str) -> tuple[str, list[int]]:
    w = question.split(" ")
    assert w[-1] == "?"
    objs = scene.objects
    if w[:6] == ["what", "is", "the", "color", "of", "the"]:
        hits = [o for o in objs if o.shape == w[6]]
        assert len(hits) == 1, question
        return hits[0].color, [hits[0].id]
    if w[:6] == ["what", "is", "the", "shape", "of", "the"]:
        hits = [o for o in objs if o.color == w[6]]
        assert len(hits) == 1, question
        return hits[0].shape, [hits[0].id]
    if w[:2] == ["how", "many"]:
        hits = [o.id for o in objs if o.color == w[2]]
        return tw.COUNT_WORDS[len(hits)], hits
    if w[0] == "is":
        (a,) = [o for o in objs if (o.color, o.shape) == (w[2], w[3])]
        (b,) = [o for o in objs if (o.color, o.shape) == (w[7], w[8])]
        assert abs(a.cx - b.cx) > 8, question
        return ("yes" if a.cx < b.cx else "no"), [a.id, b.id]
    if w[:5] == ["what", "shape", "is", "in", "the"]:
        top, left = w[5] == "top", w[6] == "left"
        hits = [o for o in objs
                if (o.cy < scene.height / 2) == top and (o.cx < scene.width / 2) == left]
        assert len(hits) == 1, question
        return hits[0].shape, [hits[0].id]
    raise AssertionError(f"unparsed question {question!r}")


# -- determinism and scenes -----------------------------------------------------------------------------------------


def test_sample_is_deterministic_and_splits_are_disjoint():
    for i in (0, 7):
        a, b = sample(i, "train"), sample(i, "train")
        assert a["scene"] == b["scene"] and a["question"] == b["question"]
        assert a["image"].tobytes() == b["image"].tobytes()
        assert all(torch.equal(a["labels"][k], b["labels"][k]) for k in a["labels"])
    scenes = {split: [repr(sample(i, split)["scene"]) for i in range(40)] for split in tw.SPLITS}
    assert len(set(scenes["train"])) == 40
    assert not set(scenes["train"]) & set(scenes["val"])
    assert not set(scenes["train"]) & set(scenes["test"])
    assert not set(scenes["val"]) & set(scenes["test"])
    with pytest.raises(ValueError):
        sample(0, "dev")


def test_scene_invariants():
    rng = random.Random(1)
    n_objects = Counter()
    for _ in range(300):
        s = make_scene(rng)
        assert max(s.width, s.height) == IMAGE_SIZE
        assert 0.5 <= s.width / s.height <= 2.0
        assert tw.MIN_OBJECTS <= len(s.objects) <= tw.MAX_OBJECTS
        n_objects[len(s.objects)] += 1
        assert [o.id for o in s.objects] == list(range(len(s.objects)))
        assert len({(o.color, o.shape) for o in s.objects}) == len(s.objects)
        assert max(Counter(o.color for o in s.objects).values()) <= 3
        for o in s.objects:
            assert o.cx - o.r - 0.5 >= 1 and o.cx + o.r + 0.5 <= s.width - 1
            assert o.cy - o.r - 0.5 >= 1 and o.cy + o.r + 0.5 <= s.height - 1
            for p in s.objects:
                if p is not o:
                    assert max(abs(o.cx - p.cx), abs(o.cy - p.cy)) > o.r + p.r + 1
        # no occlusion: every object keeps all of its own pixels
        ids = tw._canvas_ids(s)
        for o in s.objects:
            assert (ids == o.id + 1).sum() == tw._stencil(o.shape, o.r).sum()
    assert set(n_objects) == {3, 4, 5, 6}


def test_render_colors():
    s = Scene(60, 96, [obj(0, "circle", "blue", "large", 20.5, 30.5)])
    px = np.asarray(render(s))
    assert px.shape == (96, 60, 3)
    assert tuple(px[30, 20]) == tw.COLOR_RGB["blue"] and tuple(px[80, 50]) == tw.BACKGROUND_RGB
    assert tw.BACKGROUND_RGB != PAD_RGB and PAD_RGB not in tw.COLOR_RGB.values()


# -- questions -------------------------------------------------------------------------------------------------------

# 96 x 64 canvas, midlines x = 48, y = 32: one object per quadrant, red twice.
HAND = Scene(96, 64, [
    obj(0, "circle", "red", "large", 20.5, 15.5),
    obj(1, "square", "blue", "small", 70.5, 15.5),
    obj(2, "triangle", "red", "small", 20.5, 50.5),
    obj(3, "cross", "green", "large", 75.5, 46.5),
])
EXPECTED = {
    "what is the color of the circle ?": ("red", [0]),
    "what is the color of the square ?": ("blue", [1]),
    "what is the color of the triangle ?": ("red", [2]),
    "what is the color of the cross ?": ("green", [3]),
    "what is the shape of the blue object ?": ("square", [1]),
    "what is the shape of the green object ?": ("cross", [3]),
    "how many red objects are there ?": ("two", [0, 2]),
    "how many blue objects are there ?": ("one", [1]),
    "how many yellow objects are there ?": ("zero", []),
    "is the red circle left of the blue square ?": ("yes", [0, 1]),
    "is the blue square left of the red circle ?": ("no", [1, 0]),
    "is the green cross left of the red triangle ?": ("no", [3, 2]),
    "what shape is in the top left ?": ("circle", [0]),
    "what shape is in the top right ?": ("square", [1]),
    "what shape is in the bottom left ?": ("triangle", [2]),
    "what shape is in the bottom right ?": ("cross", [3]),
}


def test_questions_on_hand_built_scene():
    seen = set()
    for seed in range(150):
        rng = random.Random(seed)
        for qtype in QUESTION_TYPES:
            q = make_question(HAND, rng, qtype)
            assert q is not None and q.qtype == qtype
            assert q.question.endswith(" ?") and " " not in q.answer
            # red is not unique, and the red circle / red triangle share cx
            assert "red object " not in q.question and not ("circle" in q.question and "triangle" in q.question)
            if q.question in EXPECTED:
                assert (q.answer, q.targets) == EXPECTED[q.question]
                seen.add(q.question)
            else:
                assert (q.answer, q.targets) == oracle(HAND, q.question)
    assert seen == set(EXPECTED)


def test_questions_refused_when_ambiguous():
    rng = random.Random(0)
    # both shapes and both colours repeated; the red square's centre sits 1.5 px from the x midline (48)
    s = Scene(96, 96, [obj(0, "circle", "red", "small", 20.5, 20.5), obj(1, "circle", "blue", "small", 20.5, 70.5),
                       obj(2, "square", "red", "small", 46.5, 70.5), obj(3, "square", "blue", "small", 75.5, 20.5)])
    for qtype in ("color_of_shape", "shape_of_color"):
        assert make_question(s, rng, qtype) is None
    # bottom left holds one sure centre plus the ambiguous one; bottom right only the ambiguous one
    hosts = tw._quadrant_hosts(s)
    assert {q: o.id for q, o in hosts.items()} == {0: 0, 1: 3}
    # the two circles share cx: never compared
    for _ in range(50):
        q = make_question(s, rng, "left_of")
        assert oracle(s, q.question)[0] == q.answer
    assert make_question(s, rng, "count_of_color", answer="three") is None
    assert make_question(s, rng, "count_of_color", answer="two").answer == "two"


def test_sampled_questions_match_an_independent_oracle():
    types = Counter()
    for i in range(250):
        s = sample(i, "val")
        q = s["question"]
        types[q.qtype] += 1
        answer, targets = oracle(s["scene"], q.question)
        assert (q.answer, sorted(q.targets)) == (answer, sorted(targets))
    assert set(types) == set(QUESTION_TYPES) and min(types.values()) > 30


def test_answers_balanced():
    rates = tw.majority_baselines(n=300, seed=1)
    assert set(rates) == set(QUESTION_TYPES) | {"overall"}
    assert all(rates[t] < 0.6 for t in QUESTION_TYPES), rates
    counts = Counter(sample(i, "train")["question"].answer for i in range(300))
    assert set(COLORS) <= set(counts) and set(SHAPES) <= set(counts) and {"zero", "three"} <= set(counts)


# -- dense labels ----------------------------------------------------------------------------------------------------


def test_patch_labels_hand_built():
    # square of half-side 0.85 * 13: canvas pixels x 25..47, y 13..35; padded frame (top 24): y 37..59
    s = Scene(96, 48, [obj(0, "square", "red", "large", 36.5, 24.5)])
    lab = patch_labels(s)
    assert set(lab) == {"object", "color", "shape", "row", "col", "quadrant"}
    assert all(v.shape == (GRID * GRID,) and v.dtype == torch.long for v in lab.values())
    rows, cols = lab["row"].view(GRID, GRID), lab["col"].view(GRID, GRID)
    assert torch.equal(rows[:, 0], torch.arange(GRID)) and torch.equal(cols[0], torch.arange(GRID))

    obj_grid = lab["object"].view(GRID, GRID)
    on = torch.zeros(GRID, GRID, dtype=torch.bool)
    on[3:5, 2:4] = True
    assert torch.equal(obj_grid == 1, on)
    pad = torch.zeros(GRID, GRID, dtype=torch.bool)
    pad[[0, 1, 6, 7]] = True
    assert torch.equal(obj_grid == -1, pad)
    assert torch.equal(lab["object"] != -1, pad_to_square_valid_mask(96, 48, grid=GRID, image_size=IMAGE_SIZE))

    color = lab["color"].view(GRID, GRID)
    assert (color[on] == COLORS.index("red")).all()
    assert (color[pad] == COLOR_CLASSES.index("padding")).all()
    assert (color[~on & ~pad] == COLOR_CLASSES.index("background")).all()
    shape = lab["shape"].view(GRID, GRID)
    assert (shape[on] == SHAPES.index("square")).all() and (shape[~on] == -100).all()
    # canvas midlines in the padded frame: x = 48, y = 24 + 24 = 48
    quad = lab["quadrant"].view(GRID, GRID)
    assert (quad[pad] == -100).all()
    assert quad[3, 3] == 0 and quad[3, 4] == 1 and quad[4, 3] == 2 and quad[5, 7] == 3

    # other grids: 24-px patches (threshold 24 px): the square (x 25..47, y 37..59) fills column 1 of rows
    # 1-2; rows 0 and 3 are padding (the canvas spans y 24..71)
    obj4 = patch_labels(s, grid=4)["object"].view(4, 4)
    expected = torch.tensor([[-1] * 4, [0, 1, 0, 0], [0, 1, 0, 0], [-1] * 4])
    assert torch.equal(obj4, expected)
    # 6-px patches (threshold 1.5 px): columns 4-7 (x 24..47, 25..29 partly) of rows 6-9 (y 36..59);
    # the canvas covers rows 4-11
    obj16 = patch_labels(s, grid=16)["object"].view(16, 16)
    expected = torch.zeros(16, 16, dtype=torch.long)
    expected[:4] = expected[12:] = -1
    expected[6:10, 4:8] = 1
    assert torch.equal(obj16, expected)


def patch_labels_reference(scene: Scene, grid: int) -> dict[str, list[int]]:
    """Per patch, from the pixels of the padded frame one at a time: the object with the most pixels if it has
    at least 6 px per 12 x 12 area, else padding when under half the patch is canvas, else background."""
    ids = id_map(scene)
    p = IMAGE_SIZE // grid
    need = 6 * p * p / 144
    top, left = tw.pad_offsets(scene.width, scene.height)
    mid_y, mid_x = top + scene.height / 2, left + scene.width / 2
    out = {"object": [], "color": [], "shape": [], "quadrant": []}
    for r in range(grid):
        for c in range(grid):
            cell = Counter(ids[r * p:(r + 1) * p, c * p:(c + 1) * p].flatten().tolist())
            objects = sorted(((-k, v) for v, k in cell.items() if v > 0))  # most pixels, then lower id
            if objects and -objects[0][0] >= need:
                o = scene.objects[objects[0][1] - 1]
                out["object"].append(o.id + 1)
                out["color"].append(COLORS.index(o.color))
                out["shape"].append(SHAPES.index(o.shape))
            elif 2 * (p * p - cell[-1]) < p * p:
                out["object"].append(-1)
                out["color"].append(COLOR_CLASSES.index("padding"))
                out["shape"].append(-100)
            else:
                out["object"].append(0)
                out["color"].append(COLOR_CLASSES.index("background"))
                out["shape"].append(-100)
            centre_y, centre_x = (r + 0.5) * p, (c + 0.5) * p
            out["quadrant"].append(-100 if out["object"][-1] == -1 else
                                   2 * (centre_y >= mid_y) + (centre_x >= mid_x))
    return out


@pytest.mark.parametrize("grid", [4, 8, 16])
def test_patch_labels_match_a_pixel_count_reference(grid):
    objects = Counter()
    for i in range(12):
        scene = sample(i, "val")["scene"]
        lab = patch_labels(scene, grid=grid)
        ref = patch_labels_reference(scene, grid)
        for key, values in ref.items():
            assert lab[key].tolist() == values, (i, key)
        objects.update(ref["object"])
    assert objects[-1] > 0 and objects[0] > 0 and len(objects) >= 6  # padding, background, several objects


def test_patch_labels_object_pixel_threshold():
    # a small circle whose right edge pokes 1 px into the next patch column: too few pixels there to own it
    s = Scene(96, 96, [obj(0, "circle", "green", "small", 16.5, 18.5)])  # pixels x 9..23, y 11..25
    grid = patch_labels(s)["object"].view(GRID, GRID)
    assert (grid[:, 2] == 0).all() and grid[1, 1] == 1
    ids = id_map(s)
    assert (ids[:, 24:] == 0).all()  # nothing past x = 23


@pytest.mark.parametrize("size", [(96, 60), (61, 96), (96, 49), (96, 96)])
def test_id_map_matches_processor_padding(processor, size):
    w, h = size
    s = Scene(w, h, [obj(0, "cross", "orange", "small", 12.5, 12.5), obj(1, "triangle", "purple", "large",
                                                                       w - 16.5, h - 16.5)])
    px = unnormalised(processor, render(s))
    ids = id_map(s)
    assert ids.shape == (IMAGE_SIZE, IMAGE_SIZE) and ids.dtype == np.int16
    is_pad = (np.abs(px - np.array(PAD_RGB)) < 1.0).all(axis=-1)
    assert np.array_equal(is_pad, ids == -1)
    for value, rgb in ((0, tw.BACKGROUND_RGB), (1, tw.COLOR_RGB["orange"]), (2, tw.COLOR_RGB["purple"])):
        assert np.abs(px[ids == value] - np.array(rgb)).max() < 1.0


def test_processor_and_debias_mask(processor):
    s = sample(3, "train")
    out = processor(images=[s["image"]], text=["USER : <image> what ? ASSISTANT :"], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert int((out["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == GRID * GRID
    # the only allowed disagreement: a mostly-padding patch that holds >= 6 px of an object is labelled object
    for i in range(60):
        s = sample(i, "test")
        sc, lab = s["scene"], s["labels"]
        valid = pad_to_square_valid_mask(sc.width, sc.height, grid=GRID, image_size=IMAGE_SIZE)
        differ = valid != (lab["object"] != -1)
        assert (~valid[differ]).all() and (lab["object"][differ] > 0).all()


# -- text side and files ---------------------------------------------------------------------------------------------


def test_tokenizer_covers_every_word():
    tok = tw.toyworld_tokenizer()
    for i in range(100):
        q = sample(i, "train")["question"]
        ids = tok(f"USER : <image> {q.question} ASSISTANT : {q.answer}")["input_ids"]
        assert tok.unk_token_id not in ids
        assert len(tok(q.answer, add_special_tokens=False)["input_ids"]) == 1


def test_write_split_readable_by_llava_json(tmp_path, processor):
    from data.collate import IGNORE_INDEX, LlavaCollator
    from data.llava_json import LlavaJsonDataset

    path = tw.write_split(tmp_path, "val", 6)
    records = json.loads(path.read_text())
    meta = json.loads((tmp_path / "val_meta.json").read_text())
    ds = LlavaJsonDataset(path, tmp_path / "images", processor)
    assert len(ds) == 6 and not ds.skipped
    batch = LlavaCollator(processor)([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    for row, rec in enumerate(records):
        s = sample(row, "val")
        m = meta[rec["id"]]
        assert rec["conversations"][0]["value"] == "<image>\n" + s["question"].question
        assert m["answer"] == rec["conversations"][1]["value"] == s["question"].answer
        assert (m["width"], m["height"]) == ds[row]["image"].size == (s["scene"].width, s["scene"].height)
        obj = s["labels"]["object"]
        assert m["object_patches"] == torch.nonzero(obj > 0).flatten().tolist()
        assert set(m["target_patches"]) <= set(m["object_patches"])
        assert bool(m["target_patches"]) == bool(m["targets"])
        labels = batch["labels"][row]
        words = processor.tokenizer.decode(labels[labels != IGNORE_INDEX]).split()
        assert words[0] == s["question"].answer and words[1:] in ([], ["</s>"])
