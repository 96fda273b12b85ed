"""The learned head: selector properties, differentiable top-k, checkpoint round-trips and mismatch errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from itertools import combinations, permutations

import pytest
import torch
from test_selectors import check_keep, random_tokens

from modules.head import CONFIG_NAME, PrunerFormatWarning, PrunerHead
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.selectors import get_selector
from modules.vlm import get_adapter
from modules.vlm.base import EncodedImages


def small_head(in_dim=16, **kw) -> PrunerHead:
    torch.manual_seed(0)
    return PrunerHead(in_dim=in_dim, d_model=32, depth=1, heads=2, **kw).eval()


@pytest.mark.parametrize("grid, batch", [((6, 6), 3), ((3, 7), 2), ((24, 24), 2)])
@pytest.mark.parametrize("n", [1, 5, 0.25])
def test_head_is_a_proper_selector(grid, batch, n):
    tokens = random_tokens(batch=batch, grid=grid)
    head = small_head()
    count = n if isinstance(n, int) else int(n * tokens.num_tokens + 0.5)
    keep = head.select(tokens, n)
    check_keep(keep, tokens, count)
    assert torch.equal(keep, head.select(tokens, n))


def test_head_handles_budget_above_valid_count():
    tokens = random_tokens(grid=(4, 4))
    for n in (8, 12, 16):
        check_keep(small_head().select(tokens, n), tokens, n)


def test_head_bf16_and_post_features():
    tokens = random_tokens(dtype=torch.bfloat16)
    check_keep(small_head().select(tokens, 7), tokens, 7)
    check_keep(small_head(in_dim=24, features="post").select(tokens, 7), tokens, 7)


def test_straight_through_forward_is_hard_and_gradient_reaches_logits():
    head = small_head().train()
    tokens = random_tokens()
    head.tau, head.noise_seed = 0.0, 0
    sel = head.train_select(tokens, 6)
    assert torch.equal(sel.keep, head.select(tokens, 6))  # no noise -> the inference selection
    assert torch.allclose(sel.scale, torch.ones_like(sel.scale))
    sel.scale.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.proj_out.parameters())


def test_gumbel_noise_is_seeded():
    from modules.budget import topk_keep

    head = small_head().train()
    tokens = random_tokens()
    head.tau = 5.0
    head.noise_seed = 3
    a = head.train_select(tokens, 6).keep
    assert torch.equal(a, head.train_select(tokens, 6).keep)
    # the hard top-n of logits + tau * standard Gumbel noise drawn from a generator seeded with noise_seed
    uniform = torch.rand(a.shape[0], tokens.num_tokens, generator=torch.Generator().manual_seed(3))
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-9, 1 - 1e-9)))
    expected = topk_keep(head.logits(tokens).detach() + 5.0 * gumbel, 6, tokens.valid).sort(dim=1).values
    assert torch.equal(a.sort(dim=1).values, expected)
    assert not torch.equal(a.sort(dim=1).values, head.select(tokens, 6)), "tau = 5 moves the selection"
    head.noise_seed = 4
    assert not torch.equal(a, head.train_select(tokens, 6).keep)


def test_soft_mask_keeps_all_with_log_probability_bias():
    head = small_head(mode="soft_mask").train()
    tokens = random_tokens()
    sel = head.train_select(tokens, 9)
    assert torch.equal(sel.keep, torch.arange(36).expand(3, -1))
    p = torch.sigmoid(head.logits(tokens))
    assert not bool(tokens.valid.all())
    torch.testing.assert_close(sel.key_bias[tokens.valid], torch.log(p)[tokens.valid])
    assert bool((sel.key_bias[~tokens.valid] == math.log(1e-6)).all()), "padding keys are masked out"
    torch.testing.assert_close(sel.aux_loss, (p.mean(1) - 9 / 36).pow(2).mean())


def test_save_load_gives_identical_selections(tmp_path, sdpa_model, processor, batch):
    adapter = get_adapter(sdpa_model, processor)
    torch.manual_seed(1)
    head = PrunerHead.for_model(adapter, d_model=32, depth=1, heads=2).eval()
    head.save_pretrained(tmp_path / "head")
    loaded = PrunerHead.from_pretrained(tmp_path / "head")
    tokens = adapter.encode(batch["pixel_values"], batch["image_sizes"])
    assert torch.equal(head.select(tokens, 5), loaded.select(tokens, 5))
    for key, value in head.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    # by name in a plan, saved and reloaded
    plan = PruningPlan(stage1={"name": "learned", "path": str(tmp_path / "head")}, n1=6, stage2="fastv", n2=3)
    plan.save(tmp_path / "plan.yaml")
    pruned = PrunedVLM(sdpa_model, PruningPlan.load(tmp_path / "plan.yaml"), processor=processor)
    with torch.no_grad():
        pruned(**batch)
    assert torch.equal(pruned.last_kept["stage1"], head.select(tokens, 6))
    assert get_selector("learned", path=str(tmp_path / "head")).config == head.config


def test_head_for_another_model_fails_clearly(tmp_path, sdpa_model):
    head = small_head(in_dim=1024)
    with pytest.raises(ValueError, match="dim 1024.*dim 32"):
        PrunedVLM(sdpa_model, PruningPlan(stage1=head, n1=4))
    head.config.in_dim, head.config.model_type = 32, "qwen2_5_vl"
    with pytest.raises(ValueError, match="'qwen2_5_vl'.*'llava'"):
        PrunedVLM(sdpa_model, PruningPlan(stage1=head, n1=4))


def test_head_serves_any_number_of_tokens(sdpa_model, batch):
    """The head has no per-position parameters: one trained at N = 576 ranks the N = 16 tokens of another
    resolution (its N is a record, not a constraint); ratio budgets follow the model's N."""
    head = small_head(in_dim=32)
    head.config.model_type, head.config.num_tokens = "llava", 576
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1=head, n1=0.25))
    inputs = {k: v for k, v in batch.items() if k != "image_sizes"}
    with torch.no_grad():
        pruned(**inputs)
        expected = head.logits(pruned.encode(inputs["pixel_values"]).tokens).topk(4, dim=1).indices.sort(dim=1).values
    assert torch.equal(pruned.last_kept["stage1"], expected)


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        PrunerHead.from_pretrained(tmp_path / "nothing")
    small_head().save_pretrained(tmp_path / "h")
    config = json.loads((tmp_path / "h" / CONFIG_NAME).read_text())
    (tmp_path / "h" / CONFIG_NAME).write_text(json.dumps({**config, "d_model": 64, "heads": 4}))
    with pytest.raises(ValueError, match="does not match"):
        PrunerHead.from_pretrained(tmp_path / "h")
    (tmp_path / "h" / CONFIG_NAME).write_text(json.dumps({**config, "colour": 1}))
    with pytest.warns(PrunerFormatWarning, match="unknown keys \\['colour'\\]"):  # a later version's keys
        PrunerHead.from_pretrained(tmp_path / "h")
    with pytest.raises(ValueError, match="mode='hard'"):
        PrunerHead(in_dim=8, mode="hard")
    with pytest.raises(ValueError, match="save_pretrained"):
        PruningPlan(stage1=small_head(), n1=4).save(tmp_path / "p.json")


