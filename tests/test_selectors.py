"""Generic properties of every selector and scorer, debiasing, calibration and plan persistence."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from modules.budget import topk_keep
from modules.calibrate import calibrate
from modules.debias import debias_scores, fit_exponential_trend
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.scorers import DEFAULT_SCORERS, SCORERS, Stage2Context, get_scorer
from modules.scorers.debiased import Debiased
from modules.selectors import DEFAULT_SELECTORS, SELECTORS, get_selector
from modules.vlm import VisionTokens
from modules.vlm.llava import pad_to_square_valid_mask


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
    # bf16 inputs are computed in float32: the same selection as the float32 copy of the same (rounded) values
    for bf16 in (random_tokens(dtype=torch.bfloat16), dataclasses.replace(
            CONTRACT_TOKENS, feats=CONTRACT_TOKENS.feats.bfloat16(), pre=CONTRACT_TOKENS.pre.bfloat16(),
            cls_attn=CONTRACT_TOKENS.cls_attn.bfloat16())):
        as_fp32 = dataclasses.replace(bf16, feats=bf16.feats.float(), pre=bf16.pre.float(),
                                      cls_attn=bf16.cls_attn.float())
        for n in (3, 7, 12):
            keep = selector.select(bf16, n)
            check_keep(keep, bf16, n)
            assert torch.equal(keep, selector.select(as_fp32, n)), n


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
    all_valid = selector.select(tokens, 9)  # an explicit all-True mask
    tokens.valid = None
    keep = selector.select(tokens, 9)
    check_keep(keep, tokens, 9)
    assert torch.equal(keep, all_valid), "valid=None must mean every token is valid"


# ---- the contract over several images with different padding ---------------------------------------------

def adversarial_padding_tokens(seed: int = 0, grid=(6, 6), dim: int = 24, pre_dim: int = 16) -> VisionTokens:
    """Four images of one batch, each with its own padding: top and bottom rows (24 valid), two left columns
    and the right one (18 valid), scattered holes (23 valid), none (36 valid). Padding is planted to attract
    every method: it has the highest attention, and features far from the valid ones (which cluster around one
    direction), so a top-k, a max-min diversity pick, a duplicate filter or a per-cluster share that looked at
    padding would take it."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    n = h * w
    valid = torch.ones(4, h, w, dtype=torch.bool)
    valid[0, [0, -1]] = False
    valid[1, :, [0, 1, -1]] = False
    valid[2] = ~(torch.rand(h, w, generator=gen) < 0.3)
    valid = valid.view(4, n)
    pad = ~valid.unsqueeze(-1)
    feats = torch.randn(dim, generator=gen) + 0.3 * torch.randn(4, n, dim, generator=gen)
    feats = torch.where(pad, 4 * torch.randn(4, n, dim, generator=gen), feats)
    pre = torch.randn(pre_dim, generator=gen) + 0.3 * torch.randn(4, n, pre_dim, generator=gen)
    pre = torch.where(pad, 4 * torch.randn(4, n, pre_dim, generator=gen), pre)
    attn = torch.rand(4, n, generator=gen)
    attn = torch.where(valid, attn, 1.0 + attn)
    attn = attn / attn.sum(-1, keepdim=True)
    return VisionTokens(feats=feats, pre=pre, cls_attn=attn, valid=valid, grid=grid)


CONTRACT_TOKENS = adversarial_padding_tokens()
CONTRACT_VALID = [24, 18, 23, 36]
# below every image's valid count, equal to one, between two, above all but one, everything
CONTRACT_BUDGETS = [1, 5, 9, 18, 20, 24, 30, 36]


