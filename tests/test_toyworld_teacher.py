"""The staged ToyWorld teacher: what each stage trains, its data stream, and the hand-over between stages."""

from __future__ import annotations

import pytest
import torch

from data import toyworld as tw
from data.toyworld_stream import ToyWorldCollator, ToyWorldStream, center_patch, center_patches
from data.toyworld_teacher import SYMBOLIC_FILE, ToyWorldTeacher

SMALL = {"vision_hidden": 32, "vision_layers": 2, "text_hidden": 32, "text_layers": 2, "heads": 2}


@pytest.fixture(scope="module")
def stream_batch():
    stream = ToyWorldStream("train", 8)
    return ToyWorldCollator(tw.toyworld_processor())([stream[i] for i in range(4)])


def test_stream_batch_contract(stream_batch):
    """Row i of a stream batch is `toyworld.sample(i, "train")`: its dense labels, its image, its question,
    and labels on exactly its answer."""
    n = tw.GRID**2
    processor = tw.toyworld_processor()
    tokenizer = processor.tokenizer
    image_tokens = stream_batch["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")
    assert image_tokens.sum(1).tolist() == [n] * 4
    names = {"patch_color": "color", "patch_shape": "shape", "patch_row": "row", "patch_col": "col",
             "patch_quadrant": "quadrant"}
    for i in range(4):
        sample = tw.sample(i, "train")
        for key, label in names.items():
            assert torch.equal(stream_batch[key][i], sample["labels"][label]), (i, key)
        assert torch.equal(stream_batch["patch_center"][i], center_patches(sample["scene"]))
        assert int(stream_batch["qtype"][i]) == tw.QUESTION_TYPES.index(sample["question"].qtype)
        pixels = processor.image_processor(images=[sample["image"]], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(stream_batch["pixel_values"][i], pixels)
        real = stream_batch["attention_mask"][i].bool()
        text = tokenizer.decode(stream_batch["input_ids"][i][real & ~image_tokens[i]])
        assert sample["question"].question in text
        labels = stream_batch["labels"][i]
        answer = tokenizer.decode(labels[labels != -100]).split()
        assert answer[0] == sample["question"].answer and answer[1:] in ([], ["</s>"])


def test_center_patches_mark_one_patch_per_object():
    for i in range(20):
        sample = tw.sample(i, "val")
        scene = sample["scene"]
        flags = center_patches(scene)
        ids = tw.id_map(scene)  # the padded frame, pixel by pixel
        top, left = tw.pad_offsets(scene.width, scene.height)
        expected = torch.zeros(tw.GRID**2, dtype=torch.long)
        for obj in scene.objects:
            y, x = int(obj.cy) + top, int(obj.cx) + left  # the pixel under the object's centre
            assert ids[y, x] == obj.id + 1, "the centre pixel shows the object"
            expected[(y // tw.PATCH) * tw.GRID + x // tw.PATCH] += 1
        # exactly one flagged patch per object (two centres never share a patch), where its centre pixel lies
        assert int(expected.max()) == 1 and torch.equal(flags, expected)
        assert int(flags.sum()) == len(scene.objects)


def test_refs_name_their_targets():
    for i in range(200):
        sample = tw.sample(i, "train")
        q, scene = sample["question"], sample["scene"]
        words = q.question.split(" ")
        assert len(q.refs) == (len(q.targets) if q.qtype in ("color_of_shape", "shape_of_color", "left_of") else 0)
        for word, target in zip(q.refs, q.targets):
            obj = scene.objects[target]
            # the phrase ending at the ref word is "<color> <shape>", "<shape>" or "<color> object"
            assert words[word] in (obj.shape, "object")
            assert obj.color == words[word - 1] or words[word - 1] == "the"


def test_batch_grounds_each_named_object():
    stream = ToyWorldStream("val", 64)
    items = [stream[i] for i in range(64)]
    batch = ToyWorldCollator(tw.toyworld_processor())(items)
    tokenizer = tw.toyworld_tokenizer()
    named = 0
    for b in range(len(items)):
        sample = tw.sample(b, "val")
        q = sample["question"]
        for r, (word, target) in enumerate(zip(q.refs, q.targets)):
            pos = int(batch["ground_pos"][b, r])
            assert tokenizer.convert_ids_to_tokens(int(batch["input_ids"][b, pos])) == q.question.split(" ")[word]
            row, col = center_patch(sample["scene"], sample["scene"].objects[target])
            assert (int(batch["ground_row"][b, r]), int(batch["ground_col"][b, r])) == (row, col)
            assert int(sample["labels"]["object"][row * tw.GRID + col]) == target + 1, "the patch shows the object"
            named += 1
        assert bool((batch["ground_pos"][b, len(q.refs):] == -1).all())
    assert named > 20


@pytest.mark.parametrize("stage", ["symbolic", "qa"])
def test_grounding_loss_trains_probe_and_lm(stage, stream_batch, tmp_path):
    ToyWorldTeacher(stage="vision", **SMALL).save_stage(tmp_path)
    plain = ToyWorldTeacher(stage=stage, init_from=str(tmp_path))
    grounded = ToyWorldTeacher(stage=stage, init_from=str(tmp_path), ground_weight=0.5, ground_layer=1)
    grounded.load_state_dict(plain.state_dict())
    base, _ = plain.step_loss(stream_batch)
    loss, stats = grounded.step_loss(stream_batch)
    hidden = grounded.qa_forward(stream_batch, hidden=True).hidden_states[1]
    # independent reference, one named object at a time: the probe at the naming word's hidden state
    named = [(b, r) for b in range(4) for r in range(2) if int(stream_batch["ground_pos"][b, r]) >= 0]
    assert len(named) == 2
    terms, right = [], []
    for b, r in named:
        state = hidden[b, int(stream_batch["ground_pos"][b, r])].float()
        row, col = int(stream_batch["ground_row"][b, r]), int(stream_batch["ground_col"][b, r])
        row_logits, col_logits = grounded.probe.row(state), grounded.probe.col(state)
        where = torch.tensor([row, col], dtype=torch.float32) / (tw.GRID - 1)
        terms.append((-row_logits.log_softmax(-1)[row] - col_logits.log_softmax(-1)[col],
                      ((grounded.probe.ordinal(state) - where) ** 2).mean()))
        right.append(int(row_logits.argmax()) == row and int(col_logits.argmax()) == col)
    ground = sum(t[0] for t in terms) / len(terms) + 4.0 * sum(t[1] for t in terms) / len(terms)
    torch.testing.assert_close(loss, base + 0.5 * ground)
    assert float(stats["ground_acc"]) == sum(right) / len(right)
    # a probe that names one patch for every word is right exactly for the objects centred there (row AND
    # column)
    targets = [(int(stream_batch["ground_row"][b, r]), int(stream_batch["ground_col"][b, r]))
               for b, r in named]
    assert targets == [(5, 5), (1, 5)]
    pointing = ToyWorldTeacher(stage=stage, init_from=str(tmp_path), ground_weight=0.5, ground_layer=1)
    pointing.load_state_dict(plain.state_dict())
    for patch, accuracy in (((5, 5), 0.5), ((5, 1), 0.0), ((1, 5), 0.5)):
        with torch.no_grad():
            for head, index in zip((pointing.probe.row, pointing.probe.col), patch):
                head.weight.mul_(1e-4)
                head.bias.copy_(10.0 * torch.nn.functional.one_hot(torch.tensor(index), tw.GRID))
            assert float(pointing.step_loss(stream_batch)[1]["ground_acc"]) == accuracy, patch
    ground.backward()
    touched = {n for n, p in grounded.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"probe.row.weight", "probe.col.weight", "probe.ordinal.weight"} <= touched
    assert any(n.startswith("vlm.model.language_model.layers.0.") for n in touched)
    assert not any(n.startswith("vlm.model.language_model.layers.1.") for n in touched), "reads layer 1's output"
    with pytest.raises(ValueError, match="ground_layer=5"):
        ToyWorldTeacher(stage=stage, init_from=str(tmp_path), ground_layer=5)


@pytest.mark.parametrize("stage, trains, frozen", [
    ("vision", ["vlm.model.vision_tower", "heads"], ["vlm.model.language_model", "vlm.model.multi_modal_projector"]),
    ("symbolic", ["vlm.model.language_model", "vlm.lm_head", "symbolic"], ["vlm.model.vision_tower"]),
    ("align", ["vlm.model.multi_modal_projector"], ["vlm.model.vision_tower", "vlm.model.language_model", "symbolic"]),
    ("qa", ["vlm.model.multi_modal_projector", "vlm.model.language_model"], ["vlm.model.vision_tower", "symbolic"]),
])
def test_each_stage_trains_only_its_part(stage, trains, frozen, stream_batch, tmp_path):
    first = ToyWorldTeacher(stage="vision", **SMALL)
    if stage != "vision":
        first.save_stage(tmp_path)
        module = ToyWorldTeacher(stage=stage, init_from=str(tmp_path))
    else:
        module = first
    loss, _ = module.step_loss(stream_batch)
    loss.backward()
    touched = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(any(n.startswith(t) for n in touched) for t in trains)
    assert not any(n.startswith(f) for n in touched for f in frozen)


def test_stage_hand_over_round_trips(stream_batch, tmp_path):
    module = ToyWorldTeacher(stage="vision", **SMALL)
    with torch.no_grad():
        module.symbolic.color.weight.add_(1.0)
        module.probe.col.bias.add_(1.0)
    module.save_stage(tmp_path)
    assert (tmp_path / SYMBOLIC_FILE).is_file() and (tmp_path / "config.json").is_file()
    loaded = ToyWorldTeacher(stage="qa", init_from=str(tmp_path))
    assert torch.equal(loaded.symbolic.color.weight, module.symbolic.color.weight)
    assert torch.equal(loaded.probe.col.bias, module.probe.col.bias)
    # an earlier stage's file without the probe's newer parts loads; a file with unknown parts does not
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / SYMBOLIC_FILE))
    save_file({k: v for k, v in state.items() if not k.startswith("probe.ordinal.")}, str(tmp_path / SYMBOLIC_FILE))
    ToyWorldTeacher(stage="qa", init_from=str(tmp_path))
    save_file({**state, "probe.extra.weight": torch.zeros(1)}, str(tmp_path / SYMBOLIC_FILE))
    with pytest.raises(ValueError, match="unexpected probe weights"):
        ToyWorldTeacher(stage="qa", init_from=str(tmp_path))
    module.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.qa_logits(stream_batch), module.vlm(
            input_ids=stream_batch["input_ids"], pixel_values=stream_batch["pixel_values"],
            attention_mask=stream_batch["attention_mask"]).logits)


