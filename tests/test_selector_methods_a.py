"""Hand-computed cases for the FasterVLM, pool, DivPrune and VisPruner stage-1 selectors."""

from __future__ import annotations

import math

import pytest
import torch

from modules.selectors import get_selector
from modules.vlm.base import VisionTokens

METHODS = ["fastervlm", "pool", "divprune", "vispruner"]


def kept(name: str, tokens: VisionTokens, n: int, **params) -> list[list[int]]:
    return get_selector(name, **params).select(tokens, n).tolist()


def unit(*coords: float, dim: int = 12) -> torch.Tensor:
    v = torch.zeros(dim)
    v[: len(coords)] = torch.tensor(coords)
    return v


def basis(i: int, dim: int = 12) -> torch.Tensor:
    v = torch.zeros(dim)
    v[i] = 1.0
    return v


# ---- FasterVLM ---------------------------------------------------------------------------------------------------
def test_fastervlm_keeps_planted_top_attention():
    attn = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.7], [0.5, 0.1, 0.1, 0.1, 0.6, 0.4]])
    tokens = VisionTokens(feats=torch.randn(2, 6, 4), cls_attn=attn)
    assert kept("fastervlm", tokens, 3) == [[1, 3, 5], [0, 4, 5]]


def test_fastervlm_ties_to_lower_index_and_skips_padding():
    attn = torch.tensor([[0.5, 0.5, 0.5, 0.9, 0.5]])
    valid = torch.tensor([[True, True, True, False, True]])
    tokens = VisionTokens(feats=torch.randn(1, 5, 4), cls_attn=attn, valid=valid)
    assert kept("fastervlm", tokens, 2) == [[0, 1]]
    assert kept("fastervlm", tokens, 5) == [[0, 1, 2, 3, 4]]


def test_fastervlm_without_cls_attn_names_itself():
    with pytest.raises(ValueError, match="fastervlm.*cls_attn"):
        get_selector("fastervlm").select(VisionTokens(feats=torch.randn(1, 4, 2)), 2)


# ---- pool --------------------------------------------------------------------------------------------------------
def test_pool_one_token_per_quadrant():
    tokens = VisionTokens(feats=torch.randn(1, 16, 4), grid=(4, 4))
    assert kept("pool", tokens, 4) == [[0, 2, 8, 10]]  # (0,0) (0,2) (2,0) (2,2): one per 2x2 quadrant


def test_pool_budget_below_lattice_keeps_evenly_spaced_cells():
    tokens = VisionTokens(feats=torch.randn(1, 16, 4), grid=(4, 4))
    # n = 3: 2 x 2 lattice, cells 0, 2, 3 of 4 -> (0,0) (2,0) (2,2)
    assert kept("pool", tokens, 3) == [[0, 8, 10]]
    # n = 5: 2 x 3 lattice (column centres 0.17, 1.5, 2.83), cells 0, 1, 3, 4, 5 of 6
    assert kept("pool", tokens, 5) == [[0, 1, 8, 9, 11]]


def test_pool_24x24_at_64_is_the_stride_3_centres():
    tokens = VisionTokens(feats=torch.randn(1, 576, 2), grid=(24, 24))
    centres = [1 + 3 * i for i in range(8)]
    assert kept("pool", tokens, 64) == [[r * 24 + c for r in centres for c in centres]]


def test_pool_spreads_over_valid_box_and_avoids_padding():
    # 4 x 8 grid whose right half is padding: the 4 tokens spread over the valid 4 x 4 box.
    valid = torch.zeros(1, 4, 8, dtype=torch.bool)
    valid[:, :, :4] = True
    tokens = VisionTokens(feats=torch.randn(1, 32, 4), valid=valid.view(1, 32), grid=(4, 8))
    assert kept("pool", tokens, 4) == [[0, 2, 16, 18]]
    # padding rows at the top and bottom (pad-to-square of a wide image): rows 1-2 only
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[:, 1:3] = True
    tokens = VisionTokens(feats=torch.randn(1, 16, 4), valid=valid.view(1, 16), grid=(4, 4))
    assert kept("pool", tokens, 4) == [[4, 5, 6, 7]]
    # more than the valid tokens: all 8 valid ones, then padding spread over the padding box (rows 0..3)
    # centres (1.5, 0.5) and (1.5, 2.5) of the padding box snap to the nearest padding tokens 0 and 2
    assert kept("pool", tokens, 10) == [[0, 2, *range(4, 12)]]


