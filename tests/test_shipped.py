"""The shipped ToyWorld checkpoints load through the public paths and do what their cards say."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from data import toyworld as tw
from modules.budget import resolve_budget, topk_keep
from modules.head import PrunerHead
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.serve import load_pruned, trained_plan

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "checkpoints" / "toyworld-teacher"
PRUNER = REPO / "checkpoints" / "toyworld-pruner"


@pytest.fixture(scope="module")
def teacher():
    model = LlavaForConditionalGeneration.from_pretrained(TEACHER).eval()
    processor = AutoProcessor.from_pretrained(TEACHER)
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def test_batch(teacher):
    _, processor = teacher
    samples = [tw.sample(i, "test") for i in range(96)]
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["question"].question}]}],
        add_generation_prompt=True) for s in samples]
    images = [s["image"] for s in samples]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs["image_sizes"] = torch.tensor([[im.height, im.width] for im in images])
    answers = torch.tensor([processor.tokenizer.convert_tokens_to_ids(s["question"].answer) for s in samples])
    return inputs, answers


def correct(pruned, inputs, answers) -> torch.Tensor:
    with torch.no_grad():
        logits = pruned(**inputs, logits_to_keep=1).logits[:, -1]
    return logits.argmax(-1) == answers


def accuracy(pruned, inputs, answers) -> float:
    return float(correct(pruned, inputs, answers).float().mean())


def test_teacher_answers_well_above_the_majority_baseline(teacher, test_batch):
    model, _ = teacher
    full = accuracy(PrunedVLM(model, PruningPlan()), *test_batch)
    majority = sum(tw.majority_baselines(n=400).values()) / len(tw.QUESTION_TYPES)
    assert full >= majority + 0.3, (full, majority)


def test_teacher_meets_the_card_target_on_every_question_type(teacher, test_batch):
    """Each type at least halfway from its majority baseline to 100% (the card's target), left_of included."""
    model, _ = teacher
    right = correct(PrunedVLM(model, PruningPlan()), *test_batch)
    qtypes = [tw.sample(i, "test")["question"].qtype for i in range(len(right))]
    majority = tw.majority_baselines(n=400)
    for qtype in tw.QUESTION_TYPES:
        mask = torch.tensor([t == qtype for t in qtypes])
        assert mask.sum() >= 10, qtype
        type_accuracy = float(right[mask].float().mean())
        assert type_accuracy >= (1 + majority[qtype]) / 2, (qtype, type_accuracy, majority[qtype])


def test_shipped_pruner_loads_and_beats_random_at_its_budget(teacher, test_batch):
    model, processor = teacher
    head = PrunerHead.from_pretrained(PRUNER)
    assert head.config.model_type == "llava" and head.config.num_tokens == tw.GRID**2
    assert head.config.question, "the shipped pruner is question-aware"
    pruned = load_pruned(model, PRUNER, processor=processor)
    learned = accuracy(pruned, *test_batch)
    plan = trained_plan(head)

    # stage 1 kept the top n1 of the saved head's logits, the head reading the image's tokens and its prompt's
    # text embeddings (built here by hand, not by PrunedVLM)
    inputs = test_batch[0]
    image_id = model.config.image_token_id
    with torch.no_grad():
        tokens = pruned.encode(inputs["pixel_values"], inputs["image_sizes"]).tokens
        tokens = replace(tokens, prompt=model.get_input_embeddings()(inputs["input_ids"]),
                         prompt_mask=inputs["attention_mask"].bool() & (inputs["input_ids"] != image_id))
        logits = head.logits(tokens)
    n1 = resolve_budget(head.config.n1, tw.GRID**2)  # the budget the config names
    assert torch.equal(pruned.last_kept["stage1"], topk_keep(logits, n1, tokens.valid))
    # the question matters: the same images asked each other's questions keep other tokens
    with torch.no_grad():
        swapped = head.logits(replace(tokens, prompt=tokens.prompt.roll(1, 0),
                                      prompt_mask=tokens.prompt_mask.roll(1, 0)))
    changed = (topk_keep(swapped, n1, tokens.valid) != pruned.last_kept["stage1"]).any(dim=1)
    assert int(changed.sum()) >= len(changed) // 10, int(changed.sum())  # 34 of 96 for the shipped head

    random = accuracy(PrunedVLM(model, PruningPlan(stage1="random", n1=plan.n1, stage2=plan.stage2, n2=plan.n2,
                                                   layer=plan.layer), processor=processor), *test_batch)
    assert learned > random + 0.1, (learned, random)
