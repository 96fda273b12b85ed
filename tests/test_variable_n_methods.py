"""Every stage-1 selector and stage-2 scorer on images of different sizes: each image has its own N_i and (h_i, w_i)
grid (Qwen2.5-VL style), stage-1 calls come one geometry at a time but change between calls, stage-2 rows hold
different numbers of images and end in filler columns; calibrated values fitted at one resolution serve another
and survive a save / load."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

from modules.budget import topk_keep
from modules.config import to_config
from modules.pruned_vlm import PruningPlan
from modules.scorers import DEFAULT_SCORERS, SCORERS, Stage2Context, get_scorer
from modules.scorers.finepruner import area_weights, resample_prior
from modules.selectors import DEFAULT_SELECTORS, SELECTORS, get_selector
from modules.selectors.finepruner import cluster_allocate
from modules.vlm.base import VisionTokens

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (h, w) token grids of the images; None: tokens without a grid, a (1, N) strip of N = 30
SMALL, LARGE, STRIP = (6, 8), (10, 12), None
STRIP_N = 30


def method_id(m) -> str:
    return m.name


def fresh(component):
    """A private copy of a shared default instance (calibration and warnings must not leak between tests)."""
    return copy.deepcopy(component)


def n_of(grid) -> int:
    return STRIP_N if grid is None else grid[0] * grid[1]


def image_tokens(grid, batch: int = 3, seed: int = 0, dim: int = 24, pre_dim: int = 16) -> VisionTokens:
    """A batch of images of one geometry with their own padding: image 0 loses its first and last grid rows (or,
    without a grid, its first and last 3 tokens), image 1 scattered tokens, image 2 none."""
    gen = torch.Generator().manual_seed(seed)
    n = n_of(grid)
    h, w = (1, n) if grid is None else grid
    valid = torch.ones(batch, h, w, dtype=torch.bool)
    if grid is None:
        valid[0, :, [0, 1, 2, -3, -2, -1]] = False
    else:
        valid[0, [0, -1]] = False
    if batch > 1:
        valid[1] = torch.rand(h, w, generator=gen) > 0.25
    return VisionTokens(
        feats=torch.randn(batch, n, dim, generator=gen),
        pre=torch.randn(batch, n, pre_dim, generator=gen),
        cls_attn=torch.softmax(2 * torch.randn(batch, n, generator=gen), dim=-1),
        valid=valid.view(batch, n),
        grid=grid,
    )


def check_keep(keep: torch.Tensor, tokens: VisionTokens, n: int) -> None:
    """Exact count, long, in range, sorted ascending, no duplicate, padding only once every valid token is in."""
    assert keep.dtype == torch.long and keep.shape == (tokens.batch_size, n)
    assert bool((keep >= 0).all()) and bool((keep < tokens.num_tokens).all())
    assert bool((keep[:, 1:] > keep[:, :-1]).all())
    valid = tokens.valid_or_all()
    for b in range(tokens.batch_size):
        assert int(valid[b, keep[b]].sum()) == min(n, int(valid[b].sum())), b


# ---- stage 1: a call per geometry, the geometry changing between calls ---------------------------------------

@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=method_id)
def test_selector_contract_across_calls_of_different_geometry(selector):
    selector = fresh(selector)
    calls = [image_tokens(SMALL, seed=1), image_tokens(LARGE, seed=2), image_tokens(STRIP, seed=3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncalibrated debiasing wrapper says it fits per image
        first = {}
        for tokens in calls:
            for n in (1, 5, 0.25, tokens.num_tokens - 4):
                count = n if isinstance(n, int) else math.floor(n * tokens.num_tokens + 0.5)
                keep = selector.select(tokens, n)
                check_keep(keep, tokens, count)
                first[(tokens.num_tokens, n)] = keep
        # nothing of one geometry stays behind for the next: the same calls again, in the other order, agree
        for tokens in reversed(calls):
            for n in (1, 5, 0.25, tokens.num_tokens - 4):
                assert torch.equal(selector.select(tokens, n), first[(tokens.num_tokens, n)]), (tokens.grid, n)


def test_pool_uses_each_calls_own_grid():
    # the same 120 tokens as a 10 x 12 grid and as a 12 x 10 grid: the lattice follows the grid of the call
    feats = torch.randn(1, 120, 4)
    wide = get_selector("pool").select(VisionTokens(feats=feats, grid=(10, 12)), 4)
    tall = get_selector("pool").select(VisionTokens(feats=feats, grid=(12, 10)), 4)
    rows_cols = [(int(i) // 12, int(i) % 12) for i in wide[0]]
    # 2 x 2 cells of 5 x 6 tokens: centres at rows 2, 7 and columns 2.5, 8.5 (ties to the lower index)
    assert rows_cols == [(2, 2), (2, 8), (7, 2), (7, 8)]
    # 2 x 2 cells of 6 x 5 tokens: rows 2.5, 8.5 and columns 2, 7
    assert [(int(i) // 10, int(i) % 10) for i in tall[0]] == [(2, 2), (2, 7), (8, 2), (8, 7)]


# ---- stage 1: debiasing's trend is a rate over the relative position i / N ------------------------------------

RATE = 3.0  # the planted trend exp(3 u): 20x from the first token of an image to its last, at every resolution


def trended_tokens(grid, seed: int, flat: bool) -> VisionTokens:
    """[CLS] attention = content * exp(RATE * i / N). flat: N images whose content is one vector rolled, so every
    position sees every content value once and the per-position mean is exactly the trend."""
    n = n_of(grid)
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(n, generator=gen) + 0.5
    content = torch.stack([base.roll(s) for s in range(n)]) if flat else torch.rand(4, n, generator=gen) + 0.5
    attn = content * torch.exp(RATE * torch.arange(n) / n)
    return VisionTokens(feats=torch.randn(content.shape[0], n, 8, generator=gen), cls_attn=attn, grid=grid)


def calibrated_debias(*batches: VisionTokens):
    sel = get_selector("debiased", inner="fastervlm")
    sel.start_calibration()
    for tokens in batches:
        sel.observe(tokens)
    sel.finish_calibration()
    return sel


def test_debias_rate_fits_the_same_at_every_resolution():
    small, large, strip = (trended_tokens(g, seed, True) for seed, g in enumerate((SMALL, LARGE, STRIP)))
    fits = {"small": calibrated_debias(small).rate, "large": calibrated_debias(large).rate,
            "strip": calibrated_debias(strip).rate, "mixed": calibrated_debias(small, large, strip).rate}
    # a slope over token indices would be RATE / 48, RATE / 120, RATE / 30: only the relative position agrees
    for name, rate in fits.items():
        assert rate == pytest.approx(RATE, rel=1e-5), name


def test_debias_calibrated_at_one_resolution_ranks_another_like_its_own():
    at_small = calibrated_debias(trended_tokens(SMALL, 0, True))
    at_large = calibrated_debias(trended_tokens(LARGE, 1, True))
    for grid in (LARGE, SMALL, STRIP):
        tokens = trended_tokens(grid, 7, flat=False)
        content = tokens.cls_attn / torch.exp(RATE * torch.arange(tokens.num_tokens) / tokens.num_tokens)
        n = tokens.num_tokens // 4
        truth = topk_keep(content, n)  # the trend removed exactly: the content decides
        assert torch.equal(at_small.select(tokens, n), truth), grid
        assert torch.equal(at_large.select(tokens, n), truth), grid
        assert bool(torch.isfinite(at_small.score(tokens)).all())
    # the test can tell: the small images' slope per token (what older plans stored) over-corrects the large ones
    legacy = get_selector("debiased", inner="fastervlm", b=at_small.rate / 48)
    tokens = trended_tokens(LARGE, 7, flat=False)
    assert torch.equal(legacy.select(trended_tokens(SMALL, 7, False), 12),
                       at_small.select(trended_tokens(SMALL, 7, False), 12))  # same at its own N ...
    assert not torch.equal(legacy.select(tokens, 30), at_small.select(tokens, 30))  # ... not at another


def test_debias_selector_round_trips_and_loads_older_plans(tmp_path):
    sel = calibrated_debias(trended_tokens(SMALL, 0, True), trended_tokens(LARGE, 1, True))
    plan = PruningPlan(stage1=sel, n1=0.25)
    loaded = PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert loaded.to_dict() == plan.to_dict() and loaded.selector.rate == sel.rate
    path = tmp_path / "plan.yaml"
    plan.save(path)
    assert PruningPlan.load(path).to_dict() == plan.to_dict()
    for grid in (SMALL, LARGE, STRIP):
        tokens = image_tokens(grid, seed=5)
        assert torch.equal(loaded.selector.select(tokens, 7), sel.select(tokens, 7))
    # an older plan's per-token slope b still loads and acts per token: b = rate / N at that N
    tokens = image_tokens(SMALL, seed=5)
    old = SELECTORS.build("debiased", inner={"name": "fastervlm"}, b=sel.rate / tokens.num_tokens)
    torch.testing.assert_close(old.score(tokens), sel.score(tokens))
    with pytest.raises(ValueError, match="rate=1.0.*b=0.02"):
        get_selector("debiased", rate=1.0, b=0.02)


def test_debias_per_image_fit_uses_each_images_own_positions():
    # fit="sample": every image fits its own trend over i / N; the planted trend goes whatever N is (that each
    # image of a stage-2 row fits alone is checked in test_scorers_treat_each_image_as_its_own)
    for grid in (SMALL, LARGE, STRIP):
        tokens = trended_tokens(grid, 3, flat=False)
        content = tokens.cls_attn / torch.exp(RATE * torch.arange(tokens.num_tokens) / tokens.num_tokens)
        # content is random, so the per-image fit is not exact; the debiased top quarter shares more tokens with
        # the content's top quarter than the raw one does
        n = tokens.num_tokens // 4
        sel = get_selector("debiased", inner="fastervlm", fit="sample")
        kept, truth, raw = sel.select(tokens, n), topk_keep(content, n), topk_keep(tokens.cls_attn, n)
        overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(kept, truth))
        raw_overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(raw, truth))
        assert overlap > raw_overlap, grid


# ---- stage 1: AgilePruner's complexity reference follows each image's N ---------------------------------------

def grouped_image(n: int, groups: int, seed: int) -> torch.Tensor:
    """(n, groups + 2) features: n / groups copies of each of `groups` one-hot directions, shuffled. Centred, they
    have groups - 1 equal singular values, so erank = groups - 1 exactly."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.zeros(n, groups + 2)
    feats[torch.arange(n), torch.arange(n) % groups] = 1.0
    return feats[torch.randperm(n, generator=gen)]