def test_pool_without_grid_is_evenly_spaced():
    tokens = VisionTokens(feats=torch.randn(2, 10, 4), valid=torch.tensor([[True] * 10, [False] * 5 + [True] * 5]))
    # cell centres 1.17, 4.5, 7.83 of 10 tokens; 4.5 ties to 4.  Second row: centres 5.33, 7, 8.67 of tokens 5-9.
    assert kept("pool", tokens, 3) == [[1, 4, 8], [5, 7, 9]]


# ---- DivPrune ----------------------------------------------------------------------------------------------------
ANGLES = [0.0, 10.0, 90.0, 180.0, 200.0]  # max-min order: 90 (nn 80 deg away), 200, 0, 180, 10


def circle(angles) -> torch.Tensor:
    rad = torch.tensor(angles, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1).float()


@pytest.mark.parametrize("n,expected", [(1, [2]), (2, [2, 4]), (3, [0, 2, 4]), (4, [0, 2, 3, 4]), (5, [0, 1, 2, 3, 4])])
def test_divprune_max_min_order(n, expected):
    feats = circle(ANGLES).unsqueeze(0) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0]).view(1, 5, 1)  # scale-free
    assert kept("divprune", VisionTokens(feats=feats), n) == [expected]


def test_divprune_batched_with_padding():
    feats = circle(ANGLES).unsqueeze(0).repeat(2, 1, 1)
    valid = torch.tensor([[True] * 5, [True, True, False, True, True]])
    # row 1 without the 90-degree token: nearest-neighbour angles 10, 10, 20, 20 -> 180 first (lower index of
    # its tie with 200), then 0 (180 deg away), then 200 (20 deg from the set, 10's is 10), then 10;
    # the padding token only when n = 5
    tokens = VisionTokens(feats=feats, valid=valid)
    assert kept("divprune", tokens, 3) == [[0, 2, 4], [0, 3, 4]]
    assert kept("divprune", tokens, 4) == [[0, 2, 3, 4], [0, 1, 3, 4]]
    assert kept("divprune", tokens, 5) == [[0, 1, 2, 3, 4]] * 2


def test_divprune_duplicates_tie_to_lower_index():
    feats = torch.stack([basis(0), basis(1), basis(1), basis(0)]).unsqueeze(0)
    assert kept("divprune", VisionTokens(feats=feats), 2) == [[0, 1]]


# ---- VisPruner ---------------------------------------------------------------------------------------------------
def test_vispruner_keeps_important_and_drops_duplicates_odd_rest():
    # s order: 7, 0, 5 (important) | rest = [2, 6, 1, 4, 3] (odd): a = [2, 1, 3], b = [6, 4], k = 2.
    # m(3) = 1 (duplicate of 6), m(1) = 0.6 (to 4), m(2) = 0 -> drop 3 and 1; rest = [2, 6, 4].
    s = torch.zeros(8)
    s[[7, 0, 5, 2, 6, 1, 4, 3]] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    pre = torch.stack([basis(4), unit(0, 0, 0.6, 0.8), basis(0), basis(1), basis(2), basis(5), basis(1), basis(0)])
    tokens = VisionTokens(feats=torch.randn(1, 8, 3), pre=pre.unsqueeze(0), cls_attn=s.unsqueeze(0))
    assert kept("vispruner", tokens, 6) == [[0, 2, 4, 5, 6, 7]]