@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=selector_id)
def test_selector_contract_over_images_with_different_padding(selector):
    tokens = CONTRACT_TOKENS
    assert tokens.valid.sum(dim=1).tolist() == CONTRACT_VALID  # the masks really remove tokens
    # padding content that a correct selector never looks at while valid tokens remain: here each padding
    # token copies a valid token of its image (features and attention), which would change any
    # nearest-neighbour, duplicate, cluster or trend computation that let padding in
    gen = torch.Generator().manual_seed(7)
    pad = ~tokens.valid
    source = torch.stack([v.nonzero().flatten()[torch.randint(int(v.sum()), (v.numel(),), generator=gen)]
                          for v in tokens.valid])
    source = torch.where(pad, source, torch.arange(tokens.num_tokens))
    other = dataclasses.replace(
        tokens,
        feats=tokens.feats.gather(1, source.unsqueeze(-1).expand_as(tokens.feats)),
        pre=tokens.pre.gather(1, source.unsqueeze(-1).expand_as(tokens.pre)),
        cls_attn=tokens.cls_attn.gather(1, source),
    )
    for n in CONTRACT_BUDGETS:
        keep = selector.select(tokens, n)
        # exact count, long, in range, sorted ascending, no duplicate, padding only once every valid one is in
        check_keep(keep, tokens, n)
        for b, n_valid in enumerate(CONTRACT_VALID):
            kept_valid = set(keep[b][tokens.valid[b, keep[b]]].tolist())
            if n >= n_valid:
                assert kept_valid == set(tokens.valid[b].nonzero().flatten().tolist()), (n, b)
        # deterministic: a fresh copy with the same parameters (and seed) keeps the same tokens
        assert torch.equal(copy.deepcopy(selector).select(tokens, n), keep)
        # each image's selection is its own: the batch == one run per image
        single = torch.cat([selector.select(tokens.index(slice(b, b + 1)), n) for b in range(4)])
        assert torch.equal(single, keep), n
        # padding tokens' features and scores never matter while the budget fits in the valid tokens
        fits = torch.tensor(CONTRACT_VALID) >= n
        assert torch.equal(selector.select(other, n)[fits], keep[fits]), n


SEEDED = [n for n in SELECTORS.names() if "seed" in getattr(SELECTORS.get(n), "__dataclass_fields__", {})]


@pytest.mark.parametrize("name", SEEDED)
def test_selector_seed_is_used_and_reproducible(name):
    tokens = CONTRACT_TOKENS
    by_seed = {seed: [SELECTORS.build(name, seed=seed).select(tokens, n) for n in (5, 9, 18)]
               for seed in range(4)}
    for seed, keeps in by_seed.items():
        again = [SELECTORS.build(name, seed=seed).select(tokens, n) for n in (5, 9, 18)]
        assert all(torch.equal(a, b) for a, b in zip(keeps, again)), seed
    # another seed gives another selection somewhere: the seed is not ignored
    assert any(not all(torch.equal(a, b) for a, b in zip(by_seed[0], keeps)) for keeps in by_seed.values())


@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=selector_id)
@pytest.mark.parametrize("n", [0, -1, 37, 1.5])
def test_selector_bad_budget(selector, n):
    with pytest.raises(ValueError, match=f"n={n}"):
        selector.select(random_tokens(), n)


# ---- inside a plan, end to end on the tiny LLaVA ---------------------------------------------------------------

def assert_generate_equals_recompute(pruned: PrunedVLM, batch, steps: int = 3) -> None:
    """Cached generation == a cache-free greedy recompute: the whole pruned model rerun on prompt + tokens so
    far (stage 2 scoring from the prompt's last token via `prompt_end`), same selections at every step."""
    out = pruned.generate(**batch, max_new_tokens=steps, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
    kept = {k: v.clone() for k, v in pruned.last_kept.items()}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    prompt_end = torch.full((ids.shape[0],), ids.shape[1] - 1)
    for step in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = pruned(input_ids=ids, pixel_values=batch["pixel_values"], attention_mask=mask,
                            position_ids=positions, image_sizes=batch["image_sizes"], prompt_end=prompt_end,
                            use_cache=False).logits[:, -1]
        for stage, index in kept.items():
            assert torch.equal(pruned.last_kept[stage], index), (stage, step)
        torch.testing.assert_close(logits, out.scores[step], atol=1e-5, rtol=1e-5)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(ids, out.sequences)


@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=selector_id)
def test_selector_in_plan_end_to_end(selector, sdpa_model, processor, batch):
    """Inside a plan, the selector's own choice on the adapter's tokens is what stage 1 keeps (padding
    included: the batch has pad-to-square images), dropping the rest == the unpruned model attending to none
    of them, and cached generation with stage 2 == a cache-free recompute."""
    stage1 = PrunedVLM(sdpa_model, PruningPlan(stage1=selector, n1=6), processor=processor)
    with torch.no_grad():
        logits = stage1(**batch).logits
        tokens = stage1.encode(batch["pixel_values"], batch["image_sizes"]).tokens
    keep = stage1.last_kept["stage1"]
    assert tokens.valid is not None and not bool(tokens.valid.all())
    check_keep(keep, tokens, 6)
    assert torch.equal(keep, copy.deepcopy(selector).select(tokens, 6))

    # reference: the unpruned model, original positions, with the dropped visual tokens masked out
    text = {k: v for k, v in batch.items() if k != "image_sizes"}
    positions = stage1.last_positions
    kept_mask = torch.zeros_like(text["attention_mask"]).scatter(1, positions, 1)
    with torch.no_grad():
        ref = sdpa_model(**{**text, "attention_mask": text["attention_mask"] * kept_mask}).logits
    assert positions.shape[1] == text["input_ids"].shape[1] - (16 - 6)
    real = text["attention_mask"].gather(1, positions).bool()
    expected = ref.gather(1, positions.unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=1e-5)

    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1=selector, n1=6, stage2="fastv", n2=3, layer=2),
                       processor=processor)
    assert_generate_equals_recompute(pruned, batch)
    assert torch.equal(pruned.last_kept["stage1"], keep)


