"""LLaVA-NeXT and LLaVA-OneVision: AnyRes tiles, pinned image-newline tokens, unpadding, per-image budgets.

Tiny random models with the families' real processors (data/tiny.py), images of different aspect ratios in one
batch (different tile grids, so every N_i differs), a one-image and a two-image prompt, left padding. References:
the unpruned model (keep-all), cache-free recomputation (generation), each row alone (batching), eager attention
rows (stage 2), the processor's own pixels (padding validity) and the model's own packing (features).
"""

from __future__ import annotations

import pytest
import torch
from test_qwen import ReplayScorer, item_places

from conftest import eager_text_to_vision, make_images
from data.tiny import (
    tiny_llava_next,
    tiny_llava_next_processor,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
    tiny_llava_onevision_tokenizer,
    tiny_tokenizer,
)
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.scorers import DEFAULT_SCORERS
from modules.selectors import DEFAULT_SELECTORS
from modules.vlm import get_adapter

FAMILIES = ("llava_next", "llava_onevision")
SIZES = ((40, 20), (20, 60), (50, 30))  # (width, height): three aspect ratios, three tile grids
TEXTS = ["<image> what is it ?", "<image> and <image> same ?"]
GEN = {"max_new_tokens": 4, "do_sample": False}
PLAN = dict(stage1="random", n1=0.5, stage2="fastv", n2=0.25, layer=2)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def anyres(family):
    if family == "llava_next":
        tokenizer = tiny_tokenizer()
        processor = tiny_llava_next_processor(tokenizer)
        build = tiny_llava_next
    else:
        tokenizer = tiny_llava_onevision_tokenizer()
        processor = tiny_llava_onevision_processor(tokenizer)
        build = tiny_llava_onevision
    processor.tokenizer.padding_side = "left"
    return processor, {impl: build(tokenizer, attn_implementation=impl) for impl in ("eager", "sdpa")}


def prompts(processor, images_per_prompt, texts, images=None):
    """Processor inputs; OneVision takes images nested per prompt (several per prompt: one view each)."""
    images = make_images(SIZES) if images is None else images
    nested, at = [], 0
    for count in images_per_prompt:
        nested.append(images[at:at + count])
        at += count
    flat = type(processor).__name__.startswith("LlavaNext")
    return processor(images=[i for group in nested for i in group] if flat else nested, text=texts,
                     return_tensors="pt", padding=True)


def batch_of(processor):
    return prompts(processor, (1, 2), TEXTS)


def test_images_get_different_token_counts_and_newlines_are_pinned(anyres):
    processor, models = anyres
    batch = batch_of(processor)
    pruned = PrunedVLM(models["sdpa"], PruningPlan(**PLAN))
    vision, _ = pruned.split_vision(batch)
    encoded = pruned.encode(**vision)
    runs = [n for _, n in pruned.adapter.visual_items(vision)]
    assert len(set(encoded.lengths)) > 1 or len(set(runs)) > 1
    # every pinned token is an image_newline feature, every content token is not
    newline = models["sdpa"].model.image_newline
    for item, pinned in zip(encoded.items(), encoded.pinned, strict=True):
        assert pinned.pinned_at.numel() >= 1 and torch.equal(pinned.feats, newline.expand_as(pinned.feats))
        assert item.num_tokens + pinned.pinned_at.numel() == pinned.run_length
    # the model's own packed features, with newlines, are what the adapter splits into content and pinned
    with torch.no_grad():
        packed = models["sdpa"].model.get_image_features(**{k: v for k, v in batch.items()
                                                              if k in ("pixel_values", "image_sizes",
                                                                       "batch_num_images")}).pooler_output
    for feats, item, pinned in zip(packed, encoded.items(), encoded.pinned, strict=True):
        assert torch.equal(feats[pinned.content_at], item.feats[0])
        assert torch.equal(feats[pinned.pinned_at], pinned.feats)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("plan", [
    PruningPlan(stage1="random", n1=1.0),
    PruningPlan(stage1="random", n1=1.0, stage2="fastv", n2=1.0, layer=2),
], ids=["stage1", "stage1+2"])
def test_keep_all_equals_unpruned(anyres, impl, plan):
    processor, models = anyres
    batch = batch_of(processor)
    with torch.no_grad():
        ref = models[impl](**batch).logits
        out = PrunedVLM(models[impl], plan)(**batch).logits
    assert torch.equal(out, ref)


