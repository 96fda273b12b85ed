"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: variable tokens per image, M-RoPE, DeepStack, video.

Every property is checked on each family with tiny random models built in code (data/tiny.py) and the families'
real processors: images of different sizes in one batch (N_i differ), prompts with one and two images, left
padding. References are the unpruned model (keep-all), the unpruned model with the dropped tokens masked at their
original 3-D positions (stage 1), cache-free greedy recomputation (generation) and eager attention rows (stage 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import eager_text_to_vision
from data.tiny import QWEN_FAMILIES, qwen_patch_size, tiny_qwen, tiny_qwen_processor, tiny_qwen_tokenizer
from modules.budget import resolve_budget
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.scorers import DEFAULT_SCORERS, Scorer, Stage2Context
from modules.selectors import DEFAULT_SELECTORS
from modules.vlm import get_adapter

# a tiny random vocabulary may emit a visual placeholder, which would not match any image on the next step
SUPPRESS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
GEN = {"max_new_tokens": 4, "do_sample": False}
SIZES = [(100, 60), (64, 130), (90, 90)]  # (width, height): 8, 10 and 9 merged tokens (Qwen2/2.5)
LAYER = 3  # Qwen3-VL adds DeepStack features after layers 0-2: stage 2 prunes from layer 3 on
PLAN = dict(stage1="random", n1=0.6, stage2="fastv", n2=0.3, layer=LAYER)


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def qwen(family):
    tokenizer = tiny_qwen_tokenizer(family=family)
    processor = tiny_qwen_processor(family, tokenizer)
    models = {impl: tiny_qwen(family, tokenizer, attn_implementation=impl) for impl in ("eager", "sdpa")}
    return processor, models


def images(sizes=SIZES):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def prompt(processor, n_images: int, text: str) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def image_batch(processor, counts=(1, 2), sizes=SIZES):
    """Batch 2: a one-image and a two-image prompt (left padded), images of three sizes."""
    texts = [prompt(processor, c, t) for c, t in zip(counts, ("red", "compare two and"), strict=False)]
    return processor(images=images(sizes[:sum(counts)]), text=texts, return_tensors="pt", padding=True)


def video_batch(processor, family, frames=(2, 3)):
    """Batch 2 of one video each, built by hand (Qwen's video processors need torchvision): random patches for
    clips of `frames` temporal patches over 4 x 6 and 6 x 4 patch grids; Qwen3-VL separates frames with text like
    its timestamps, Qwen2-VL / 2.5-VL place a clip's tokens contiguously."""
    tok = processor.tokenizer
    patch = qwen_patch_size(family)
    grids = torch.tensor([[frames[0], 4, 6], [frames[1], 6, 4]])
    pad = "<|video_pad|>"
    texts = []
    for t, h, w in grids.tolist():
        per_frame = h * w // 4
        if family == "qwen3_vl":
            body = "".join(f"one <|vision_start|>{pad * per_frame}<|vision_end|>" for _ in range(t))
        else:
            body = f"<|vision_start|>{pad * (t * per_frame)}<|vision_end|>"
        texts.append(f"<|im_start|>user\n{body}red<|im_end|>\n<|im_start|>assistant\n")
    enc = tok(texts, return_tensors="pt", padding=True)
    ids = enc["input_ids"]
    torch.manual_seed(0)
    batch = {"input_ids": ids, "attention_mask": enc["attention_mask"],
             "mm_token_type_ids": (ids == tok.convert_tokens_to_ids(pad)).long() * 2,
             "pixel_values_videos": torch.randn(int(grids.prod(dim=1).sum()), 3 * 2 * patch * patch),
             "video_grid_thw": grids}
    if family == "qwen2_5_vl":
        batch["second_per_grid_ts"] = torch.tensor([1.0, 1.0])
    return batch


@dataclass
class ReplayScorer(Scorer):
    """Keeps the given stage-2 tokens of every item (replays an earlier selection)."""

    kept: list[torch.Tensor]
    items: list[tuple[int, int]]  # (row, image in row) per item

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        out = torch.zeros(ctx.vision_index.shape)
        for (row, image), kept in zip(self.items, self.kept, strict=True):
            on = (ctx.vision_image[row] == image) & torch.isin(ctx.vision_index[row], kept)
            out[row] += on.float()
        return out


def item_places(model, batch, video: str = "clip"):
    """(row, place among the row's items) of every visual item of a batch."""
    pruned = PrunedVLM(model, PruningPlan(video=video))
    vision, _ = pruned.split_vision(batch)
    places, seen = [], {}
    for row, _ in pruned.adapter.item_spans(batch["input_ids"], vision):
        places.append((row, seen.get(row, 0)))
        seen[row] = seen.get(row, 0) + 1
    return places


# ---- equalities ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("plan", [
    PruningPlan(stage1="random", n1=1.0),
    PruningPlan(stage1="random", n1=1.0, stage2="fastv", n2=1.0, layer=LAYER),
], ids=["stage1", "stage1+2"])
def test_keep_all_equals_unpruned(qwen, impl, plan):
    processor, models = qwen
    model = models[impl]
    batch = image_batch(processor)
    assert len(set(batch["image_grid_thw"].prod(dim=1).tolist())) == 3  # three different N_i
    with torch.no_grad():
        ref = model(**batch).logits
        out = PrunedVLM(model, plan)(**batch)
    assert torch.equal(out.logits, ref)
    assert torch.equal(out.pruning.positions, torch.arange(ref.shape[1]).expand(2, -1))