def agile_test_image(grid, seed: int) -> VisionTokens:
    """Near-duplicate groups whose cosine distances straddle the gate's tau, so the complexity decides."""
    gen = torch.Generator().manual_seed(seed)
    n = n_of(grid)
    centres = torch.randn(5, 10, generator=gen)
    feats = centres[torch.randint(5, (2, n), generator=gen)] + 0.15 * torch.randn(2, n, 10, generator=gen)
    return VisionTokens(feats=feats, cls_attn=torch.rand(2, n, generator=gen), grid=grid)


def calibrated_agile(tokens: VisionTokens):
    sel = get_selector("agilepruner")
    sel.start_calibration()
    sel.observe(tokens)
    sel.finish_calibration()
    return sel


def test_agilepruner_calibrated_at_one_resolution_serves_another():
    # equally complex calibration sets at two resolutions: erank 1 of 8 tokens, erank 3 of 72 (erank / sqrt(N) is
    # the same, 1 / sqrt(8)): both fit the same scale, so they select alike at any resolution. (Groups of 2 and 4
    # keep the centred features exact in float32, so the eranks are exact.)
    at_8 = calibrated_agile(VisionTokens(feats=torch.stack([grouped_image(8, 2, s) for s in range(2)]),
                                         grid=(2, 4)))
    at_72 = calibrated_agile(VisionTokens(feats=torch.stack([grouped_image(72, 4, s) for s in range(2)]),
                                          grid=(8, 9)))
    assert at_8.erank_scale == pytest.approx(1 / math.sqrt(8), rel=1e-5)
    assert at_72.erank_scale == pytest.approx(at_8.erank_scale, rel=1e-5)
    assert at_8.erank_avg is None
    differs = 0
    for grid in (SMALL, LARGE, STRIP):
        tokens = agile_test_image(grid, seed=11)
        for n in (4, 8, 16):
            keep = at_8.select(tokens, n)
            check_keep(keep, tokens, n)
            assert torch.equal(keep, at_72.select(tokens, n)), (grid, n)
            # the mean erank as a fixed reference (the old calibration) would differ between the two sets
            fixed_8 = get_selector("agilepruner", erank_avg=1.0).select(tokens, n)
            fixed_72 = get_selector("agilepruner", erank_avg=3.0).select(tokens, n)
            differs += not torch.equal(fixed_8, fixed_72)
    assert differs > 0  # the test data is sensitive to the reference

    # mixed-resolution calibration batches add up image by image; the value round-trips through a plan
    mixed = get_selector("agilepruner")
    mixed.start_calibration()
    mixed.observe(agile_test_image(SMALL, 1))
    mixed.observe(agile_test_image(STRIP, 2))
    mixed.finish_calibration()
    loaded = PruningPlan.from_dict(json.loads(json.dumps(PruningPlan(stage1=mixed, n1=6).to_dict()))).selector
    assert loaded.erank_scale == mixed.erank_scale
    tokens = agile_test_image(LARGE, 3)
    assert torch.equal(loaded.select(tokens, 9), mixed.select(tokens, 9))