def test_ratio_budgets_count_content_tokens_and_newlines_always_stay(anyres):
    processor, models = anyres
    batch = batch_of(processor)
    pruned = PrunedVLM(models["sdpa"], PruningPlan(**PLAN))
    with torch.no_grad():
        out = pruned(**batch)
    vision, _ = pruned.split_vision(batch)
    encoded = pruned.encode(**vision)
    assert out.pruning.num_tokens == encoded.lengths  # content tokens only: newlines are not counted
    for stage, ratio in (("stage1", 0.5), ("stage2", 0.25)):
        expected = [max(1, int(ratio * n + 0.5)) for n in encoded.lengths]
        assert [len(k) for k in out.pruning.kept[stage]] == expected == out.pruning.budgets[stage]
    # every image_newline placeholder survives both stages, at its original position
    runs = pruned.adapter.item_spans(batch["input_ids"], vision)
    for (row, run), pinned in zip(runs, encoded.pinned, strict=True):
        assert bool(torch.isin(run[pinned.pinned_at], out.pruning.positions[row]).all())


def test_stage1_equals_masking_the_dropped_tokens(anyres):
    processor, models = anyres
    batch = batch_of(processor)
    for impl, model in models.items():
        pruned = PrunedVLM(model, PruningPlan(stage1="random", n1=0.4))
        with torch.no_grad():
            out = pruned(**batch).logits
            positions = pruned.last_positions
            real = positions >= 0
            kept = torch.zeros_like(batch["attention_mask"])
            kept[real.nonzero()[:, 0], positions[real]] = 1
            assert int((kept * batch["attention_mask"]).sum()) < int(batch["attention_mask"].sum())
            ref = model(**{**batch, "attention_mask": batch["attention_mask"] * kept},
                        position_ids=torch.arange(batch["input_ids"].shape[1]).expand(2, -1)).logits
        expected = ref.gather(1, positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
        real &= batch["attention_mask"].gather(1, positions.clamp(min=0)).bool()
        torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5, msg=impl)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_generate_equals_cache_free_recompute(anyres, impl):
    processor, models = anyres
    model = models[impl]
    batch = batch_of(processor)
    pruned = PrunedVLM(model, PruningPlan(**PLAN))
    out = pruned.generate(**batch, **GEN, output_scores=True, return_dict_in_generate=True)
    kept = out.pruning.kept
    replay = PrunedVLM(model, PruningPlan(**{**PLAN, "stage2": ReplayScorer(list(kept["stage2"]),
                                                                              item_places(model, batch))}))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    for step in range(GEN["max_new_tokens"]):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = replay(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                            **vision).logits
        for a, b in zip(replay.last_kept["stage2"], kept["stage2"], strict=True):
            assert torch.equal(a, b)
        torch.testing.assert_close(logits[:, -1], out.scores[step], atol=1e-5, rtol=1e-5)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(ids, out.sequences)


def test_batch_equals_single_runs(anyres):
    processor, models = anyres
    model = models["sdpa"]
    batch = batch_of(processor)
    pruned = PrunedVLM(model, PruningPlan(**PLAN))
    with torch.no_grad():
        batched = pruned(**batch).logits[:, -1]
    kept = {k: list(v) for k, v in pruned.last_kept.items()}
    generated = pruned.generate(**batch, **GEN)[:, batch["input_ids"].shape[1]:]
    first = 0
    for row, count in enumerate((1, 2)):
        single = prompts(processor, (count,), [TEXTS[row]], make_images(SIZES)[first:first + count])
        with torch.no_grad():
            logits = pruned(**single).logits[:, -1]
        for stage in ("stage1", "stage2"):
            for j in range(count):
                assert torch.equal(pruned.last_kept[stage][j], kept[stage][first + j])
        torch.testing.assert_close(logits[0], batched[row], atol=1e-5, rtol=1e-5)
        assert torch.equal(pruned.generate(**single, **GEN)[0, single["input_ids"].shape[1]:], generated[row])
        first += count