def _two_round_case() -> tuple[torch.Tensor, torch.Tensor]:
    """20 tokens, s descending with the index; planted cosines make the descending-m reorder decide round 2."""
    v = [None] * 20
    v[0] = basis(0)
    v[1] = unit(0.3, 0, math.sqrt(0.91))
    v[2] = unit(0.8, 0.6)
    v[3] = basis(1)
    v[5] = basis(3)
    v[7] = unit(0, 0, 0, 0.9, math.sqrt(0.19))
    for i, odd in enumerate(range(9, 20, 2)):
        v[odd] = basis(5 + i)
    for even in range(4, 20, 2):
        v[even] = v[even + 1].clone()  # exact duplicates: dropped in round 1
    s = torch.linspace(1.0, 0.05, 20)
    return torch.stack(v).unsqueeze(0), s.unsqueeze(0)


def test_vispruner_rest_reordered_by_descending_m():
    # Round 1: a = evens, b = odds, k = 8: the 8 duplicates go; 2 (m 0.6) and 0 (m 0.3) stay as [2, 0].
    # Round 2: rest = [2, 0, 1, 3, 5, ..., 19] -> a = [2, 1, 5, 9, 13, 17], b = [0, 3, 7, 11, 15, 19], k = 2:
    # m(5) = 0.9 (to 7), m(2) = 0.8 (to 0) are dropped. Keeping a in index order would drop 0 instead of 2.
    pre, s = _two_round_case()
    tokens = VisionTokens(feats=torch.randn(1, 20, 3), pre=pre, cls_attn=s)
    assert kept("vispruner", tokens, 10, important_ratio=0.0) == [[0, 1, 3, 7, 9, 11, 13, 15, 17, 19]]
    # without pre, feats are used
    assert kept("vispruner", VisionTokens(feats=pre, cls_attn=s), 10, important_ratio=0.0) == [
        [0, 1, 3, 7, 9, 11, 13, 15, 17, 19]
    ]


def test_vispruner_ratio_one_is_top_attention():
    pre, s = _two_round_case()
    s = s.flip(1)
    assert kept("vispruner", VisionTokens(feats=pre, cls_attn=s), 3, important_ratio=1.0) == [[17, 18, 19]]


def test_vispruner_never_keeps_padding_while_valid_remain():
    pre, s = _two_round_case()
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, 0] = False  # the highest-attention token of row 1 is padding
    tokens = VisionTokens(feats=pre.repeat(2, 1, 1), cls_attn=s.repeat(2, 1), valid=valid)
    out = kept("vispruner", tokens, 4, important_ratio=0.5)
    assert out[0][:2] == [0, 1] and 0 not in out[1] and out[1][:2] == [1, 2]
    out = kept("vispruner", tokens, 20)
    assert out == [list(range(20))] * 2


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_vispruner_rejects_bad_ratio(bad):
    with pytest.raises(ValueError, match="important_ratio"):
        get_selector("vispruner", important_ratio=bad)


def test_vispruner_without_cls_attn_names_itself():
    with pytest.raises(ValueError, match="vispruner.*cls_attn"):
        get_selector("vispruner").select(VisionTokens(feats=torch.randn(1, 4, 2)), 2)


