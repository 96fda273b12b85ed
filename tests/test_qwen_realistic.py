"""Realistic Qwen tier: the Qwen-VL contracts on models with Qwen2.5-VL-7B's and Qwen3-VL-8B's geometry at tiny depth.

Vision towers of the real width (Qwen2.5-VL: 1280, 16 heads of 80, windows of 112 pixels = 4 x 4 merged tokens with
full attention in blocks 1 and 3; Qwen3-VL: 1152, 16 heads of 72, 2304 learned position embeddings, DeepStack after
blocks 0-2), 4 blocks each; language models with head_dim 128 and the real M-RoPE sections (4 layers, GQA); the real
Qwen2VL image processing (patch 14 / 16, merge 2, default min/max pixels); a left-padded batch of a one-image and a
two-image prompt over 640x480, 420x308 and 336x476 images (a few hundred merged tokens each, grids that the 4-token
Qwen2.5-VL windows do not divide). See tests/qwen_realistic.py for where each value comes from. The tiny models of
test_qwen.py (windows of 2 x 2 merged tokens, widths 32) hide what only this geometry shows.
"""

from __future__ import annotations

import copy
import sys
from functools import cache

import numpy as np
import pytest
import qwen_realistic as Q
import torch
from test_qwen import _cache_free_check, check_stage1_equals_masking

from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.vlm import get_adapter

LAYER = 3  # Qwen3-VL adds DeepStack features after decoder layers 0-2
KEEP_ALL = dict(stage1="random", n1=1.0, stage2="fastv", n2=1.0, layer=LAYER)
PLAN = dict(stage1="random", n1=0.6, stage2="fastv", n2=0.3, layer=LAYER)