def question_tokens(adapter, processor, batch, prompts):
    """The batch's images, image i with text-only prompt i of `prompts` attached as PrunedVLM attaches prompts."""
    text = processor(images=None, text=prompts, return_tensors="pt", padding=True)
    tokens = adapter.encode(batch["pixel_values"], batch["image_sizes"])
    embeds = adapter.embed_tokens(text["input_ids"]).detach()
    return replace(tokens, prompt=embeds, prompt_mask=text["attention_mask"].bool())


def test_question_aware_head_reads_the_prompt_not_its_padding(sdpa_model, processor, batch):
    adapter = get_adapter(sdpa_model, processor)
    torch.manual_seed(2)
    head = PrunerHead.for_model(adapter, d_model=32, depth=1, heads=2, question=True).eval()
    questions = ["what color is the cat", "is the dog left of the car", "how many"]
    tokens = question_tokens(adapter, processor, batch, questions)
    check_keep(head.select(tokens, 5), tokens, 5)
    # row 0 keeps its question (padded differently), rows 1 and 2 get another one
    other = question_tokens(adapter, processor, batch, ["what color is the cat", "how many", "is it"])
    torch.testing.assert_close(head.logits(other)[0], head.logits(tokens)[0], atol=1e-5, rtol=1e-5)
    for row in (1, 2):
        assert not torch.allclose(head.logits(other)[row], head.logits(tokens)[row], atol=1e-3), row
    # each row alone (no left padding) scores exactly as in the padded batch
    for row, question in enumerate(questions):
        alone = question_tokens(adapter, processor, {k: v[row:row + 1] for k, v in batch.items()}, [question])
        torch.testing.assert_close(head.logits(alone)[0], head.logits(tokens)[row], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="VisionTokens.prompt is None"):
        head.logits(adapter.encode(batch["pixel_values"], batch["image_sizes"]))