@pytest.mark.parametrize("query", ["last", "text"])
def test_stage2_scores_equal_eager_attention(anyres, query):
    processor, models = anyres
    batch = batch_of(processor)
    pruned = PrunedVLM(models["sdpa"], PruningPlan(stage1="random", n1=0.5, stage2={"name": "fastv", "query": query},
                                                   n2=0.25, layer=3))
    with torch.no_grad():
        pruned(**batch)
    scores = pruned.last_stage2_scores
    reference = PrunedVLM(models["eager"], PruningPlan(stage1="random", n1=0.5))
    with torch.no_grad():
        out = reference(**batch, output_attentions=True)
    positions = reference.last_positions
    ids = batch["input_ids"].gather(1, positions.clamp(min=0)).masked_fill(positions < 0, -1)
    mask = batch["attention_mask"].gather(1, positions.clamp(min=0)) * (positions >= 0)
    # the newline tokens are image placeholders too but not scored: compare over the content columns
    vision, _ = reference.split_vision(batch)
    encoded = reference.encode(**vision)
    runs = reference.adapter.item_spans(batch["input_ids"], vision)
    for (row, run), pinned in zip(runs, encoded.pinned, strict=True):
        newline = torch.isin(positions[row], run[pinned.pinned_at])
        ids[row] = ids[row].masked_fill(newline, -1)
    expected = eager_text_to_vision(out.attentions[2], ids, mask, models["eager"].config.image_token_id, query)
    for b in range(ids.shape[0]):
        torch.testing.assert_close(scores[b, :len(expected[b])], expected[b], atol=1e-5, rtol=0)


def test_padding_validity_matches_the_processors_pixels(anyres, family):
    """Tokens marked padding are those whose pixels are mostly the processor's pad value, packed like the model
    packs features; sizes chosen so that tiles (and OneVision's square views) carry real padding."""
    processor, models = anyres
    sizes = ((50, 30), (30, 70), (64, 40))
    batch = prompts(processor, (1, 1, 1), ["<image> what is it ?"] * 3, make_images(sizes))
    if family == "llava_onevision":  # several images in a prompt: one pad-to-square view each
        batch = prompts(processor, (1, 2), TEXTS, make_images(sizes))
    pruned = PrunedVLM(models["sdpa"], PruningPlan())
    adapter = pruned.adapter
    vision, _ = pruned.split_vision(batch)
    encoded = pruned.encode(**vision)
    views = adapter._views(vision)
    pixels = torch.cat([p[:v] for p, v in zip(batch["pixel_values"], views, strict=True)])  # (views, C, H, W)
    image_processor = processor.image_processor
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    raw = pixels * std + mean  # back to [0, 1]
    # tiles pad with 0; OneVision's square views with the mean colour as 8-bit integers
    pad_value = 0.0 if family == "llava_next" else (torch.tensor(image_processor.image_mean) * 255).int().view(
        1, 3, 1, 1) / 255
    is_pad = (raw - pad_value).abs().amax(dim=1) < 0.05  # (views, H, W); resampling rings near edges
    # tile views: zero padding; base views are squashed (no padding); OneVision single views pad with the mean
    side = adapter.side
    patch = pixels.shape[-1] // side
    frac = is_pad.float().view(-1, side, patch, side, patch).mean(dim=(2, 4)).view(-1, side * side)
    base = torch.zeros(frac.shape[0], dtype=torch.bool)
    at = 0
    for v in views:
        base[at] = v > 1
        at += v
    frac[base] = 0.0
    sizes_t = torch.as_tensor(vision["image_sizes"]).view(-1, 2)
    # a token is padding when more than half of its pixels are; the pixels decide where they are clear
    clear = ((frac <= 0.25) | (frac >= 0.75)).double()
    token_valid = torch.stack([(frac <= 0.5).double(), clear], dim=-1)
    packed = adapter._pack(list(token_valid.split(views)), sizes_t, torch.ones(2, dtype=torch.float64))
    got = [item.valid_or_all()[0] for item in encoded.items()]
    checked = 0
    for p, pin, g in zip(packed, encoded.pinned, got, strict=True):
        expected, decided = p[pin.content_at, 0] > 0.5, p[pin.content_at, 1] > 0.5
        assert torch.equal(expected[decided], g[decided])
        checked += int(decided.sum())
    assert checked > 0.8 * sum(g.numel() for g in got)
    if family == "llava_onevision":  # square views keep their padding (the model unpads only tiles)
        assert sum(int((~g).sum()) for g in got) > 0
    else:  # NeXT unpads the tile grid to the image's aspect ratio: no token left is mostly padding
        assert all(bool(g.all()) for g in got)