def test_keep_all_needs_deepstack_on_qwen3(qwen, family):
    """Keep-all equality is not an accident of Qwen3-VL: without DeepStack features the logits differ."""
    if family != "qwen3_vl":
        pytest.skip("DeepStack is Qwen3-VL's")
    processor, models = qwen
    batch = image_batch(processor)
    pruned = PrunedVLM(models["sdpa"], PruningPlan(stage1="random", n1=1.0))
    with torch.no_grad():
        ref = models["sdpa"](**batch).logits
        pruned.adapter.language_kwargs = lambda spliced: {}
        out = pruned(**batch).logits
    assert not torch.allclose(out, ref, atol=1e-3)


def test_ratio_budgets_are_per_image_at_each_stage(qwen):
    processor, models = qwen
    batch = image_batch(processor)
    n_tokens = (batch["image_grid_thw"].prod(dim=1) // 4).tolist()
    with torch.no_grad():
        out = PrunedVLM(models["sdpa"], PruningPlan(**PLAN))(**batch)
    kept = out.pruning.kept
    assert out.pruning.num_tokens == n_tokens
    for stage, ratio in (("stage1", PLAN["n1"]), ("stage2", PLAN["n2"])):
        counts = [int(np.floor(ratio * n + 0.5)) for n in n_tokens]
        assert [len(k) for k in kept[stage]] == counts == out.pruning.budgets[stage]
        for k, n in zip(kept[stage], n_tokens, strict=True):
            assert torch.equal(k, k.unique()) and int(k.max()) < n  # sorted, distinct, in range
    assert isinstance(kept["stage1"], list)  # counts differ: one tensor per image
    for k1, k2 in zip(kept["stage1"], kept["stage2"], strict=True):
        assert bool(torch.isin(k2, k1).all())
    # an int budget is per image and capped at N_i
    assert resolve_budget(5, min(n_tokens)) == 5


def check_stage1_equals_masking(model, batch, n1: float, tol: float) -> None:
    """Dropping visual tokens == attending to none of them in the unpruned model at the original 3-D positions."""
    pruned = PrunedVLM(model, PruningPlan(stage1="random", n1=n1))
    with torch.no_grad():
        out = pruned(**batch).logits
        positions = pruned.last_positions
        real = positions >= 0
        kept_mask = torch.zeros_like(batch["attention_mask"])
        kept_mask[real.nonzero()[:, 0], positions[real]] = 1
        assert int((kept_mask * batch["attention_mask"]).sum()) < int(batch["attention_mask"].sum())
        original = pruned.adapter.default_position_ids(batch["input_ids"], batch["attention_mask"], False,
                                                       dict(batch))
        ref = model(**{**batch, "attention_mask": batch["attention_mask"] * kept_mask}, position_ids=original).logits
    expected = ref.gather(1, positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    real &= batch["attention_mask"].gather(1, positions.clamp(min=0)).bool()
    torch.testing.assert_close(out[real], expected[real], atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_stage1_equals_masking_the_dropped_tokens(qwen, impl):
    processor, models = qwen
    check_stage1_equals_masking(models[impl], image_batch(processor), 0.5, 1e-5)


def generation(processor) -> dict:
    return {**GEN, "suppress_tokens": processor.tokenizer.convert_tokens_to_ids(SUPPRESS)}


def _cache_free_check(model, processor, batch, plan_kwargs, video: str = "clip"):
    pruned = PrunedVLM(model, PruningPlan(**plan_kwargs, video=video))
    suppress = processor.tokenizer.convert_tokens_to_ids(SUPPRESS)
    out = pruned.generate(**batch, **generation(processor), output_scores=True, return_dict_in_generate=True)
    kept = out.pruning.kept
    prompt_len = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :prompt_len], batch["input_ids"])
    replay_plan = {**plan_kwargs, "stage2": ReplayScorer(list(kept["stage2"]), item_places(model, batch, video))}
    replay = PrunedVLM(model, PruningPlan(**replay_plan, video=video))
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    prompt_positions = replay.adapter.default_position_ids(ids, mask, True, {**vision, "mm_token_type_ids": types})
    positions = prompt_positions
    for step in range(GEN["max_new_tokens"]):
        with torch.no_grad():
            logits = replay(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, position_ids=positions,
                            use_cache=False, **vision).logits
        logits[:, -1, suppress] = float("-inf")
        for a, b in zip(replay.last_kept["stage2"], kept["stage2"], strict=True):
            assert torch.equal(a, b)
        torch.testing.assert_close(logits[:, -1], out.scores[step], atol=1e-5, rtol=1e-5)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        types = torch.cat([types, torch.zeros_like(types[:, :1])], dim=1)
        positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)  # text after the prompt: +1 per axis
    assert torch.equal(ids, out.sequences)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_generate_equals_cache_free_recompute(qwen, impl):
    processor, models = qwen
    _cache_free_check(models[impl], processor, image_batch(processor), PLAN)


