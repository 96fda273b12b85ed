"""Generic properties of every selector and scorer, debiasing, calibration and plan persistence."""

from __future__ import annotations

import math

import pytest
import torch

from modules.calibrate import calibrate
from modules.debias import Debiased, debias_scores, fit_exponential_trend, pad_to_square_valid_mask
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.scorers import DEFAULT_SCORERS, SCORERS, get_scorer
from modules.selectors import DEFAULT_SELECTORS, SELECTORS, get_selector
from modules.vlm import VisionTokens


def selector_id(s) -> str:
    return s.name


def random_tokens(batch=3, grid=(6, 6), dim=24, pre_dim=16, dtype=torch.float32, padding=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    n = h * w
    valid = torch.ones(batch, n, dtype=torch.bool)
    if padding:  # first image: top and bottom rows are padding; second: left column
        valid[0].view(h, w)[[0, -1]] = False
        if batch > 1:
            valid[1].view(h, w)[:, 0] = False
    return VisionTokens(
        feats=torch.randn(batch, n, dim, generator=gen).to(dtype),
        pre=torch.randn(batch, n, pre_dim, generator=gen).to(dtype),
        cls_attn=torch.softmax(torch.randn(batch, n, generator=gen) * 2, dim=-1).to(dtype),
        valid=valid,
        grid=grid,
    )


def check_keep(keep: torch.Tensor, tokens: VisionTokens, n: int) -> None:
    assert keep.dtype == torch.long and keep.shape == (tokens.batch_size, n)
    assert bool((keep >= 0).all()) and bool((keep < tokens.num_tokens).all())
    assert bool((keep[:, 1:] > keep[:, :-1]).all()), "sorted ascending, no duplicates"
    valid = tokens.valid_or_all()
    for b in range(tokens.batch_size):
        kept_valid = int(valid[b, keep[b]].sum())
        assert kept_valid == min(n, int(valid[b].sum())), "padding kept while valid tokens remain"


def test_default_selectors_cover_the_registry():
    trainable = [n for n in SELECTORS.names() if getattr(SELECTORS.get(n), "needs_weights", False)]
    assert trainable == ["learned"]
    assert sorted([s.name for s in DEFAULT_SELECTORS] + trainable) == SELECTORS.names()
    assert sorted(s.name for s in DEFAULT_SCORERS) == SCORERS.names()
    for name in ["random", "pool", "fastervlm", "vispruner", "divprune", "agilepruner", "finepruner", "debiased"]:
        assert name in SELECTORS
    for name in ["fastv", "finepruner", "debiased"]:
        assert name in SCORERS


@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=selector_id)
@pytest.mark.parametrize("grid, batch", [((6, 6), 3), ((4, 4), 1), ((3, 7), 2), ((24, 24), 2)])
@pytest.mark.parametrize("n", [1, 5, 0.25])
def test_selector_budget_range_order_padding(selector, grid, batch, n):
    tokens = random_tokens(batch=batch, grid=grid)
    keep = selector.select(tokens, n)
    count = n if isinstance(n, int) else math.floor(n * tokens.num_tokens + 0.5)
    check_keep(keep, tokens, count)


@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=selector_id)
def test_selector_deterministic_and_bf16(selector):
    tokens = random_tokens()
    first = selector.select(tokens, 7)
    assert torch.equal(first, selector.select(random_tokens(), 7))
    bf16 = random_tokens(dtype=torch.bfloat16)
    check_keep(selector.select(bf16, 7), bf16, 7)


@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=selector_id)
def test_selector_budget_at_or_above_valid_count(selector):
    tokens = random_tokens(grid=(4, 4))  # image 0: 8 valid, image 1: 12 valid, image 2: 16 valid
    for n in (8, 12, 15, 16):
        check_keep(selector.select(tokens, n), tokens, n)
    everything = selector.select(tokens, 16)
    assert torch.equal(everything, torch.arange(16).expand(3, -1))


@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=selector_id)
def test_selector_without_padding_mask(selector):
    tokens = random_tokens(padding=False)
    tokens.valid = None
    check_keep(selector.select(tokens, 9), tokens, 9)


@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=selector_id)
@pytest.mark.parametrize("n", [0, -1, 37, 1.5])
def test_selector_bad_budget(selector, n):
    with pytest.raises(ValueError, match=f"n={n}"):
        selector.select(random_tokens(), n)


# ---- inside a plan, end to end on the tiny LLaVA ---------------------------------------------------------------

@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=selector_id)
def test_selector_in_plan_end_to_end(selector, sdpa_model, batch):
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1=selector, n1=6, stage2="fastv", n2=3, layer=2))
    with torch.no_grad():
        out = pruned(**batch)
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - (16 - 3)
    ids = pruned.generate(**batch, max_new_tokens=3, do_sample=False)
    assert ids.shape == (3, batch["input_ids"].shape[1] + 3)
    tokens = pruned.adapter.encode(batch["pixel_values"], batch["image_sizes"])
    check_keep(pruned.last_kept["stage1"], tokens, 6)