@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=lambda s: type(s).__name__)
def test_every_default_selector_runs(anyres, selector):
    processor, models = anyres
    with torch.no_grad():
        out = PrunedVLM(models["sdpa"], PruningPlan(stage1=selector, n1=0.5))(**batch_of(processor))
    for k, n in zip(out.pruning.kept["stage1"], out.pruning.num_tokens, strict=True):
        assert len(k) == max(1, int(0.5 * n + 0.5)) and torch.equal(k, k.unique()) and int(k.max()) < n
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("scorer", DEFAULT_SCORERS, ids=lambda s: type(s).__name__)
def test_every_default_scorer_runs(anyres, scorer):
    processor, models = anyres
    with torch.no_grad():
        out = PrunedVLM(models["sdpa"], PruningPlan(stage1="random", n1=0.8, stage2=scorer, n2=0.4, layer=2)
                        )(**batch_of(processor))
    for k, n in zip(out.pruning.kept["stage2"], out.pruning.num_tokens, strict=True):
        assert len(k) == max(1, int(0.4 * n + 0.5))
    assert torch.isfinite(out.logits).all()


def test_adapter_is_chosen_by_model_type(anyres, family):
    _, models = anyres
    assert get_adapter(models["sdpa"]).family == family


def test_per_view_selection_gives_each_view_its_budget_and_grid(anyres, family):
    processor, models = anyres
    batch = batch_of(processor)
    for impl in ("eager", "sdpa"):
        with torch.no_grad():
            ref = models[impl](**batch).logits
            keep_all = PrunedVLM(models[impl], PruningPlan(stage1="random", n1=1.0, views="view"))(**batch).logits
        assert torch.equal(keep_all, ref)
    pruned = PrunedVLM(models["sdpa"], PruningPlan(stage1="pool", n1=0.5, stage2="fastv", n2=0.25, layer=2,
                                                   views="view"))
    vision, _ = pruned.split_vision(batch)
    encoded = pruned.encode(**vision)
    joint = PrunedVLM(models["sdpa"], PruningPlan()).encode(**vision)
    views = pruned.adapter._views(vision)
    assert encoded.num_items == sum(2 if v > 1 else 1 for v in views)  # base view + tile grid per tiled image
    side = pruned.adapter.side
    grids = [item.grid for item in encoded.items()]
    assert all(g[0] * g[1] == item.num_tokens for g, item in zip(grids, encoded.items(), strict=True))
    assert (side, side) in grids and any(g != (side, side) for g in grids)
    # the views of an image hold exactly that image's content tokens, in the same order
    at = 0
    for i, v in enumerate(views):
        parts = encoded.items()[at:at + (2 if v > 1 else 1)]
        at += len(parts)
        assert torch.equal(torch.cat([p.feats[0] for p in parts]), joint.items()[i].feats[0])
    with torch.no_grad():
        out = pruned(**batch)
    for stage, ratio in (("stage1", 0.5), ("stage2", 0.25)):
        assert out.pruning.budgets[stage] == [max(1, int(ratio * n + 0.5)) for n in encoded.lengths]