@pytest.mark.parametrize("video", ["clip", "frame"])
def test_cached_generate_on_video_equals_cache_free_recompute(qwen, family, video):
    processor, models = qwen
    batch = video_batch(processor, family)
    model = models["sdpa"]
    _cache_free_check(model, processor, batch, PLAN, video)
    pruned = PrunedVLM(model, PruningPlan(**PLAN, video=video))
    with torch.no_grad():
        out = pruned(**batch)
    grids = batch["video_grid_thw"]
    if video == "clip":  # the budget counts the clip's tokens
        expected = [int(np.floor(PLAN["n1"] * n + 0.5)) for n in (grids.prod(dim=1) // 4).tolist()]
    else:  # one budget per frame
        expected = [int(np.floor(PLAN["n1"] * (h * w // 4) + 0.5)) for t, h, w in grids.tolist() for _ in range(t)]
    assert out.pruning.budgets["stage1"] == expected


def test_keep_all_video_equals_unpruned(qwen, family):
    processor, models = qwen
    batch = video_batch(processor, family)
    for video in ("clip", "frame"):
        with torch.no_grad():
            ref = models["eager"](**batch).logits
            out = PrunedVLM(models["eager"], PruningPlan(stage1="random", n1=1.0, stage2="fastv", n2=1.0,
                                                         layer=LAYER, video=video))(**batch).logits
        assert torch.equal(out, ref)


def test_batch_equals_single_runs(qwen):
    processor, models = qwen
    model = models["sdpa"]
    batch = image_batch(processor)
    pruned = PrunedVLM(model, PruningPlan(**PLAN))
    with torch.no_grad():
        batched = pruned(**batch).logits[:, -1]
    kept = {k: list(v) for k, v in pruned.last_kept.items()}
    generated = pruned.generate(**batch, **generation(processor))[:, batch["input_ids"].shape[1]:]
    first = 0
    for row, (count, text) in enumerate(((1, "red"), (2, "compare two and"))):
        single = processor(images=images()[first:first + count], text=[prompt(processor, count, text)],
                           return_tensors="pt")
        with torch.no_grad():
            logits = pruned(**single).logits[:, -1]
        for stage in ("stage1", "stage2"):
            for j in range(count):
                assert torch.equal(pruned.last_kept[stage][j], kept[stage][first + j])
        torch.testing.assert_close(logits[0], batched[row], atol=1e-5, rtol=1e-5)
        gen = pruned.generate(**single, **generation(processor))[0, single["input_ids"].shape[1]:]
        assert torch.equal(gen, generated[row])
        first += count


@pytest.mark.parametrize("query", ["last", "text"])
def test_stage2_scores_equal_eager_attention(qwen, query):
    """Scores recomputed from q/k (M-RoPE, Qwen3's q/k norms) on an SDPA model == the eager attention rows."""
    processor, models = qwen
    batch = image_batch(processor)
    plan = dict(stage1="random", n1=0.6, stage2={"name": "fastv", "query": query}, n2=0.3, layer=3)
    pruned = PrunedVLM(models["sdpa"], PruningPlan(**plan))
    with torch.no_grad():
        pruned(**batch)
    scores = pruned.last_stage2_scores
    reference = PrunedVLM(models["eager"], PruningPlan(stage1="random", n1=0.6))
    with torch.no_grad():
        out = reference(**batch, output_attentions=True)
    positions = reference.last_positions
    image_id = models["eager"].config.image_token_id
    ids = batch["input_ids"].gather(1, positions.clamp(min=0)).masked_fill(positions < 0, -1)
    mask = batch["attention_mask"].gather(1, positions.clamp(min=0)) * (positions >= 0)
    expected = eager_text_to_vision(out.attentions[2], ids, mask, image_id, query)
    for b in range(ids.shape[0]):
        torch.testing.assert_close(scores[b, :len(expected[b])], expected[b], atol=1e-5, rtol=0)


def test_mean_query_attention_equals_eager_vision_attention(qwen, family):
    """The [CLS]-free attention score == the mean over queries of the eager tower's attention, per merged token."""
    processor, models = qwen
    batch = image_batch(processor)
    model = models["eager"]
    adapter = get_adapter(model)
    visual = model.model.visual
    block = adapter._score_block()
    captured = {}

    def keep_weights(module, args, kwargs, output):
        captured["weights"] = output[1] if isinstance(output, tuple) and len(output) > 1 else None

    pruned = PrunedVLM(model, PruningPlan())
    with torch.no_grad():
        encoded = pruned.encode(batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    # eager reference: the block's attention per image, from the same captured input, by the naive formula
    inputs = {}
    handle = visual.blocks[block].register_forward_pre_hook(
        lambda m, a, k: inputs.update(h=a[0] if a else k["hidden_states"], **k), with_kwargs=True)
    with torch.no_grad():
        out = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"], return_dict=True)
    handle.remove()
    attn = visual.blocks[block].attn
    x = visual.blocks[block].norm1(inputs["h"])
    q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    import sys
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, *inputs["position_embeddings"])
    bounds = inputs["cu_seqlens"].tolist()
    per_patch = torch.cat([torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * attn.scaling, -1)
                           .mean(dim=(0, 1)) for s, e in zip(bounds[:-1], bounds[1:], strict=True)])
    per_token = per_patch.view(-1, 4).mean(dim=1)
    if family == "qwen2_5_vl":
        per_token = per_token[torch.argsort(adapter._window_index(batch["image_grid_thw"]))]
    got = torch.cat([t.cls_attn[0] for t in encoded.items()])
    torch.testing.assert_close(got, per_token, atol=1e-6, rtol=1e-5)
    # and `pre` is what the merger turns into the features the language model receives
    merged = torch.cat([t.feats[0] for t in encoded.items()])
    torch.testing.assert_close(merged, out.pooler_output, atol=1e-6, rtol=1e-5)
    for t in encoded.items():
        torch.testing.assert_close(visual.merger(t.pre[0].reshape(-1, t.pre.shape[-1] // 4)), t.feats[0],
                                   atol=1e-5, rtol=1e-5)


# ---- every method on every family ------------------------------------------------------------------------------

@pytest.mark.parametrize("selector", DEFAULT_SELECTORS, ids=lambda s: type(s).__name__)
def test_every_default_selector_runs(qwen, selector):
    processor, models = qwen
    batch = image_batch(processor)
    with torch.no_grad():
        out = PrunedVLM(models["sdpa"], PruningPlan(stage1=selector, n1=0.5))(**batch)
    n_tokens = out.pruning.num_tokens
    for k, n in zip(out.pruning.kept["stage1"], n_tokens, strict=True):
        assert len(k) == int(np.floor(0.5 * n + 0.5)) and torch.equal(k, k.unique()) and int(k.max()) < n
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("scorer", DEFAULT_SCORERS, ids=lambda s: type(s).__name__)
def test_every_default_scorer_runs(qwen, scorer):
    processor, models = qwen
    batch = image_batch(processor)
    with torch.no_grad():
        out = PrunedVLM(models["sdpa"], PruningPlan(stage1="random", n1=0.8, stage2=scorer, n2=0.4, layer=LAYER)
                        )(**batch)
    for k, n in zip(out.pruning.kept["stage2"], out.pruning.num_tokens, strict=True):
        assert len(k) == int(np.floor(0.4 * n + 0.5))
    assert torch.isfinite(out.logits).all()


def test_deepstack_refuses_an_early_stage2_layer(qwen, family):
    processor, models = qwen
    if family != "qwen3_vl":
        pytest.skip("DeepStack is Qwen3-VL's")
    with pytest.raises(ValueError, match="DeepStack"):
        PrunedVLM(models["sdpa"], PruningPlan(stage1="random", n1=0.5, stage2="fastv", n2=0.25, layer=2))


def test_missing_mm_token_type_ids_raise(qwen):
    processor, models = qwen
    batch = dict(image_batch(processor))
    batch.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        PrunedVLM(models["sdpa"], PruningPlan(**PLAN))(**batch)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_stage2_pads_rows_the_model_left_unpadded(qwen, family, impl):
    """Rows without any padding keep equal counts after stage 1 but different counts after stage 2 (one 16-token
    image vs two 8-token ones): the model built no mask (nothing was padded), so the filler rows stage 2 adds
    must be masked by a mask built for them, in prefill and in every decoding step."""
    processor, models = qwen
    texts = [prompt(processor, 1, "red two and"), prompt(processor, 2, "red")]
    patch = 2 * qwen_patch_size(family)  # one merged token
    sizes = [(4 * patch, 4 * patch), (4 * patch, 2 * patch), (2 * patch, 4 * patch)]
    batch = processor(images=images(sizes), text=texts, return_tensors="pt", padding=True)
    assert bool(batch["attention_mask"].all())  # nothing to pad: the model's own mask is skipped
    assert (batch["image_grid_thw"].prod(dim=1) // 4).tolist() == [16, 8, 8]
    plan = dict(stage1="random", n1=0.5, stage2="fastv", n2=0.3, layer=LAYER)
    with torch.no_grad():
        out = PrunedVLM(models[impl], PruningPlan(**plan))(**batch)
    assert out.pruning.budgets == {"stage1": [8, 4, 4], "stage2": [5, 2, 2]}
    assert int((out.pruning.positions < 0).sum()) == 1  # row 1 keeps 4 visual tokens, row 0 keeps 5
    _cache_free_check(models[impl], processor, batch, plan)
    # the independent reference: each row alone has no filler row at all
    pruned = PrunedVLM(models[impl], PruningPlan(**plan))
    generated = pruned.generate(**batch, **generation(processor))[:, batch["input_ids"].shape[1]:]
    for row, picked in enumerate(([0], [1, 2])):
        single = processor(images=[images(sizes)[i] for i in picked], text=[texts[row]], return_tensors="pt")
        with torch.no_grad():
            alone = pruned(**single).logits[0, -1]
        torch.testing.assert_close(alone, out.logits[row, -1], atol=1e-5, rtol=1e-5)
        assert torch.equal(pruned.generate(**single, **generation(processor))[0, single["input_ids"].shape[1]:],
                           generated[row])


def test_the_attention_score_is_computed_only_for_selectors_that_read_it(qwen, monkeypatch):
    """A full-attention pass over every patch pair is the price of a [CLS]-free score: a learned head or pool
    does not pay it, FasterVLM (and a debiased FasterVLM) does, and both give the same logits path otherwise."""
    from modules.vlm.qwen import QwenVLAdapter

    processor, models = qwen
    batch = image_batch(processor)
    calls = []
    original = QwenVLAdapter._mean_query_attention
    monkeypatch.setattr(QwenVLAdapter, "_mean_query_attention",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    for stage1, expected in (("pool", 0), ("random", 0), ("fastervlm", 1), ({"name": "debiased"}, 1)):
        calls.clear()
        with torch.no_grad():
            PrunedVLM(models["sdpa"], PruningPlan(stage1=stage1, n1=0.5))(**batch)
        assert len(calls) == expected, stage1
