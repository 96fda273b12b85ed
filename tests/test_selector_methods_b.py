"""AgilePruner, FinePruner stage A (clustering) and stage B (head selection by divergence), on hand-built inputs."""

from __future__ import annotations

import math

import pytest
import torch

from modules.budget import topk_keep
from modules.config import to_config
from modules.scorers import SCORERS, Stage2Context, get_scorer
from modules.selectors import get_selector
from modules.selectors.agilepruner import effective_rank
from modules.selectors.finepruner import allocate, cluster_allocate
from modules.vlm.base import VisionTokens

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---- AgilePruner -----------------------------------------------------------------------------------------------
def agile_image(simple: bool) -> torch.Tensor:
    """16 tokens in 32 dims. Tokens 0-3 (the highest attention) are near-duplicates: e0 + 0.2 e_{16+i}, pairwise
    cosine distance 1 - 1/1.04 = 0.0385. The rest are 12 distinct one-hots (complex image, erank ~13.3) or all the
    same one-hot (simple image, erank ~2.0)."""
    feats = torch.zeros(16, 32)
    for i in range(4):
        feats[i, 0], feats[i, 16 + i] = 1.0, 0.2
    for i in range(4, 16):
        feats[i, 4 if simple else i] = 1.0
    return feats


def mean_pairwise_cosine_distance(feats: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(feats, dim=-1)
    dist = 1 - unit @ unit.T
    k = feats.shape[0]
    return float(dist.sum() / (k * (k - 1)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agilepruner_keeps_more_diverse_tokens_for_complex_images(device, dtype):
    feats = torch.stack([agile_image(simple=False), agile_image(simple=True)]).to(device, dtype)
    attn = torch.linspace(1, 0, 16).expand(2, -1).to(device)  # descending attention: token 0 first
    tokens = VisionTokens(feats=feats, cls_attn=attn)
    sel = get_selector("agilepruner")  # uncalibrated: erank_avg = sqrt(16) = 4
    eranks = sel.image_eranks(tokens)
    assert eranks[0] > 10 and eranks[1] < 3
    # complex: c ~ 3.3, tau at step 2 ~ 0.067 > 0.0385, so tokens 1-3 are rejected as duplicates of token 0.
    # simple: c ~ 0.51, tau at step 4 ~ 0.020 < 0.0385, so the pass stays attention-driven.
    keep = sel.select(tokens, 4)
    assert keep.device.type == device
    assert keep.tolist() == [[0, 4, 5, 6], [0, 1, 2, 3]]
    kept_hi = feats[0, keep[0]].float().cpu()
    kept_lo = feats[1, keep[1]].float().cpu()
    assert mean_pairwise_cosine_distance(kept_hi) > 0.5 > mean_pairwise_cosine_distance(kept_lo)
    # the gate is what makes the difference: a huge reference erank (c ~ 0) gives plain top-4 attention
    plain = get_selector("agilepruner", erank_avg=1e9).select(tokens, 4)
    assert plain.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # the order can come from elsewhere (a debiasing wrapper): with reversed attention the simple image starts at
    # token 15, rejects its exact copies 14-4 (distance 0) and takes the near-duplicates 3, 2, 1 (distance 1 to it)
    reverse = torch.linspace(0, 1, 16).expand(2, -1)
    assert sel.keep_from_scores(tokens, 4, reverse).sort().values.tolist() == [[12, 13, 14, 15], [1, 2, 3, 15]]


def test_agilepruner_tau_is_capped_by_tau_max():
    tokens = VisionTokens(feats=agile_image(simple=False)[None], cls_attn=torch.linspace(1, 0, 16)[None])
    # c = 13.3 / 0.01 is huge, but tau_max = 0.03 < 0.0385 lets the near-duplicates through
    assert get_selector("agilepruner", erank_avg=0.01, tau_max=0.03).select(tokens, 4).tolist() == [[0, 1, 2, 3]]
    assert get_selector("agilepruner", erank_avg=0.01, tau_max=0.3).select(tokens, 4).tolist() == [[0, 4, 5, 6]]


def test_agilepruner_fills_by_attention_when_the_pass_ends_short():
    # identical tokens: erank 1 (no spread), c = 1/4 > 0, so every candidate after the first is rejected
    feats = torch.ones(1, 10, 6)
    attn = torch.tensor([[0.3, 0.9, 0.1, 0.5, 0.5, 0.0, 0.7, 0.2, 0.8, 0.4]])
    keep = get_selector("agilepruner").select(VisionTokens(feats=feats, cls_attn=attn), 4)
    assert keep.tolist() == [[1, 3, 6, 8]]  # 0.9, 0.8, 0.7, then 0.5 at the lower index (3, not 4)


def test_agilepruner_never_keeps_padding_while_valid_remain():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 12, 8, generator=gen)
    attn = torch.arange(12.0).expand(2, -1).clone()  # padding (the last tokens) has the highest attention
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[:, 8:] = False
    tokens = VisionTokens(feats=feats, cls_attn=attn, valid=valid)
    sel = get_selector("agilepruner", erank_avg=0.5)
    # the same images without their padding tokens (erank_avg fixed, so N does not enter)
    unpadded = VisionTokens(feats=feats[:, :8], cls_attn=attn[:, :8])
    for n in range(1, 9):
        keep = sel.select(tokens, n)
        assert keep.shape == (2, n) and bool(valid.gather(1, keep).all())
        assert torch.equal(keep, sel.select(unpadded, n)), n
    # n above the valid count: all valid, then padding by attention (11, 10)
    assert sel.select(tokens, 10).tolist() == [list(range(8)) + [10, 11]] * 2
    assert sel.select(tokens, 12).tolist() == [list(range(12))] * 2


def test_agilepruner_needs_attention_and_checks_params():
    with pytest.raises(ValueError, match="cls_attn"):
        get_selector("agilepruner").select(VisionTokens(feats=torch.randn(1, 4, 3)), 2)
    for bad in ({"tau0": -0.1}, {"tau_max": float("nan")}, {"erank_avg": 0.0}, {"erank_scale": -1.5}):
        with pytest.raises(ValueError, match=str(list(bad.values())[0])):
            get_selector("agilepruner", **bad)


def test_effective_rank_hand_computed():
    eye = torch.eye(16)
    assert effective_rank(eye, center=False) == pytest.approx(16.0, rel=1e-5)
    # centered I_16 = I - J/16 has singular values 1 (x15) and 0
    assert effective_rank(eye, center=True) == pytest.approx(15.0, rel=1e-5)
    alternating = eye[torch.arange(16) % 2]  # rows e0, e1, e0, ... -> centered: +-(e0 - e1) / 2, rank 1
    assert effective_rank(alternating, center=True) == pytest.approx(1.0, rel=1e-5)
    # singular values (3, 1): p = (3/4, 1/4), erank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0])), center=False) == pytest.approx(expected, rel=1e-5)


def test_agilepruner_calibration_fits_the_mean_erank():
    eye = torch.eye(16)
    sel = get_selector("agilepruner")
    sel.start_calibration()
    sel.observe(VisionTokens(feats=torch.stack([eye, eye[torch.arange(16) % 2]]), cls_attn=torch.rand(2, 16)))
    sel.observe(VisionTokens(feats=torch.eye(4)[None], cls_attn=torch.rand(1, 4)))  # erank 3
    # the statistic is resolution-free: erank / sqrt(N) of each image, N = 16 here
    stat = sel.statistic(VisionTokens(feats=eye[None]))
    assert stat.device.type == "cpu" and stat.tolist() == pytest.approx([15.0 / 4], rel=1e-5)
    sel.finish_calibration()
    # batches of N = 16 (eranks 15, 1) and N = 4 (erank 3) mix: each image is divided by its own sqrt(N)
    assert isinstance(sel.erank_scale, float)
    assert sel.erank_scale == pytest.approx((15 / 4 + 1 / 4 + 3 / 2) / 3, rel=1e-5)
    assert to_config(sel)["erank_scale"] == sel.erank_scale and sel.erank_avg is None
    # the reference follows each image's N; a fixed erank_avg (older plans) is used at every N, and calibrating
    # replaces it
    assert sel.reference_erank(64) == pytest.approx(sel.erank_scale * 8)
    assert get_selector("agilepruner", erank_avg=2.5).reference_erank(64) == 2.5
    legacy = get_selector("agilepruner", erank_avg=2.5)
    legacy.start_calibration()
    legacy.observe(VisionTokens(feats=eye[None]))
    legacy.finish_calibration()
    assert legacy.erank_avg is None and legacy.erank_scale == pytest.approx(15 / 4, rel=1e-5)


def agilepruner_reference(feats: torch.Tensor, attn: list[float], valid: list[bool], n: int, erank_avg=None,
                          tau0: float = 0.01, tau_max: float = 0.3) -> list[int]:
    """METHODS.md's AgilePruner, one candidate at a time; erank from a float64 SVD (not the Gram matrix)."""
    num = len(attn)
    ok = [i for i in range(num) if valid[i]]
    centred = feats[ok].double() - feats[ok].double().mean(dim=0)
    sigma = torch.linalg.svdvals(centred) if ok else torch.zeros(0)
    if float(sigma.sum()) > 1e-9:
        p = sigma / sigma.sum()
        p = p[p > 0]
        erank = math.exp(float(-(p * p.log()).sum()))
    else:
        erank = 1.0
    c = erank / (erank_avg if erank_avg is not None else math.sqrt(num))
    unit = torch.nn.functional.normalize(feats.float(), dim=-1)
    dist = (1.0 - unit @ unit.T).tolist()
    order = sorted(range(num), key=lambda i: (not valid[i], -attn[i], i))
    kept = []
    for i in order:
        if len(kept) == n or not valid[i]:
            break
        tau = min(tau_max, c * tau0 * (len(kept) + 1))
        if all(dist[i][j] >= tau for j in kept):
            kept.append(i)
    kept += [i for i in order if i not in kept][: n - len(kept)]
    return sorted(kept)


def test_agilepruner_matches_brute_force_reference():
    """Random images of near-duplicate groups (cosine distances around tau), random padding, several budgets,
    calibrated and not: the batched pass == the one-candidate-at-a-time recipe."""
    gen = torch.Generator().manual_seed(0)
    checked = gated = 0
    for num, groups in ((9, 2), (16, 3), (25, 8), (36, 4)):
        for spread in (0.05, 0.15, 0.4):
            centres = torch.randn(3, groups, 10, generator=gen)
            member = torch.randint(groups, (3, num), generator=gen)
            feats = centres.gather(1, member.unsqueeze(-1).expand(-1, -1, 10))
            feats = feats + spread * torch.randn(3, num, 10, generator=gen)
            attn = torch.rand(3, num, generator=gen)
            valid = torch.rand(3, num, generator=gen) < 0.75
            tokens = VisionTokens(feats=feats, cls_attn=attn, valid=valid)
            for erank_avg in (None, 1.0):
                sel = get_selector("agilepruner", erank_avg=erank_avg)
                for n in sorted({1, 3, num // 3, num // 2, num - 2, num}):
                    out = sel.select(tokens, n).tolist()
                    for row in range(3):
                        expected = agilepruner_reference(feats[row], attn[row].tolist(),
                                                         valid[row].tolist(), n, erank_avg)
                        assert out[row] == expected, (num, spread, erank_avg, n, row)
                        rank = sorted(range(num), key=lambda i: (not valid[row, i], -attn[row, i], i))
                        top = sorted(rank[:n])
                        gated += expected != top
                        checked += 1
    assert checked > 300 and gated > 50  # the diversity gate changed the plain top-n in many cases


# ---- FinePruner stage A ----------------------------------------------------------------------------------------
def test_allocate_is_proportional_with_one_per_cluster():
    assert allocate([8, 4, 4], 8) == [4, 2, 2]
    assert allocate([5, 3, 2], 7) == [4, 2, 1]  # quotas 3.5, 2.1, 1.4
    assert allocate([10, 1, 1], 3) == [1, 1, 1]  # the minimum of one beats proportionality
    assert allocate([10, 1, 1], 2) == [1, 1, 0]  # budget below the cluster count: largest first, then lower index
    assert allocate([3, 0, 2], 5) == [3, 0, 2]
    assert sum(allocate([7, 6, 5, 1], 11)) == 11


# sizes 8, 4, 4 around e0, e1, e2; each cluster is +- pairs a * e_p around its axis, so the centroid is the axis
# and a smaller a means closer. (cluster, a, sign) per token, in a fixed shuffled order.
PLANTED = [(0, 0.3, 1), (1, 0.1, 1), (2, 0.3, -1), (0, 0.1, -1), (0, 0.4, 1), (1, 0.3, -1), (2, 0.1, 1),
           (0, 0.2, 1), (0, 0.3, -1), (1, 0.1, -1), (0, 0.1, 1), (2, 0.3, 1), (0, 0.4, -1), (1, 0.3, 1),
           (0, 0.2, -1), (2, 0.1, -1)]


def planted_feats() -> torch.Tensor:
    feats = torch.zeros(len(PLANTED), 8)
    for t, (c, a, sign) in enumerate(PLANTED):
        feats[t, c] = 1.0
        feats[t, 3 + c] = sign * a
    return feats


def closest(n_per_cluster: dict[int, int]) -> list[int]:
    """Hand answer: per cluster, its n tokens of smallest a (ties by lower index)."""
    out = []
    for c, n in n_per_cluster.items():
        members = sorted((a, t) for t, (cc, a, _) in enumerate(PLANTED) if cc == c)
        out += [t for _, t in members[:n]]
    return sorted(out)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cluster_allocate_planted_clusters(seed):
    feats = planted_feats()
    kept = cluster_allocate(feats, 8, None, n_clusters=3, seed=seed)
    assert kept.tolist() == closest({0: 4, 1: 2, 2: 2}) == [1, 3, 6, 7, 9, 10, 14, 15]
    # with ranking scores, each cluster keeps its best-scored tokens instead (here: the farthest ones)
    far = torch.tensor([a for _, a, _ in PLANTED])
    kept = cluster_allocate(feats, 8, far, n_clusters=3, seed=seed)
    assert kept.tolist() == [0, 2, 4, 5, 8, 11, 12, 13]


@pytest.mark.parametrize("device", DEVICES)
def test_finepruner_selector_planted_clusters_and_padding(device):
    feats = torch.stack([planted_feats(), planted_feats()]).to(device, torch.bfloat16)
    valid = torch.ones(2, 16, dtype=torch.bool, device=device)
    valid[1, 3] = False  # row 1 loses one of cluster 0's closest tokens (e0 - 0.1 e3) to padding
    tokens = VisionTokens(feats=feats, valid=valid)
    sel = get_selector("finepruner", n_clusters=3)
    keep = sel.select(tokens, 8)
    assert keep.device.type == device
    assert keep[0].tolist() == [1, 3, 6, 7, 9, 10, 14, 15]
    # row 1: sizes 7, 4, 4 over 15 valid tokens -> quotas 3.73, 2.13, 2.13 -> 4, 2, 2. Cluster 0's centroid now
    # tilts towards +e3 (its -0.1 member is gone), so among equal offsets the + member is closer: 10, 7, 14, 0.
    assert keep[1].tolist() == sorted([10, 7, 14, 0] + [1, 9] + [6, 15])
    # default n_clusters = n // 4 = 2 for n = 8: row 0 as the planted image, row 1 as that image without its
    # padding token (the padding token's features never enter the clustering)
    keep = get_selector("finepruner").select(tokens, 8)
    assert keep[0].tolist() == get_selector("finepruner").select(VisionTokens(feats=feats[:1]), 8)[0].tolist()
    others = torch.tensor([i for i in range(16) if i != 3], device=device)
    alone = get_selector("finepruner").select(VisionTokens(feats=feats[1:, others]), 8)
    assert keep[1].tolist() == others[alone[0]].tolist()
    # n above the valid count: every valid token, then padding by lower index
    assert sel.select(tokens, 16)[1].tolist() == list(range(16))
    assert sel.select(tokens, 15)[1].tolist() == [i for i in range(16) if i != 3]
    assert torch.equal(sel.select(tokens, 8), sel.select(tokens, 8))  # deterministic


def test_finepruner_params_are_checked():
    for bad in ({"n_clusters": 0}, {"iters": 0}, {"seed": 1.5}):
        with pytest.raises(ValueError, match=str(list(bad.values())[0])):
            get_selector("finepruner", **bad)


# ---- FinePruner stage B ----------------------------------------------------------------------------------------
N_ORIG, M, H, LEN = 16, 8, 4, 14
GRID = (4, 4)  # the original image's token grid: N_ORIG = 4 * 4
BUDGET = 4
PRIOR = torch.exp(0.3 * torch.arange(N_ORIG, dtype=torch.float32))
PRIOR = PRIOR / PRIOR.sum()  # recency-like positional prior over the 16 original positions
PLANTED_TOKENS = [1, 3]  # local indices among the M visual tokens of each row


def stage2_context(hidden_dtype=torch.float32, valid=None, device="cpu") -> Stage2Context:
    """Two rows (row 1 left-padded by one). Heads 0-2 attend exactly by the prior; head 3 focuses on tokens 1, 3.

    Row 0 holds the even original positions, row 1 the odd ones (one 4x4 image per row, budget 4); visual tokens
    with odd local index form cosine cluster A, even ones cluster B.
    """
    slots = torch.stack([torch.arange(2, 2 + M), torch.arange(3, 3 + M)])
    index = torch.stack([torch.arange(0, N_ORIG, 2), torch.arange(1, N_ORIG, 2)])
    mask = torch.ones(2, LEN, dtype=torch.long)
    mask[1, 0] = 0
    logits = torch.zeros(2, H, LEN)
    for b in range(2):
        for h in range(3):
            logits[b, h, slots[b]] = torch.log(PRIOR[index[b]]) + 5.0  # any shift: softmax over vision cancels it
        logits[b, 3, slots[b, PLANTED_TOKENS]] = 5.0
    hidden = torch.zeros(2, M, 12)
    for t in range(M):
        hidden[:, t, t % 2] = 1.0
        hidden[:, t, 2 + t] = 0.1
    if valid is None:
        valid = torch.ones(2, M, dtype=torch.bool)

    def logits_fn(query_index):
        return logits.to(device)[:, :, None, :].expand(-1, -1, query_index.shape[1], -1)

    return Stage2Context(logits_fn=logits_fn, attention_mask=mask.to(device), vision_slots=slots.to(device),
                         vision_index=index.to(device), vision_valid=valid.to(device),
                         vision_hidden=hidden.to(device, hidden_dtype),
                         budget=torch.full((2, 1), BUDGET, device=device),
                         vision_image=torch.zeros(2, M, dtype=torch.long, device=device),
                         vision_grid=torch.tensor(GRID, device=device).expand(2, M, 2))


def focus_head() -> torch.Tensor:
    """Head 3's distribution over the M visual tokens: e^5 on the planted tokens, e^0 elsewhere."""
    w = torch.ones(M)
    w[PLANTED_TOKENS] = math.exp(5.0)
    return w / w.sum()


def row_prior(b: int) -> torch.Tensor:
    p = PRIOR[torch.arange(b, N_ORIG, 2)]
    return p / p.sum()


@pytest.mark.parametrize("device", DEVICES)
def test_stage_b_selects_the_divergent_head(device):
    ctx = stage2_context(device=device)
    scorer = get_scorer("finepruner", n_heads=1, cluster=False, prior=PRIOR.tolist())
    s = scorer.score(ctx)
    assert s.shape == (2, M) and s.device.type == device
    # prior heads have KL exactly 0, head 3 alone is kept
    assert torch.allclose(s.cpu(), focus_head().expand(2, -1), atol=1e-6)
    assert topk_keep(s, 2).tolist() == [PLANTED_TOKENS] * 2
    # the head-mean (FastV) ranks by recency instead: the last visual tokens win
    assert topk_keep(get_scorer("fastv").score(ctx), 2).tolist() == [[6, 7]] * 2
    # two heads: head 3 and, among the tied prior heads, the lowest (head 0)
    s2 = get_scorer("finepruner", n_heads=2, cluster=False, prior=PRIOR).score(ctx).cpu()
    expected = torch.stack([(focus_head() + row_prior(b)) / 2 for b in range(2)])
    assert torch.allclose(s2, expected, atol=1e-6)
    # n_heads above H is capped: the mean of all four heads
    s8 = get_scorer("finepruner", n_heads=8, cluster=False, prior=PRIOR).score(ctx).cpu()
    expected = torch.stack([(focus_head() + 3 * row_prior(b)) / 4 for b in range(2)])
    assert torch.allclose(s8, expected, atol=1e-6)


def test_stage_b_uncalibrated_uses_the_batch_mean():
    s = get_scorer("finepruner", n_heads=1, cluster=False).score(stage2_context())
    # each position is in one row, so pi = that row's head mean (3 prior + focus) / 4; head 3 diverges most
    assert torch.allclose(s, focus_head().expand(2, -1), atol=1e-6)


def test_stage_b_prior_round_trips_and_calibrates():
    scorer = get_scorer("finepruner", prior=PRIOR)
    # a 1-D prior of 16 positions (what older plans saved) is the 4x4 grid it was taken on
    assert torch.equal(scorer.prior, PRIOR.view(GRID))
    config = to_config(scorer)
    assert isinstance(config["prior"], list) and [len(r) for r in config["prior"]] == [4] * 4
    params = {k: v for k, v in config.items() if k != "name"}
    rebuilt = SCORERS.build(config["name"], **params)
    assert isinstance(rebuilt.prior, torch.Tensor) and torch.equal(rebuilt.prior, PRIOR.view(GRID))

    fresh = get_scorer("finepruner")
    fresh.start_calibration()
    fresh.observe(stage2_context())
    fresh.observe(stage2_context())
    fresh.finish_calibration()
    # position i's head mean is (3 prior + focus) / 4 of its row; both rows together sum to 2 before normalising
    expected = torch.zeros(N_ORIG)
    for b in range(2):
        expected[torch.arange(b, N_ORIG, 2)] = (3 * row_prior(b) + focus_head()) / 4
    expected = expected / expected.sum()
    assert fresh.prior.dtype == torch.float32 and fresh.prior.shape == GRID
    assert torch.allclose(fresh.prior, expected.view(GRID), atol=1e-6)

    # positions never seen get the mean of the seen ones; N comes from the image's grid (3 x 6 = 18)
    ctx = stage2_context()
    ctx.vision_index = ctx.vision_index.clone()
    ctx.vision_index[1] += 2  # row 1 now covers 3, 5, ..., 17: positions 1 and 16 unseen
    ctx.vision_grid = torch.tensor([3, 6]).expand(2, M, 2)
    fresh.start_calibration()
    fresh.observe(ctx)
    fresh.finish_calibration()
    assert fresh.prior.shape == (3, 6)
    raw = torch.zeros(18)
    raw[torch.arange(0, 16, 2)] = (3 * row_prior(0) + focus_head()) / 4
    raw[torch.arange(3, 18, 2)] = (3 * row_prior(1) + focus_head()) / 4
    raw[[1, 16]] = raw[ctx.vision_index.flatten()].mean()
    assert torch.allclose(fresh.prior, (raw / raw.sum()).view(3, 6), atol=1e-6)

    # a prior of another grid is resampled (finite scores), but a position outside its own image's grid is an
    # inconsistent context, named in the error
    assert bool(torch.isfinite(get_scorer("finepruner", prior=PRIOR).score(ctx)).all())
    ctx.vision_grid = torch.tensor(GRID).expand(2, M, 2)
    with pytest.raises(ValueError, match="vision_index 17"):
        get_scorer("finepruner", prior=PRIOR).score(ctx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_stage_b_with_clusters(device, hidden_dtype):
    ctx = stage2_context(hidden_dtype=hidden_dtype, device=device)
    plain = get_scorer("finepruner", n_heads=2, cluster=False, prior=PRIOR).score(ctx)
    # without clusters: planted 1, 3, then the recent 7, 6 (cluster A = odd tokens would get three)
    assert topk_keep(plain, 4).tolist() == [[1, 3, 6, 7]] * 2
    scorer = get_scorer("finepruner", n_heads=2, cluster=True, n_clusters=2, prior=PRIOR)
    s = scorer.score(ctx)
    # two clusters of four share the budget of 4 as 2 + 2: A keeps 1, 3 (planted), B keeps its best-scored 6, 4
    assert topk_keep(s, BUDGET).tolist() == [[1, 3, 4, 6]] * 2
    lift = 1 + plain.max(dim=1, keepdim=True).values - plain.min(dim=1, keepdim=True).values
    allocated = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0.0], device=device)
    assert torch.allclose(s - plain, allocated * lift)
    # combine() applies the same allocation to any score range, e.g. a debiasing wrapper's rescaled scores
    assert topk_keep(scorer.combine(ctx, plain * 100 - 7), BUDGET).tolist() == [[1, 3, 4, 6]] * 2

    # a padding token is never allocated: row 1 loses token 7, clusters of 3 (A) and 4 (B) still split 2 + 2
    valid = torch.ones(2, M, dtype=torch.bool)
    valid[1, 7] = False
    ctx = stage2_context(hidden_dtype=hidden_dtype, valid=valid, device=device)
    keep = topk_keep(scorer.score(ctx), BUDGET, ctx.vision_valid)
    assert keep.tolist() == [[1, 3, 4, 6]] * 2
    ctx.budget = torch.full((2, 1), 8, device=device)  # above the 7 valid tokens: all valid first, padding last
    assert topk_keep(scorer.score(ctx), 8, ctx.vision_valid)[1].tolist() == list(range(8))


def test_stage_b_params_are_checked():
    for bad in ({"n_heads": 0}, {"query": "first"}, {"n_clusters": -1}):
        with pytest.raises(ValueError, match=str(list(bad.values())[0])):
            get_scorer("finepruner", **bad)
    with pytest.raises(ValueError, match="prior"):
        get_scorer("finepruner", prior=[-1.0, 2.0])