@pytest.mark.parametrize("scorer", DEFAULT_SCORERS, ids=selector_id)
@pytest.mark.parametrize("query", ["last", "text"])
def test_scorer_in_plan_end_to_end(scorer, query, sdpa_model, batch):
    if hasattr(scorer, "query"):
        scorer = type(scorer)(query=query)
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=10, stage2=scorer, n2=4, layer=2))
    with torch.no_grad():
        pruned(**batch)
    kept1, kept2 = pruned.last_kept["stage1"], pruned.last_kept["stage2"]
    assert kept2.shape == (3, 4)
    assert bool((kept2[:, 1:] > kept2[:, :-1]).all())
    for b in range(3):
        assert set(kept2[b].tolist()) <= set(kept1[b].tolist())
    ids = pruned.generate(**batch, max_new_tokens=3, do_sample=False)
    assert ids.shape[1] == batch["input_ids"].shape[1] + 3


# ---- debiasing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width, height, expected", [(640, 480, 432), (1024, 512, 288), (480, 640, 432),
                                                     (336, 336, 576)])
def test_pad_to_square_valid_counts(width, height, expected):
    mask = pad_to_square_valid_mask(width, height, grid=24, image_size=336, threshold=0.5)
    assert mask.shape == (576,) and int(mask.sum()) == expected


def test_pad_to_square_rows_for_landscape():
    grid = pad_to_square_valid_mask(640, 480).view(24, 24)
    assert not grid[:3].any() and not grid[21:].any() and grid[3:21].all()
    assert pad_to_square_valid_mask(480, 640).view(24, 24)[:, 3:21].all()


def test_positional_debiasing_recovers_planted_trend():
    n, b_true = 576, 0.003
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(n, generator=gen) + 0.5
    # every position sees every content value once over the batch: the per-position mean is flat
    content = torch.stack([base.roll(s) for s in range(n)])
    scores = content * torch.exp(b_true * torch.arange(n))
    b = fit_exponential_trend(scores)
    assert abs(b - b_true) / b_true < 0.05
    debiased = debias_scores(scores, torch.arange(n).expand(n, -1), None, b)
    assert torch.equal(debiased[:8].argsort(dim=-1, descending=True), content[:8].argsort(dim=-1, descending=True))
    assert not torch.equal(scores[0].argsort(descending=True), content[0].argsort(descending=True))


def test_fit_exponential_trend_ignores_invalid_positions():
    i = torch.arange(100)
    scores = 2.0 * torch.exp(0.01 * i)
    valid = torch.ones(100, dtype=torch.bool)
    valid[:10] = False
    scores_with_sink = scores.clone()
    scores_with_sink[:10] = 100.0  # attention sinks on padding
    assert abs(fit_exponential_trend(scores_with_sink, valid) - 0.01) < 1e-6
    with pytest.raises(ValueError, match="only 1 position"):
        fit_exponential_trend(scores, torch.arange(100) == 3)


def test_debiased_padding_suppression_and_wrapping():
    tokens = random_tokens()
    wrapped = Debiased(get_selector("fastervlm"), padding=True, positional=False)
    scores = wrapped.score(tokens)
    assert bool((scores[~tokens.valid] == 0).all())
    torch.testing.assert_close(scores[tokens.valid], tokens.cls_attn[tokens.valid].float())
    assert Debiased(get_scorer("fastv")).name == "debiased"
    with pytest.raises(ValueError, match="fit='weekly'"):
        Debiased(get_selector("fastervlm"), fit="weekly")


def test_calibrated_plan_saves_and_reloads_to_identical_selections(tmp_path, sdpa_model, batch):
    plan = PruningPlan(stage1={"name": "debiased", "inner": {"name": "agilepruner"}}, n1=8,
                       stage2={"name": "debiased", "inner": {"name": "finepruner"}}, n2=4, layer=2)
    batches = [batch, {k: v[:2] for k, v in batch.items()}]
    calibrate(sdpa_model, plan, batches)
    assert plan.selector.b is not None and plan.selector.inner.erank_avg is not None
    assert plan.scorer.b is not None and plan.scorer.inner.prior is not None
    reference = PrunedVLM(sdpa_model, plan)
    with torch.no_grad():
        reference(**batch)
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"plan{suffix}"
        plan.save(path)
        loaded = PruningPlan.load(path)
        assert loaded.to_dict() == plan.to_dict()
        pruned = PrunedVLM(sdpa_model, loaded)
        with torch.no_grad():
            pruned(**batch)
        assert torch.equal(pruned.last_kept["stage1"], reference.last_kept["stage1"])
        assert torch.equal(pruned.last_kept["stage2"], reference.last_kept["stage2"])


def test_plan_file_errors(tmp_path):
    with pytest.raises(ValueError, match="plan.txt"):
        PruningPlan().save(tmp_path / "plan.txt")
    (tmp_path / "bad.yaml").write_text("stage1: random\nn1: 4\nbudget: 3\n")
    with pytest.raises(ValueError, match="budget"):
        PruningPlan.load(tmp_path / "bad.yaml")