@pytest.fixture(scope="module", params=Q.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    yield
    Q.model.cache_clear()
    unpruned_logits.cache_clear()


@cache
def unpruned_logits(family: str) -> torch.Tensor:
    with torch.no_grad():
        return Q.model(family)(**Q.batch(family)).logits


def n_tokens(batch) -> list[int]:
    return (batch["image_grid_thw"].prod(dim=1) // Q.MERGE**2).tolist()


def rounded(ratio: float, ns) -> list[int]:
    return [int(np.floor(ratio * n + 0.5)) for n in ns]


# ---- geometry --------------------------------------------------------------------------------------------------

def test_models_and_batch_have_the_real_geometry(family):
    model, batch = Q.model(family), Q.batch(family)
    vc, tc = model.config.vision_config, model.config.text_config
    visual = model.model.visual
    attn = visual.blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == ((16, 80) if family == "qwen2_5_vl" else (16, 72))
    layer = model.model.language_model.layers[0].self_attn
    assert layer.head_dim == 128 and tc.num_attention_heads // tc.num_key_value_heads == 2
    assert vc.out_hidden_size == tc.hidden_size
    ns = n_tokens(batch)
    assert len(set(ns)) == 3 and min(ns) > 100  # three different N_i of a few hundred
    merged = (batch["image_grid_thw"][:, 1:] // Q.MERGE).tolist()
    if family == "qwen2_5_vl":
        window = vc.window_size // vc.patch_size // Q.MERGE
        assert window == 4
        assert any(h % window or w % window for h, w in merged)  # padded windows
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding


# ---- 1. keep-all --------------------------------------------------------------------------------------------

def test_keep_all_equals_unpruned(family):
    batch = Q.batch(family)
    ref = unpruned_logits(family)
    with torch.no_grad():
        out = PrunedVLM(Q.model(family), PruningPlan(**KEEP_ALL))(**batch)
    assert torch.equal(out.logits, ref)
    assert out.pruning.num_tokens == n_tokens(batch)


# ---- 2. the adapter's features and [CLS]-free attention ---------------------------------------------------------

def test_features_and_mean_query_attention_at_real_geometry(family):
    """pre -> merger == feats == the model's own per-image image features (Qwen2.5-VL: the window order undone at
    4 x 4-token windows with padding); cls_attn == a naive per-image softmax(q k^T) of the scoring block."""
    model, batch = Q.model(family), Q.batch(family)
    adapter = get_adapter(model)
    visual = model.model.visual
    block = visual.blocks[adapter._score_block()]
    assert adapter._score_block() == 3  # Qwen2.5-VL: last full-attention block; Qwen3-VL: last block
    with torch.no_grad():
        encoded = PrunedVLM(model, PruningPlan()).encode(batch["pixel_values"],
                                                          image_grid_thw=batch["image_grid_thw"])
        inputs = {}
        handle = block.register_forward_pre_hook(
            lambda m, a, k: inputs.update(h=a[0] if a else k["hidden_states"], **k), with_kwargs=True)
        try:
            own = model.model.get_image_features(batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        finally:
            handle.remove()
    items = list(encoded.items())
    ns = n_tokens(batch)
    assert [t.num_tokens for t in items] == ns
    own_feats = own.pooler_output
    assert len(own_feats) == 3
    with torch.no_grad():
        for t, f, (_, h, w) in zip(items, own_feats, batch["image_grid_thw"].tolist(), strict=True):
            assert t.grid == (h // Q.MERGE, w // Q.MERGE)
            torch.testing.assert_close(t.feats[0], f, atol=1e-5, rtol=1e-5)
            dv = t.pre.shape[-1] // Q.MERGE**2
            torch.testing.assert_close(visual.merger(t.pre[0].reshape(-1, dv)), t.feats[0], atol=1e-5, rtol=1e-5)

        # naive reference: per image, softmax over the image's patches, mean over heads and queries
        attn = block.attn
        x = block.norm1(inputs["h"])
        q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, *inputs["position_embeddings"])
        bounds = inputs["cu_seqlens"].tolist()
        assert len(bounds) == 4  # the scoring block attends over whole images
        per_patch = torch.cat([
            torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * attn.head_dim**-0.5, -1).mean(dim=(0, 1))
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)])
        per_token = per_patch.view(-1, Q.MERGE**2).mean(dim=1)
    if family == "qwen2_5_vl":  # the tower runs in window order: its own index, independent of the adapter's
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(batch["image_grid_thw"], spatial_merge_size=Q.MERGE,
                                           window_size=visual.window_size, patch_size=visual.patch_size, kwargs={})
        assert not torch.equal(index, torch.arange(len(index)))  # the order undo is exercised
        per_token = per_token[torch.argsort(index)]
    got = torch.cat([t.cls_attn[0] for t in items])
    torch.testing.assert_close(got, per_token, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(got.view(-1).split(ns)[0].sum(), torch.tensor(1.0 / Q.MERGE**2), atol=1e-4, rtol=0)


# ---- 3. stage 1 == masking ----------------------------------------------------------------------------------

def test_stage1_equals_masking_the_dropped_tokens(family):
    """Dropping visual tokens == attending to none of them in the unpruned model at the original 3-D positions."""
    check_stage1_equals_masking(Q.model(family), Q.batch(family), 0.4, 1e-4)


# ---- 4. ratio budgets -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage1", ["fastervlm", "pool"])
def test_ratio_budgets_are_per_image_at_each_stage(family, stage1):
    """round(r * N_i) per image at both stages; fastervlm ranks by the [CLS]-free attention, pool uses the grid."""
    batch = Q.batch(family)
    ns = n_tokens(batch)
    n1, n2 = 0.37, 0.13
    with torch.no_grad():
        out = PrunedVLM(Q.model(family), PruningPlan(stage1=stage1, n1=n1, stage2="fastv", n2=n2, layer=LAYER)
                        )(**batch)
    kept = out.pruning.kept
    assert out.pruning.num_tokens == ns
    for stage, ratio in (("stage1", n1), ("stage2", n2)):
        counts = rounded(ratio, ns)
        assert [len(k) for k in kept[stage]] == counts == out.pruning.budgets[stage]
        for k, n in zip(kept[stage], ns, strict=True):
            assert torch.equal(k, k.unique()) and int(k.max()) < n
    for k1, k2 in zip(kept["stage1"], kept["stage2"], strict=True):
        assert bool(torch.isin(k2, k1).all())
    if stage1 == "pool":  # spread over the whole grid: rows from the top to the bottom band of each image
        for k, (_, h, w) in zip(kept["stage1"], batch["image_grid_thw"].tolist(), strict=True):
            rows = k // (w // Q.MERGE)
            assert int(rows.min()) <= 1 and int(rows.max()) >= h // Q.MERGE - 2
    assert torch.isfinite(out.logits).all()


# ---- 5. bf16 ------------------------------------------------------------------------------------------------------

def test_bf16_keep_all_equals_unpruned_and_pruned_is_finite(family):
    model = copy.deepcopy(Q.model(family)).to(torch.bfloat16)
    batch = Q.batch(family, torch.bfloat16)
    with torch.no_grad():
        ref = model(**batch).logits
        out = PrunedVLM(model, PruningPlan(**KEEP_ALL))(**batch).logits
        assert ref.dtype == torch.bfloat16
        assert torch.equal(out, ref)
        pruned = PrunedVLM(model, PruningPlan(stage1="fastervlm", n1=0.4, stage2="fastv", n2=0.2, layer=LAYER))
        result = pruned(**batch)
    assert torch.isfinite(result.logits).all()
    assert [len(k) for k in result.pruning.kept["stage2"]] == rounded(0.2, n_tokens(batch))


# ---- 6. generation ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cached_generate_equals_cache_free_recompute(family):
    _cache_free_check(Q.model(family), Q.processor(family), Q.batch(family), PLAN)
