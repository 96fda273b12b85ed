"""Two-stage pruned inference on a tiny random LLaVA: equalities against the unpruned and cache-free references."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from conftest import PROMPTS, make_images
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.scorers import Scorer, Stage2Context
from modules.vlm import get_adapter

N = 16  # tiny LLaVA: 32-pixel images, 8-pixel patches -> 4 x 4 grid
GEN = {"max_new_tokens": 6, "do_sample": False}


@dataclass
class ReplayScorer(Scorer):
    """Stage-2 scorer that keeps a fixed set of visual tokens per row (replays an earlier selection)."""

    kept: torch.Tensor  # (B, n2) indices into the N visual tokens

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        return (ctx.vision_index.unsqueeze(-1) == self.kept.unsqueeze(1)).any(-1).float()


def model_for(request, impl):
    return request.getfixturevalue(f"{impl}_model")


def text_inputs(batch):
    return {k: v for k, v in batch.items() if k != "image_sizes"}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("plan", [
    PruningPlan(),
    PruningPlan(stage1="random", n1=N, stage2="fastv", n2=N, layer=2),
    PruningPlan(stage1="random", n1=1.0, stage2="fastv", n2=1.0, layer=1),
], ids=["no-stages", "keep-all-counts", "keep-all-ratios"])
def test_keep_all_equals_unpruned(request, impl, plan, batch):
    model = model_for(request, impl)
    inputs = text_inputs(batch)
    with torch.no_grad():
        ref = model(**inputs).logits
        out = PrunedVLM(model, plan)(**inputs).logits
    assert torch.equal(out, ref)


def test_keep_all_generate_equals_unpruned(sdpa_model, batch):
    inputs = text_inputs(batch)
    ref = sdpa_model.generate(**inputs, **GEN)
    plan = PruningPlan(stage1="random", n1=N, stage2="fastv", n2=N, layer=2)
    assert torch.equal(PrunedVLM(sdpa_model, plan).generate(**inputs, **GEN), ref)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("query", ["last", "text"])
def test_cached_generate_equals_cache_free_recompute(request, impl, query, batch):
    model = model_for(request, impl)
    plan = PruningPlan(stage1="random", n1=8, stage2={"name": "fastv", "query": query}, n2=4, layer=2)
    pruned = PrunedVLM(model, plan)
    out = pruned.generate(**batch, **GEN, output_scores=True, return_dict_in_generate=True)
    kept = pruned.last_kept
    prompt_len = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :prompt_len], batch["input_ids"])

    # cache-free reference: rerun the whole pruned model on prompt + tokens so far, with the same selections
    replay = PrunedVLM(model, PruningPlan(stage1="random", n1=8, stage2=ReplayScorer(kept["stage2"]), n2=4,
                                          layer=2))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for step in range(GEN["max_new_tokens"]):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = replay(input_ids=ids, pixel_values=batch["pixel_values"], attention_mask=mask,
                            position_ids=positions, image_sizes=batch["image_sizes"], use_cache=False).logits
        assert torch.equal(replay.last_kept["stage2"], kept["stage2"])
        torch.testing.assert_close(logits[:, -1], out.scores[step], atol=1e-5, rtol=1e-5)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(ids, out.sequences)


def test_stage2_prunes_the_kv_cache_of_late_layers(sdpa_model, batch):
    plan = PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4, layer=2)
    inputs = text_inputs(batch)
    with torch.no_grad():
        out = PrunedVLM(sdpa_model, plan)(**inputs, use_cache=True)
    prompt_len = inputs["input_ids"].shape[1]
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [prompt_len - (N - 8)] * 2 + [prompt_len - (N - 4)] * 2
    assert out.logits.shape[1] == prompt_len - (N - 4)


def test_batch_equals_single_runs(sdpa_model, processor, batch):
    plan = PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4, layer=2)
    pruned = PrunedVLM(sdpa_model, plan)
    with torch.no_grad():
        batched = pruned(**batch).logits[:, -1]
    kept = {k: v.clone() for k, v in pruned.last_kept.items()}
    generated = pruned.generate(**batch, **GEN)[:, batch["input_ids"].shape[1]:]
    for i, (prompt, image) in enumerate(zip(PROMPTS, make_images())):
        single = processor(images=[image], text=[prompt], return_tensors="pt")
        single["image_sizes"] = batch["image_sizes"][i:i + 1]
        with torch.no_grad():
            logits = pruned(**single).logits[:, -1]
        assert torch.equal(pruned.last_kept["stage1"][0], kept["stage1"][i])
        assert torch.equal(pruned.last_kept["stage2"][0], kept["stage2"][i])
        torch.testing.assert_close(logits[0], batched[i], atol=1e-5, rtol=1e-5)
        gen = pruned.generate(**single, **GEN)[0, single["input_ids"].shape[1]:]
        assert torch.equal(gen, generated[i])


@pytest.mark.parametrize("query", ["last", "text"])
def test_stage2_scores_equal_eager_attention(sdpa_model, eager_model, batch, query):
    """Scores recomputed from q/k on an SDPA model == the eager attention rows of layer K-1, mean over heads."""
    k = 3
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=10, stage2={"name": "fastv", "query": query},
                                               n2=5, layer=k))
    with torch.no_grad():
        pruned(**batch)
    scores = pruned.last_stage2_scores

    reference = PrunedVLM(eager_model, PruningPlan(stage1="random", n1=10))
    with torch.no_grad():
        out = reference(**batch, output_attentions=True)
    attn = out.attentions[k - 1]  # (B, H, L1, L1) of layer K-1 on the stage-1 sequence
    ids = batch["input_ids"].gather(1, reference.last_positions)
    mask = batch["attention_mask"].gather(1, reference.last_positions)
    for b in range(ids.shape[0]):
        slots = (ids[b] == sdpa_model.config.image_token_id).nonzero()[:, 0]
        if query == "last":
            rows = torch.tensor([ids.shape[1] - 1])
        else:
            rows = torch.arange(int(slots.max()) + 1, ids.shape[1])
            rows = rows[mask[b, rows].bool()]
        expected = attn[b][:, rows][:, :, slots].mean(dim=0).mean(dim=0)
        torch.testing.assert_close(scores[b], expected, atol=1e-5, rtol=0)


def test_cls_attention_equals_eager_vision_attention(sdpa_model, eager_model, batch):
    adapter = get_adapter(sdpa_model)
    with torch.no_grad():
        tokens = adapter.encode(batch["pixel_values"])
        out = eager_model.model.vision_tower(batch["pixel_values"], output_attentions=True)
    n_layers = eager_model.config.vision_config.num_hidden_layers
    attn = out.attentions[n_layers - 2]  # layer producing hidden_states[-2] (vision_feature_layer)
    torch.testing.assert_close(tokens.cls_attn, attn[:, :, 0, 1:].mean(dim=1), atol=1e-6, rtol=0)
    ref = sdpa_model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    torch.testing.assert_close(tokens.feats, torch.stack(list(ref)), atol=0, rtol=0)


def test_padding_tokens_are_marked_and_never_kept(sdpa_model, batch):
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4, layer=2))
    with torch.no_grad():
        pruned(**batch)
    # 40x20 image: rows 0 and 3 of the 4x4 grid are padding; 20x30 image: columns 0 and 3 are padding (> 50%)
    tokens = get_adapter(sdpa_model).encode(batch["pixel_values"], batch["image_sizes"])
    assert tokens.valid[0].view(4, 4).all(dim=1).tolist() == [False, True, True, False]
    assert tokens.valid[1].view(4, 4).all(dim=0).tolist() == [False, True, True, False]
    assert tokens.valid[2].all()
    for b in range(3):
        assert tokens.valid[b, pruned.last_kept["stage1"][b]].all()
        assert tokens.valid[b, pruned.last_kept["stage2"][b]].all()
        assert set(pruned.last_kept["stage2"][b].tolist()) <= set(pruned.last_kept["stage1"][b].tolist())


def test_labels_give_a_loss_on_surviving_tokens(sdpa_model, batch):
    inputs = text_inputs(batch)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == sdpa_model.config.image_token_id, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = sdpa_model(**inputs, labels=labels).loss
        out = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=N, stage2="fastv", n2=N))(
            **inputs, labels=labels).loss
        pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=4, stage2="fastv", n2=2))(
            **inputs, labels=labels).loss
    torch.testing.assert_close(out, ref)
    assert torch.isfinite(pruned) and not torch.equal(pruned, ref)


def test_apply_context_manager_matches_pruned_vlm_and_restores(sdpa_model, batch):
    plan = PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4, layer=2)
    expected = PrunedVLM(sdpa_model, plan).generate(**batch, **GEN)
    with torch.no_grad():
        expected_logits = PrunedVLM(sdpa_model, plan)(**batch).logits
    inputs = text_inputs(batch)
    unpruned = sdpa_model.generate(**inputs, **GEN)
    with plan.apply(sdpa_model) as pruned:
        assert torch.equal(sdpa_model.generate(**batch, **GEN), expected)
        with torch.no_grad():
            assert torch.equal(sdpa_model(**batch).logits, expected_logits)
        assert pruned.last_kept["stage2"].shape == (3, 4)
    assert "forward" not in vars(sdpa_model) and "generate" not in vars(sdpa_model)
    assert torch.equal(sdpa_model.generate(**inputs, **GEN), unpruned)


def test_two_images_per_prompt(sdpa_model, processor):
    images = make_images(((40, 20), (20, 30), (32, 32), (30, 40)))
    prompts = ["USER : <image> <image> what color ? ASSISTANT :", "USER : <image> and <image> how many ? ASSISTANT :"]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = sdpa_model(**inputs).logits
        full = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=N, stage2="fastv", n2=N))(**inputs).logits
        pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=6, stage2="fastv", n2=3))
        out = pruned(**inputs).logits
    assert torch.equal(full, ref)
    assert pruned.last_kept["stage1"].shape == (4, 6)  # per image
    assert pruned.last_kept["stage2"].shape == (2, 6)  # per prompt: 3 per image, indices into 2 x N
    assert out.shape[1] == inputs["input_ids"].shape[1] - 2 * (N - 3)


def test_from_pretrained_directory_round_trip(tmp_path, sdpa_model, processor, batch):
    sdpa_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    inputs = loaded(images=make_images(), text=PROMPTS, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
    plan = PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4)
    with torch.no_grad():
        a = PrunedVLM(model, plan)(**inputs).logits
        b = PrunedVLM(sdpa_model, plan)(**inputs).logits
    torch.testing.assert_close(a, b)


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"stage1": "random", "n1": 0}, "n1=0"),
    ({"stage1": "random", "n1": -3}, "n1=-3"),
    ({"stage1": "random", "n1": 0.0}, "n1=0.0"),
    ({"stage1": "random", "n1": 1.5}, "n1=1.5"),
    ({"stage1": "random", "n1": 8, "stage2": "fastv", "n2": 0}, "n2=0"),
    ({"stage1": "random", "n1": 8, "stage2": "fastv", "n2": 9}, "n2=9"),
    ({"stage1": "nonexistent", "n1": 8}, "'nonexistent'"),
    ({"stage1": "random", "n1": 8, "stage2": "nope", "n2": 4}, "'nope'"),
    ({"stage1": "random"}, "n1"),
])
def test_bad_plans_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningPlan(**kwargs)


@pytest.mark.parametrize("layer", [0, 4, -1])
def test_layer_out_of_range_raises(sdpa_model, layer):
    with pytest.raises(ValueError, match=f"layer={layer}"):
        PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4, layer=layer))


@pytest.mark.parametrize("plan, message", [
    (PruningPlan(stage1="random", n1=N + 1), f"n1={N + 1}"),
    (PruningPlan(stage2="fastv", n2=N + 2), f"n2={N + 2}"),
    (PruningPlan(stage1="random", n1=0.25, stage2="fastv", n2=6), "n2=6"),
])
def test_budget_above_n_raises_at_call(sdpa_model, batch, plan, message):
    with pytest.raises(ValueError, match=message):
        PrunedVLM(sdpa_model, plan)(**batch)


def test_missing_or_mismatched_image_tokens_raise(sdpa_model, batch):
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=8))
    ids = batch["input_ids"].clone()
    no_image = ids.masked_fill(ids == sdpa_model.config.image_token_id, 7)
    with pytest.raises(ValueError, match=f"no image token \\(id {sdpa_model.config.image_token_id}\\)"):
        pruned(input_ids=no_image, pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="48 image tokens but 2 image"):
        pruned(input_ids=ids, pixel_values=batch["pixel_values"][:2], attention_mask=batch["attention_mask"])


def test_right_padding_with_stage2_raises(sdpa_model, processor):
    processor.tokenizer.padding_side = "right"
    try:
        inputs = processor(images=make_images()[:2], text=PROMPTS[:2], return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="padding_side='left'"):
        PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4))(**inputs)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_stage1_equals_masking_the_dropped_tokens(request, impl, batch):
    """Dropping visual tokens == attending to none of them in the unpruned model at the original positions."""
    model = model_for(request, impl)
    inputs = text_inputs(batch)
    pruned = PrunedVLM(model, PruningPlan(stage1="random", n1=5))
    with torch.no_grad():
        out = pruned(**inputs).logits
        kept_mask = torch.zeros_like(inputs["attention_mask"]).scatter(1, pruned.last_positions, 1)
        ref = model(**{**inputs, "attention_mask": inputs["attention_mask"] * kept_mask}).logits
    real = inputs["attention_mask"].gather(1, pruned.last_positions).bool()
    expected = ref.gather(1, pruned.last_positions.unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