def with_query(scorer, query: str):
    """A fresh copy of a default scorer asking `query` (for a wrapper: its inner scorer)."""
    if hasattr(scorer, "query"):
        return dataclasses.replace(scorer, query=query)
    return dataclasses.replace(scorer, inner=with_query(scorer.inner, query))


@pytest.mark.parametrize("scorer", DEFAULT_SCORERS, ids=selector_id)
@pytest.mark.parametrize("query", ["last", "text"])
def test_scorer_in_plan_end_to_end(scorer, query, sdpa_model, eager_model, processor, batch):
    """Stage 2 keeps the top n2 of the scorer's scores, where the scorer reads the eager model's own attention
    rows of layer K-1 and hidden states (not the plan's q/k recomputation) on the stage-1 sequence; cached
    generation == a cache-free recompute."""
    k, n1, n2 = 2, 10, 4
    scorer = with_query(scorer, query)
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=n1, stage2=scorer, n2=n2, layer=k),
                       processor=processor)
    with torch.no_grad():
        pruned(**batch)
    kept1, kept2, scores = pruned.last_kept["stage1"], pruned.last_kept["stage2"], pruned.last_stage2_scores

    reference = PrunedVLM(eager_model, PruningPlan(stage1="random", n1=n1), processor=processor)
    with torch.no_grad():
        out = reference(**batch, output_attentions=True, output_hidden_states=True)
        tokens = reference.encode(batch["pixel_values"], batch["image_sizes"]).tokens
    assert torch.equal(reference.last_kept["stage1"], kept1)
    attn, hidden = out.attentions[k - 1], out.hidden_states[k - 1]  # layer K-1: its rows, its input
    ids = batch["input_ids"].gather(1, reference.last_positions)
    slots = torch.stack([(row == sdpa_model.config.image_token_id).nonzero()[:, 0] for row in ids])
    valid = tokens.valid_or_all().gather(1, kept1)
    assert not bool(valid.all())  # padding reaches stage 2 here

    def logits_fn(query_index):  # log of the eager probabilities: the same softmax over any key subset
        rows = query_index[:, None, :, None].expand(-1, attn.shape[1], -1, attn.shape[-1])
        return attn.gather(2, rows).log()

    mask = batch["attention_mask"].gather(1, reference.last_positions)
    vision_hidden = hidden.gather(1, slots.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    rows, m = kept1.shape  # one image per row: every column belongs to image 0, of the adapter's grid
    ctx = Stage2Context(logits_fn=logits_fn, attention_mask=mask, vision_slots=slots, vision_index=kept1,
                        vision_valid=valid, vision_hidden=vision_hidden, budget=torch.full((rows, 1), n2),
                        vision_image=torch.zeros(rows, m, dtype=torch.long),
                        vision_grid=torch.tensor(tokens.grid).expand(rows, m, 2))
    expected = with_query(scorer, query).score(ctx)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(kept2, kept1.gather(1, topk_keep(expected, n2, valid)))
    assert_generate_equals_recompute(pruned, batch)


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


def test_calibrated_plan_saves_and_reloads_to_identical_selections(tmp_path, sdpa_model, processor, batch):
    plan = PruningPlan(stage1={"name": "debiased", "inner": {"name": "agilepruner"}}, n1=8,
                       stage2={"name": "debiased", "inner": {"name": "finepruner"}}, n2=4, layer=2)
    batches = [batch, {k: v[:2] for k, v in batch.items()}]
    calibrate(sdpa_model, plan, batches, processor=processor)
    assert plan.scorer.rate is not None and plan.scorer.inner.prior is not None

    # stage 1's calibrated values, recomputed independently over the 5 calibration images: AgilePruner's mean
    # effective rank per sqrt(N) (SVD of each image's centred valid features) and the slope of a least-squares
    # line through log(mean valid [CLS] attention) per relative position i / N
    with torch.no_grad():
        tokens = PrunedVLM(sdpa_model, PruningPlan(), processor=processor).encode(batch["pixel_values"],
                                                                                  batch["image_sizes"]).tokens
    valid = tokens.valid_or_all()
    images = [0, 1, 2, 0, 1]
    eranks = []
    for i in images:
        x = tokens.feats[i][valid[i]].double()
        sigma = torch.linalg.svdvals(x - x.mean(dim=0))
        p = sigma[sigma > 1e-12 * sigma.sum()] / sigma.sum()
        eranks.append(math.exp(float(-(p * p.log()).sum())))
    n_tokens = tokens.num_tokens
    expected_scale = sum(eranks) / len(eranks) / math.sqrt(n_tokens)
    assert plan.selector.inner.erank_scale == pytest.approx(expected_scale, rel=1e-4)
    assert plan.selector.inner.erank_avg is None
    attn, seen = tokens.cls_attn.double()[images], valid[images].double()
    mean = (attn * seen).sum(0) / seen.sum(0)
    u = torch.arange(n_tokens, dtype=torch.float64)[seen.sum(0) > 0] / n_tokens
    y = mean[seen.sum(0) > 0].log()
    slope = float(((u - u.mean()) * (y - y.mean())).sum() / ((u - u.mean()) ** 2).sum())
    assert plan.selector.rate == pytest.approx(slope, rel=1e-4, abs=1e-7) and plan.selector.b is None

    reference = PrunedVLM(sdpa_model, plan, processor=processor)
    with torch.no_grad():
        reference(**batch)
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"plan{suffix}"
        plan.save(path)
        loaded = PruningPlan.load(path)
        assert loaded.to_dict() == plan.to_dict()
        pruned = PrunedVLM(sdpa_model, loaded, processor=processor)
        with torch.no_grad():
            pruned(**batch)
        assert torch.equal(pruned.last_kept["stage1"], reference.last_kept["stage1"])
        assert torch.equal(pruned.last_kept["stage2"], reference.last_kept["stage2"])
    # the stored rate is what drives stage 1 (not a per-sample refit): with rate = -0.3 N (a slope of -0.3 per
    # token) AgilePruner's pass runs on s_i * exp(0.3 i), padding zeroed, computed here by hand
    loaded.selector.rate = -0.3 * n_tokens
    with torch.no_grad():
        pruned(**batch)
    by_hand = tokens.cls_attn.float() * torch.exp(0.3 * torch.arange(tokens.num_tokens)) * valid
    expected = loaded.selector.inner.keep_from_scores(tokens, 8, by_hand).sort(dim=-1).values
    assert torch.equal(pruned.last_kept["stage1"], expected)
    assert not torch.equal(expected, reference.last_kept["stage1"])  # the slope matters on this batch


def test_plan_file_errors(tmp_path):
    with pytest.raises(ValueError, match="plan.txt"):
        PruningPlan().save(tmp_path / "plan.txt")
    (tmp_path / "bad.yaml").write_text("stage1: random\nn1: 4\nbudget: 3\n")
    with pytest.raises(ValueError, match="budget"):
        PruningPlan.load(tmp_path / "bad.yaml")