def test_question_aware_head_round_trips_and_serves(tmp_path, sdpa_model, processor, batch):
    adapter = get_adapter(sdpa_model, processor)
    head = PrunerHead.for_model(adapter, d_model=32, depth=1, heads=2, question=True).eval()
    assert head.config.prompt_dim == adapter.feature_dims["post"]
    head.save_pretrained(tmp_path / "q")
    loaded = PrunerHead.from_pretrained(tmp_path / "q")
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1=loaded, n1=5), processor=processor)
    with torch.no_grad():
        pruned(**batch)
    tokens = PrunedVLM(sdpa_model, PruningPlan(), processor=processor).attach_prompt(
        EncodedImages.uniform(adapter.encode(batch["pixel_values"], batch["image_sizes"]),
                              adapter.image_token_id), batch["input_ids"], batch["attention_mask"]).tokens
    assert torch.equal(pruned.last_kept["stage1"], head.select(tokens, 5))
    loaded.config.prompt_dim = 7
    with pytest.raises(ValueError, match="prompt embeddings of dim 7"):
        PrunedVLM(sdpa_model, PruningPlan(stage1=loaded, n1=4))
    with pytest.raises(ValueError, match="question=True needs prompt_dim"):
        PrunerHead(in_dim=8, question=True)


def test_plackett_luce_log_prob_is_a_distribution_over_ordered_draws():
    from modules.head import plackett_luce_log_prob

    scores = torch.tensor([[0.3, -1.0, 2.0, 0.5, 0.0]])
    for n in (1, 2, 3):
        orders = torch.tensor(list(permutations(range(5), n)))
        total = plackett_luce_log_prob(scores.expand(len(orders), -1), orders).exp().sum()
        torch.testing.assert_close(total, torch.tensor(1.0))
    # the first pick of a forced padding token adds nothing; a valid pick among valid tokens is a softmax over them
    valid = torch.tensor([[True, False, True, False, True]])
    lp = plackett_luce_log_prob(scores, torch.tensor([[2, 0, 4, 1]]), valid)
    probs = scores[0, [0, 2, 4]].softmax(0)
    expected = probs[1].log() + (probs[0] / (1 - probs[1])).log() + 0.0
    torch.testing.assert_close(lp, expected.reshape(1))


def repeated(tokens, times: int):
    """`times` copies of a one-image VisionTokens (one Gumbel draw then gives `times` independent samples)."""
    fields = ("feats", "pre", "cls_attn", "valid")
    return replace(tokens, **{k: getattr(tokens, k).expand(times, *getattr(tokens, k).shape[1:]) for k in fields})


def test_policy_samples_follow_their_log_prob():
    from modules.head import plackett_luce_log_prob

    head = small_head(mode="policy").train()
    tokens = random_tokens(batch=1, grid=(2, 3), padding=False)
    logits = head.logits(tokens).detach()
    head.tau, head.noise_seed = 1.0, 0
    sel = head.train_select(repeated(tokens, 8000), 2)
    for pair in combinations(range(6), 2):
        orders = torch.tensor([pair, pair[::-1]])  # an unordered pair is drawn in either order
        exact = plackett_luce_log_prob(logits.expand(2, -1), orders).exp().sum()
        freq = (sel.keep == torch.tensor(pair)).all(dim=1).float().mean()
        assert abs(float(freq) - float(exact)) < 0.02, (pair, float(freq), float(exact))
    sel.log_prob.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.proj_out.parameters())


def test_policy_samples_keep_the_budget_and_no_padding_while_valid_remain():
    head = small_head(mode="policy").train()
    head.tau, head.noise_seed = 3.0, 1
    tokens = random_tokens(grid=(4, 4))
    for n in (3, 12, 16):  # 12 of 16 exceeds the 8 valid tokens of the first image
        sel = head.train_select(tokens, n)
        check_keep(sel.keep, tokens, n)
        assert torch.isfinite(sel.log_prob).all()