def test_bad_stage_arguments():
    with pytest.raises(ValueError, match="stage='pretrain'"):
        ToyWorldTeacher(stage="pretrain")
    with pytest.raises(ValueError, match="init_from"):
        ToyWorldTeacher(stage="qa")


def test_qtype_weights_curriculum():
    from collections import Counter

    from data.toyworld_stream import ToyWorldStreamModule

    weights = {"left_of": 3.0, "count_of_color": 1.0}
    counts = Counter(tw.sample(i, "train", weights)["question"].qtype for i in range(200))
    assert set(counts) == {"left_of", "count_of_color"} and counts["left_of"] > 2 * counts["count_of_color"]
    # without weights the stream is the plain split, sample for sample
    plain = ToyWorldStream("train", 10)[7]["messages"]
    assert plain[0]["content"][-1]["text"] == tw.sample(7, "train")["question"].question
    for bad in ({"left_off": 1.0}, {"left_of": -1.0}, {"left_of": 0.0}):
        with pytest.raises(ValueError, match="qtype_weights"):
            ToyWorldStreamModule(qtype_weights=bad)


def test_relation_loss_reads_both_columns_at_the_answer_position(stream_batch, tmp_path):
    stream = ToyWorldStream("train", 8, {name: 50.0 if name == "left_of" else 1.0 for name in tw.QUESTION_TYPES})
    batch = ToyWorldCollator(tw.toyworld_processor())([stream[i] for i in range(6)])
    paired = (batch["ground_pos"] >= 0).all(dim=1)
    assert paired.any() and (~paired).any()
    ToyWorldTeacher(stage="vision", **SMALL).save_stage(tmp_path)
    plain = ToyWorldTeacher(stage="symbolic", init_from=str(tmp_path))
    related = ToyWorldTeacher(stage="symbolic", init_from=str(tmp_path), relation_weight=2.0, relation_layer=1)
    related.load_state_dict(plain.state_dict())
    base, _ = plain.step_loss(batch)
    loss, stats = related.step_loss(batch)
    hidden = related.qa_forward(batch, hidden=True).hidden_states[1]
    # independent reference: the hidden state just before each left_of question's first answer token
    answer_at = torch.tensor([int(torch.nonzero(row != -100)[0]) - 1 for row in batch["labels"]])
    states = hidden[torch.arange(len(answer_at)), answer_at][paired]
    target = batch["ground_col"][paired].float() / (tw.GRID - 1)
    expected = 4.0 * torch.nn.functional.mse_loss(related.probe.pair(states), target)
    torch.testing.assert_close(loss, base + 2.0 * expected)
    # accuracy: does the sign of the two predicted columns match the sign of the true ones (objects apart)
    pred, cols = related.probe.pair(states), batch["ground_col"][paired]
    right = [bool((p[0] < p[1]) == (c[0] < c[1])) for p, c in zip(pred, cols) if c[0] != c[1]]
    assert float(stats["relation_acc"]) == pytest.approx(sum(right) / len(right))
    expected.backward()
    touched = {n for n, p in related.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "probe.pair.weight" in touched
    assert any(n.startswith("vlm.model.language_model.layers.0.") for n in touched)
    assert not any(n.startswith("vlm.model.language_model.layers.1.") for n in touched), "reads layer 1's output"
    no_pairs = {**batch, "ground_pos": batch["ground_pos"].masked_fill(paired.unsqueeze(1), -1)}
    zero, _ = related.relation_loss(hidden, batch["labels"][:, 1:], no_pairs)
    assert float(zero.detach()) == 0.0
    # a probe that always says "the first object is left of the second" is right for 2 of the 5 pairs
    with torch.no_grad():
        related.probe.pair.weight.mul_(1e-4)
        related.probe.pair.bias.copy_(torch.tensor([0.0, 1.0]))
        assert cols.tolist() == [[2, 6], [5, 1], [4, 3], [6, 2], [3, 4]]
        assert float(related.step_loss(batch)[1]["relation_acc"]) == pytest.approx(2 / 5)
        # two objects in one patch column have no order to get right: that pair is left out, 2 of 4
        same_column = batch["ground_col"].clone()
        same_column[paired.nonzero()[2]] = 4  # the (4, 3) pair becomes (4, 4)
        _, acc = related.relation_loss(hidden, batch["labels"][:, 1:], {**batch, "ground_col": same_column})
        assert float(acc) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="relation_layer=0"):
        ToyWorldTeacher(stage="symbolic", init_from=str(tmp_path), relation_layer=0)
