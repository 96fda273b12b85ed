"""The staged ToyWorld teacher: what each stage trains, its data stream, and the hand-over between stages."""

from __future__ import annotations

import pytest
import torch

from data import toyworld as tw
from data.toyworld_stream import ToyWorldCollator, ToyWorldStream, center_patches
from modules.vlm.toyworld_teacher import SYMBOLIC_FILE, ToyWorldTeacher

SMALL = {"vision_hidden": 32, "vision_layers": 2, "text_hidden": 32, "text_layers": 2, "heads": 2}


@pytest.fixture(scope="module")
def stream_batch():
    stream = ToyWorldStream("train", 8)
    return ToyWorldCollator(tw.toyworld_processor())([stream[i] for i in range(4)])


def test_stream_batch_contract(stream_batch):
    n = tw.GRID**2
    for key in ("patch_color", "patch_shape", "patch_row", "patch_col", "patch_center", "patch_quadrant"):
        assert stream_batch[key].shape == (4, n)
    assert stream_batch["pixel_values"].shape == (4, 3, tw.IMAGE_SIZE, tw.IMAGE_SIZE)
    image_tokens = (stream_batch["input_ids"] == tw.toyworld_processor().tokenizer.convert_tokens_to_ids("<image>"))
    assert image_tokens.sum(1).tolist() == [n] * 4
    assert ((stream_batch["labels"] != -100).sum(1) >= 1).all()


def test_center_patches_mark_one_patch_per_object():
    for i in range(20):
        sample = tw.sample(i, "val")
        flags = center_patches(sample["scene"])
        assert int(flags.sum()) <= len(sample["scene"].objects)
        objects = sample["labels"]["object"][flags == 1]
        assert bool((objects > 0).all()), "a centre patch lies on an object"


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
    module.save_stage(tmp_path)
    assert (tmp_path / SYMBOLIC_FILE).is_file() and (tmp_path / "config.json").is_file()
    loaded = ToyWorldTeacher(stage="qa", init_from=str(tmp_path))
    assert torch.equal(loaded.symbolic.color.weight, module.symbolic.color.weight)
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