# ---- invariants on random inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_budget_range_distinct_and_padding_last(name, dtype):
    gen = torch.Generator().manual_seed(0)
    for h, w in [(1, 1), (1, 7), (3, 5), (4, 4), (6, 6)]:
        num = h * w
        for trial in range(4):
            b = 3
            valid = torch.rand(b, num, generator=gen) < 0.7
            tokens = VisionTokens(
                feats=torch.randn(b, num, 8, generator=gen).to(dtype),
                pre=torch.randn(b, num, 6, generator=gen).to(dtype),
                cls_attn=torch.rand(b, num, generator=gen).to(dtype),
                valid=valid,
                grid=None if trial % 2 else (h, w),
            )
            for n in sorted({1, max(1, num // 3), max(1, num // 2), num}):
                out = get_selector(name).select(tokens, n)
                again = get_selector(name).select(tokens, n)
                assert torch.equal(out, again)
                assert out.shape == (b, n) and out.dtype == torch.long
                assert int(out.min()) >= 0 and int(out.max()) < num
                for row in range(b):
                    ids = out[row].tolist()
                    assert len(set(ids)) == n
                    n_valid = int(valid[row].sum())
                    n_kept_valid = int(valid[row, out[row]].sum())
                    assert n_kept_valid == min(n, n_valid), (name, h, w, n, row)


# ---- brute-force references on random inputs -------------------------------------------------------------
# Plain-Python transcriptions of METHODS.md, one token at a time, for the methods whose rule is a closed
# recipe: the vectorised selectors must agree with them exactly (ties to the lower index, padding only after
# every valid token) on random inputs with random padding.


def _rank(i: int, score: float, valid: bool) -> tuple:
    return (not valid, -score, i)  # valid first, then score descending, then lower index


def fastervlm_reference(attn: list[float], valid: list[bool], n: int) -> list[int]:
    return sorted(sorted(range(len(attn)), key=lambda i: _rank(i, attn[i], valid[i]))[:n])


def divprune_reference(feats: torch.Tensor, valid: list[bool], n: int) -> list[int]:
    num = feats.shape[0]
    unit = torch.nn.functional.normalize(feats.float(), dim=-1)
    d = (1.0 - unit @ unit.T).tolist()
    if not any(valid):
        valid = [True] * num  # an all-padding image is treated as all valid
    ok = [i for i in range(num) if valid[i]]
    nearest = {i: min([d[i][j] for j in ok if j != i], default=math.inf) for i in ok}
    picked = [max(ok, key=lambda i: (nearest[i], -i))]
    while len(picked) < n:
        pool = [i for i in ok if i not in picked] or [i for i in range(num) if i not in picked]
        picked.append(max(pool, key=lambda i: (min(d[i][j] for j in picked), -i)))
    return sorted(picked)


def vispruner_reference(attn: list[float], feats: torch.Tensor, valid: list[bool], n: int,
                        ratio: float = 0.5) -> list[int]:
    num = len(attn)
    ok = sorted((i for i in range(num) if valid[i]), key=lambda i: (-attn[i], i))
    if n >= len(ok):
        return fastervlm_reference(attn, valid, n)
    unit = torch.nn.functional.normalize(feats.float(), dim=-1)
    cos = (unit @ unit.T).tolist()
    n_imp = math.floor(n * ratio + 1e-9)
    n_div = n - n_imp
    important, rest = ok[:n_imp], ok[n_imp:]
    while len(rest) > n_div:
        k = min(8, len(rest) - n_div)
        a, b = rest[0::2], rest[1::2]
        m = {i: max((cos[i][j] for j in b), default=-math.inf) for i in a}
        a = sorted(a, key=lambda i: -m[i])  # stable: equal m keep their order in rest
        rest = a[k:] + b
    return sorted(important + rest)


def random_case(gen: torch.Generator, b: int, num: int, dtype) -> VisionTokens:
    return VisionTokens(
        feats=torch.randn(b, num, 8, generator=gen).to(dtype),
        pre=torch.randn(b, num, 6, generator=gen).to(dtype),
        cls_attn=torch.rand(b, num, generator=gen).to(dtype),
        valid=torch.rand(b, num, generator=gen) < 0.7,
    )


@pytest.mark.parametrize("name", ["fastervlm", "divprune", "vispruner"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_brute_force_reference(name, dtype):
    gen = torch.Generator().manual_seed(1)
    checked = 0
    for num in (1, 5, 12, 23, 40):
        for _ in range(3):
            tokens = random_case(gen, 3, num, dtype)
            for n in sorted({1, min(2, num), max(1, num // 3), max(1, num // 2), max(1, num - 3), num}):
                out = get_selector(name).select(tokens, n).tolist()
                for row in range(3):
                    valid = tokens.valid[row].tolist()
                    attn = tokens.cls_attn[row].float().tolist()
                    if name == "fastervlm":
                        expected = fastervlm_reference(attn, valid, n)
                    elif name == "divprune":
                        expected = divprune_reference(tokens.feats[row], valid, n)
                    else:
                        expected = vispruner_reference(attn, tokens.pre[row], valid, n)
                    assert out[row] == expected, (num, n, row)
                    checked += 1
    assert checked > 150