# ---- stage 2: rows with different image counts, grids and filler columns -------------------------------------

HEADS, DIM = 4, 16


def stage2_context(rows: list[list[tuple]], seed: int = 0, logit_fn=None, budgets=None,
                   device: str = "cpu") -> Stage2Context:
    """rows: per row, its images as (grid, kept positions or a count of random ones, padding positions).

    Each row is [left padding][3 text tokens][its images' kept tokens, image after image][4 text tokens]; M is the
    widest row's visual count and narrower rows end in filler columns (slot 0, index 0, grid (0, 0), image -1,
    invalid): slot 0 is a real token (an attention sink) in the longest row and left padding in the others.
    logit_fn(row, image, grid, index, gen) -> (H, k) logits for an image's kept tokens (default: random);
    budgets: (B, images) or None (a third of each image's columns, at least 1). Built on CPU, then moved to device.
    """
    gen = torch.Generator().manual_seed(seed)
    images = max(len(r) for r in rows)
    specs = []
    for r in rows:
        row_specs = []
        for grid, kept, padding in r:
            n = n_of(grid)
            if isinstance(kept, int):
                kept = torch.randperm(n, generator=gen)[:kept].sort().values
            kept = torch.as_tensor(kept)
            row_specs.append((grid, kept, torch.isin(kept, torch.as_tensor(padding, dtype=torch.long))))
        specs.append(row_specs)
    widths = [sum(len(k) for _, k, _ in r) for r in specs]
    m, length = max(widths), max(widths) + 7
    bsz = len(rows)
    mask = torch.zeros(bsz, length, dtype=torch.long)
    slots = torch.zeros(bsz, m, dtype=torch.long)
    index = torch.zeros(bsz, m, dtype=torch.long)
    valid = torch.zeros(bsz, m, dtype=torch.bool)
    image = torch.full((bsz, m), -1, dtype=torch.long)
    grids = torch.zeros(bsz, m, 2, dtype=torch.long)
    logits = torch.randn(bsz, HEADS, length, generator=gen)
    budget = torch.zeros(bsz, images, dtype=torch.long)
    for b, r in enumerate(specs):
        start = length - (widths[b] + 7)
        mask[b, start:] = 1
        col, pos = 0, start + 3
        for i, (grid, kept, pad) in enumerate(r):
            k = len(kept)
            cols = slice(col, col + k)
            slots[b, cols] = torch.arange(pos, pos + k)
            index[b, cols], valid[b, cols], image[b, cols] = kept, ~pad, i
            grids[b, cols] = torch.tensor((1, n_of(grid)) if grid is None else grid)
            if logit_fn is not None:
                logits[b, :, pos:pos + k] = logit_fn(b, i, grid, kept, gen)
            budget[b, i] = max(1, k // 3)
            col, pos = col + k, pos + k
    if budgets is not None:
        budget = torch.as_tensor(budgets, dtype=torch.long)
    hidden = torch.randn(bsz, m, DIM, generator=gen)
    logits = logits.to(device)

    def logits_fn(query_index):
        return logits[:, :, None, :].expand(-1, -1, query_index.shape[1], -1)

    return Stage2Context(logits_fn=logits_fn, attention_mask=mask.to(device), vision_slots=slots.to(device),
                         vision_index=index.to(device), vision_valid=valid.to(device),
                         vision_hidden=hidden.to(device), budget=budget.to(device), vision_image=image.to(device),
                         vision_grid=grids.to(device))


# row 0: two images (6x8 with 12 kept, the 30-token strip with 9 kept); row 1: one 10x12 image with 16 kept, then
# 5 filler columns; row 2: one 6x8 image with 10 kept, 11 fillers. Padding inside the images.
ROWS = [
    [(SMALL, 12, [0, 1, 2, 3, 4, 5, 6, 7]), (STRIP, 9, [0, 1, 2])],
    [(LARGE, 16, list(range(0, 120, 3)))],
    [(SMALL, 10, [40, 41, 42, 43, 44, 45, 46, 47])],
]


def keep_per_image(scores: torch.Tensor, ctx: Stage2Context) -> dict[tuple[int, int], torch.Tensor]:
    """What the engine keeps: the top-budget of each image's own columns, padding last (sorted column indices)."""
    out = {}
    for row, img, columns, n in ctx.image_columns():
        chosen = topk_keep(scores[row, columns].unsqueeze(0), n, ctx.vision_valid[row, columns].unsqueeze(0))[0]
        out[(row, img)] = columns[chosen]
    return out


def check_stage2(scores: torch.Tensor, ctx: Stage2Context) -> dict:
    assert scores.shape == ctx.vision_valid.shape and bool(torch.isfinite(scores).all())
    kept = keep_per_image(scores, ctx)
    assert sorted(kept) == [(r, i) for r in range(ctx.budget.shape[0]) for i in range(ctx.images)
                            if bool((ctx.vision_image[r] == i).any())]
    for (row, img), cols in kept.items():
        n = int(ctx.budget[row, img])
        mine = (ctx.vision_image[row] == img).nonzero().flatten()
        assert len(cols) == n and bool((cols[1:] > cols[:-1]).all())
        assert set(cols.tolist()) <= set(mine.tolist())  # its own columns: never a filler, never another image's
        assert int(ctx.vision_valid[row, cols].sum()) == min(n, int(ctx.vision_valid[row, mine].sum()))
    return kept


def sub_context(ctx: Stage2Context, row: int, img: int) -> Stage2Context:
    """The context of one image alone (its row's sequence and attention, only its columns)."""
    cols = (ctx.vision_image[row] == img).nonzero().flatten()
    one = slice(row, row + 1)
    return Stage2Context(
        logits_fn=lambda q: ctx.logits_fn(q.expand(ctx.vision_slots.shape[0], -1))[one],
        attention_mask=ctx.attention_mask[one], vision_slots=ctx.vision_slots[one][:, cols],
        vision_index=ctx.vision_index[one][:, cols], vision_valid=ctx.vision_valid[one][:, cols],
        vision_hidden=ctx.vision_hidden[one][:, cols], budget=ctx.budget[one][:, img:img + 1],
        vision_image=torch.zeros(1, len(cols), dtype=torch.long), vision_grid=ctx.vision_grid[one][:, cols])


@pytest.mark.parametrize("scorer", DEFAULT_SCORERS, ids=method_id)
@pytest.mark.parametrize("query", ["last", "text"])
def test_scorer_contract_on_rows_of_different_images(scorer, query):
    scorer = fresh(scorer)
    inner = scorer.inner if hasattr(scorer, "inner") else scorer
    inner.query = query
    ctx = stage2_context(ROWS)
    assert ctx.images == 2 and bool((ctx.vision_image == -1).any())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for budgets in (None, [[4, 3], [5, 0], [10, 0]], [[12, 9], [1, 0], [2, 0]]):
            if budgets is not None:
                ctx.budget = torch.tensor(budgets)
            check_stage2(scorer.score(ctx), ctx)


def calibrated_finepruner(prior_grid=None):
    scorer = get_scorer("finepruner", n_heads=2, n_clusters=2)
    if prior_grid is not None:
        scorer.prior = prior_grid
    return scorer


def step(grid) -> torch.Tensor:
    """(h, w) values of a function of the RELATIVE position only: 3 on the left half, 1 on the right, twice as much
    on the top half (cell centres, so a strip (1, N) has only the x step)."""
    h, w = (1, n_of(grid)) if grid is None else grid
    uy = (torch.arange(h) + 0.5) / h
    ux = (torch.arange(w) + 0.5) / w
    return torch.where(ux < 0.5, 3.0, 1.0).expand(h, w) * torch.where(uy < 0.5, 2.0, 1.0).view(h, 1)


def prior_heads(_row, _img, grid, kept, _gen):
    """Every head attends by the step function (a positional prior, nothing else)."""
    return step(grid).flatten()[kept].log().expand(HEADS, -1)


def test_scorers_treat_each_image_as_its_own():
    """Each image's scores and kept tokens == those of a context holding that image alone: per-image attention
    distributions, per-image head choice, per-image positions and the image's own budget."""
    ctx = stage2_context(ROWS, seed=3)
    with_prior = calibrated_finepruner(step(LARGE) / step(LARGE).sum())
    scorers = [get_scorer("fastv"), get_scorer("debiased", inner="fastv", fit="sample"),
               get_scorer("debiased", inner="fastv", rate=2.0), with_prior,
               get_scorer("debiased", inner=with_prior, rate=-1.0)]
    for scorer in scorers:
        whole = keep_per_image(scorer.score(ctx), ctx)
        for (row, img), cols in whole.items():
            alone = sub_context(ctx, row, img)
            own = keep_per_image(scorer.score(alone), alone)[(0, 0)]
            mine = (ctx.vision_image[row] == img).nonzero().flatten()
            assert torch.equal(mine[own], cols), (scorer.name, row, img)


@pytest.mark.parametrize("device", DEVICES)
def test_finepruner_allocates_each_images_own_budget(device):
    ctx = stage2_context(ROWS, seed=4, budgets=[[5, 2], [7, 0], [3, 0]], device=device)
    scorer = get_scorer("finepruner", n_heads=2, n_clusters=2)
    heads, scores = scorer.head_scores(ctx), scorer.score(ctx)
    check_stage2(scores, ctx)
    for row, _, columns, n in ctx.image_columns():
        valid_cols = columns[ctx.vision_valid[row, columns]]
        expected = valid_cols[cluster_allocate(ctx.vision_hidden[row, valid_cols], n, heads[row, valid_cols],
                                               2, 20, 0)]
        # the allocation alone is the image's top-n, whatever the valid mask: padding is never allocated
        top = columns[topk_keep(scores[row, columns].unsqueeze(0), n)[0]]
        assert top.device.type == device and top.tolist() == expected.sort().values.tolist(), (row, n)
        assert bool(ctx.vision_valid[row, top].all())
    # filler columns get no attention mass, however much their slot (a real token in row 0) draws
    assert bool((heads[ctx.vision_image < 0] == 0).all())


def calibrate_scorer(scorer, *contexts):
    scorer.start_calibration()
    for c in contexts:
        scorer.observe(c)
    scorer.finish_calibration()
    return scorer


def full_context(grids, seed):
    """One row per grid, every position kept (calibration sees the whole image), heads attending by the step."""
    return stage2_context([[(g, torch.arange(n_of(g)), [])] for g in grids], seed=seed, logit_fn=prior_heads)


def test_finepruner_prior_is_stored_on_the_unit_square():
    at_small = calibrate_scorer(calibrated_finepruner(), full_context([SMALL], 0))
    at_large = calibrate_scorer(calibrated_finepruner(), full_context([LARGE], 1))
    mixed = calibrate_scorer(calibrated_finepruner(), full_context([SMALL, STRIP], 2), full_context([LARGE], 3))
    assert at_small.prior.shape == SMALL and at_large.prior.shape == LARGE and mixed.prior.shape == LARGE
    torch.testing.assert_close(at_small.prior, step(SMALL) / step(SMALL).sum())
    # the step is a function of the relative position: resampled to the other grid it is that grid's own prior
    torch.testing.assert_close(resample_prior(at_small.prior, LARGE).float(), at_large.prior)
    torch.testing.assert_close(resample_prior(at_large.prior, SMALL).float(), at_small.prior)
    # a strip sees the x step only (the y halves averaged): 3/4 of the mass on the left half
    strip = resample_prior(at_small.prior, (1, STRIP_N))
    assert float(strip[0, :15].sum()) == pytest.approx(0.75) and float(strip[0, 15:].sum()) == pytest.approx(0.25)
    # mixed sizes (the strip contributes its x profile) still give a finite, normalised grid
    assert bool(torch.isfinite(mixed.prior).all()) and float(mixed.prior.sum()) == pytest.approx(1.0)

    # a test batch of every geometry: calibrated at 6x8 or at 10x12, the same scores, the same tokens kept
    ctx = stage2_context(ROWS, seed=5, logit_fn=lambda b, i, g, kept, gen: torch.cat(
        [prior_heads(b, i, g, kept, gen)[:2], 0.3 * torch.randn(2, len(kept), generator=gen)]))
    s_small, s_large = at_small.score(ctx), at_large.score(ctx)
    torch.testing.assert_close(s_small, s_large)
    assert check_stage2(s_small, ctx).keys() == check_stage2(s_large, ctx).keys()
    for key, cols in keep_per_image(s_small, ctx).items():
        assert torch.equal(cols, keep_per_image(s_large, ctx)[key]), key
    # the prior decides something here: a flat one picks other heads
    flat = calibrated_finepruner(torch.ones(3, 3) / 9)
    assert not torch.allclose(flat.head_scores(ctx), at_small.head_scores(ctx))


def test_finepruner_prior_round_trips_and_loads_older_plans(tmp_path):
    scorer = calibrate_scorer(calibrated_finepruner(), full_context([SMALL, LARGE], 0))
    plan = PruningPlan(stage1="pool", n1=0.5, stage2=get_scorer("debiased", inner=scorer, rate=0.5), n2=0.25)
    config = plan.to_dict()
    assert [len(r) for r in config["stage2"]["inner"]["prior"]] == [LARGE[1]] * LARGE[0]
    loaded = PruningPlan.from_dict(json.loads(json.dumps(config)))
    assert loaded.to_dict() == config
    assert torch.equal(loaded.scorer.inner.prior, scorer.prior)
    for suffix in (".json", ".yaml"):
        plan.save(tmp_path / f"plan{suffix}")
        assert PruningPlan.load(tmp_path / f"plan{suffix}").to_dict() == config
    ctx = stage2_context(ROWS, seed=6)
    torch.testing.assert_close(loaded.scorer.score(ctx), plan.scorer.score(ctx))

    # older plans stored a 1-D prior over N positions: square N is an (s, s) grid, any other N a (1, N) strip
    old_square = SCORERS.build("finepruner", prior=(step((6, 6)) / step((6, 6)).sum()).flatten().tolist())
    assert old_square.prior.shape == (6, 6)
    old_strip = SCORERS.build("finepruner", prior=[0.5, 0.25, 0.25])
    assert old_strip.prior.shape == (1, 3) and to_config(old_strip)["prior"] == [[0.5, 0.25, 0.25]]
    assert bool(torch.isfinite(old_strip.score(ctx)).all())
    with pytest.raises(ValueError, match="prior"):
        get_scorer("finepruner", prior=torch.ones(2, 2, 2))


def test_area_weights_are_exact_shares():
    assert torch.equal(area_weights(5, 5), torch.eye(5, dtype=torch.float64))
    assert area_weights(3, 2).tolist() == [[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]]
    for src, dst in ((16, 23), (23, 16), (8, 10), (1, 7), (7, 1)):
        w = area_weights(src, dst)
        torch.testing.assert_close(w.sum(dim=1), torch.ones(dst, dtype=torch.float64))
        # every source cell spreads exactly its length (in destination cells) over the destination
        torch.testing.assert_close(w.sum(dim=0), torch.full((src,), dst / src, dtype=torch.float64))


# ---- stage 2: debiasing on relative positions, image by image -------------------------------------------------

def trend_heads(content: dict | None = None):
    """Logits log(content) + RATE * i / N_i of each image's kept tokens (content 1 when None), every head alike."""

    def fn(row, img, grid, kept, gen):
        u = kept.float() / n_of(grid)
        c = content[(row, img)] if content is not None else torch.ones(len(kept))
        return (c.log() + RATE * u).expand(HEADS, -1)

    return fn


@pytest.mark.parametrize("device", DEVICES)
def test_debiased_scorer_fits_and_removes_each_images_trend(device):
    # calibration: whole images of three geometries, two of them sharing a row
    calib = stage2_context([[(SMALL, torch.arange(48), []), (STRIP, torch.arange(STRIP_N), [])],
                            [(LARGE, torch.arange(120), [])]], logit_fn=trend_heads(), device=device)
    scorer = calibrate_scorer(get_scorer("debiased", inner="fastv"), calib)
    assert scorer.rate == pytest.approx(RATE, rel=1e-4)
    for grid in (SMALL, LARGE, STRIP):  # one resolution alone fits the same rate
        one = stage2_context([[(grid, torch.arange(n_of(grid)), [])]], logit_fn=trend_heads())
        assert calibrate_scorer(get_scorer("debiased", inner="fastv"), one).rate == pytest.approx(RATE, rel=1e-4)

    # a test batch with random content under each image's own trend: debiased, each image keeps its top content
    gen = torch.Generator().manual_seed(9)
    base = stage2_context(ROWS, seed=8)
    content = {(r, i): torch.rand(len(c), generator=gen) + 0.5 for r, i, c, _ in base.image_columns()}
    ctx = stage2_context(ROWS, seed=8, logit_fn=trend_heads(content), device=device)
    content = {k: v.to(device) for k, v in content.items()}
    for s in (scorer, PruningPlan.from_dict(PruningPlan(stage2=scorer, n2=4).to_dict()).scorer):
        scores = s.score(ctx)
        check_stage2(scores, ctx)
        for row, img, columns, n in ctx.image_columns():
            valid = ctx.vision_valid[row, columns]
            truth = topk_keep(content[(row, img)].unsqueeze(0), n, valid.unsqueeze(0))[0]
            assert torch.equal(keep_per_image(scores, ctx)[(row, img)], columns[truth]), (row, img)
        assert bool((scores[ctx.vision_image < 0] == 0).all())
    # the raw FastV order (the trend left in) keeps other tokens: the test can see the correction
    raw = keep_per_image(get_scorer("fastv").score(ctx), ctx)
    assert any(not torch.equal(raw[k], v) for k, v in keep_per_image(scorer.score(ctx), ctx).items())