def video_batch(processor, frames=2):
    """Two OneVision video prompts built by hand (its video processor needs torchvision): random frames; each video
    is frames x ceil(side/2)^2 pooled tokens and one newline."""
    tok = processor.tokenizer
    per_video = frames * 4 + 1  # tiny tower: 4 x 4 tokens per frame, pooled to 2 x 2
    texts = ["<video>" * per_video + " what is it ?", "<video>" * per_video + " is it red and blue ?"]
    enc = tok(texts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    return {**enc, "pixel_values_videos": torch.randn(2, frames, 3, 32, 32)}


@pytest.mark.parametrize("video", ["clip", "frame"])
def test_onevision_video_per_clip_or_frame(anyres, family, video):
    if family != "llava_onevision":
        pytest.skip("video is OneVision's")
    processor, models = anyres
    batch = video_batch(processor)
    for impl in ("eager", "sdpa"):
        with torch.no_grad():
            ref = models[impl](**batch).logits
            out = PrunedVLM(models[impl], PruningPlan(stage1="random", n1=1.0, stage2="fastv", n2=1.0, layer=2,
                                                      video=video))(**batch).logits
        assert torch.equal(out, ref)
    model = models["sdpa"]
    plan = PruningPlan(**PLAN, video=video)
    pruned = PrunedVLM(model, plan)
    out = pruned.generate(**batch, **GEN, output_scores=True, return_dict_in_generate=True)
    assert out.pruning.num_tokens == ([8, 8] if video == "clip" else [4, 4, 4, 4])
    assert out.pruning.budgets["stage1"] == ([4, 4] if video == "clip" else [2, 2, 2, 2])
    places = item_places(model, batch) if video == "clip" else [(0, 0), (0, 1), (1, 0), (1, 1)]
    replay = PrunedVLM(model, PruningPlan(**{**PLAN, "stage2": ReplayScorer(list(out.pruning.kept["stage2"]), places)},
                                          video=video))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for step in range(GEN["max_new_tokens"]):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = replay(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                            pixel_values_videos=batch["pixel_values_videos"]).logits
        torch.testing.assert_close(logits[:, -1], out.scores[step], atol=1e-5, rtol=1e-5)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(ids, out.sequences)


def test_attention_scores_equal_the_eager_towers_per_view(anyres, family):
    """NeXT: each view's CLIP [CLS] attention; OneVision: the mean over queries of SigLIP's attention (no [CLS]),
    both from the eager tower's own attention weights, packed like the model packs features."""
    processor, models = anyres
    batch = batch_of(processor)
    model = models["eager"]
    pruned = PrunedVLM(model, PruningPlan())
    vision, _ = pruned.split_vision(batch)
    encoded = pruned.encode(**vision)
    adapter = pruned.adapter
    views = adapter._views(vision)
    pixels = torch.cat([p[:v] for p, v in zip(batch["pixel_values"], views, strict=True)])
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    layer = model.config.vision_feature_layer
    weights = out.attentions[(layer % (len(out.hidden_states))) - 1]  # (views, H, L, L) of the feature layer
    if family == "llava_next":
        per_token = weights[:, :, 0, 1:].mean(dim=1)
    else:
        per_token = weights.mean(dim=(1, 2))
    sizes = torch.as_tensor(vision["image_sizes"]).view(-1, 2)
    packed = adapter._pack(list(per_token.unsqueeze(-1).split(views)), sizes, torch.zeros(1))
    for p, pin, item in zip(packed, encoded.pinned, encoded.items(), strict=True):
        torch.testing.assert_close(item.cls_attn[0], p[pin.content_at, 0], atol=1e-6, rtol=1e-5)
