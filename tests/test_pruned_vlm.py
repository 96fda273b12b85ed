"""Two-stage pruned inference on a tiny random LLaVA: equalities against the unpruned and cache-free references."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoProcessor, LlavaForConditionalGeneration

from conftest import PROMPTS, eager_text_to_vision, make_images
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
def test_cached_generate_equals_cache_free_recompute(request, impl, query, batch, processor):
    model = model_for(request, impl)
    plan = PruningPlan(stage1="random", n1=8, stage2={"name": "fastv", "query": query}, n2=4, layer=2)
    pruned = PrunedVLM(model, plan, processor=processor)
    out = pruned.generate(**batch, **GEN, output_scores=True, return_dict_in_generate=True)
    kept = pruned.last_kept
    prompt_len = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :prompt_len], batch["input_ids"])

    # cache-free reference: rerun the whole pruned model on prompt + tokens so far, with the same selections
    replay = PrunedVLM(model, PruningPlan(stage1="random", n1=8, stage2=ReplayScorer(kept["stage2"]), n2=4,
                                          layer=2), processor=processor)
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
    pruned = PrunedVLM(sdpa_model, plan, processor=processor)
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


@pytest.mark.parametrize("query, chunked", [("last", False), ("text", False), ("text", True)])
def test_stage2_scores_equal_eager_attention(sdpa_model, eager_model, batch, processor, query, chunked,
                                             monkeypatch):
    """Scores recomputed from q/k on an SDPA model == the eager attention rows of layer K-1, mean over heads;
    also when the query rows are scored a few at a time (what bounds memory for long prompts)."""
    from modules.scorers import base as scorer_base

    calls = []
    if chunked:
        length = batch["input_ids"].shape[1] - 16 + 10  # the stage-1 sequence: 16 visual tokens -> 10
        monkeypatch.setattr(scorer_base, "_QUERY_BLOCK", 2 * batch["input_ids"].shape[0] * length)
        original = scorer_base.Stage2Context.head_attention

        def spy(self, *args, **kwargs):
            fn = self.logits_fn
            self.logits_fn = lambda rows: (calls.append(rows.shape[1]), fn(rows))[1]
            return original(self, *args, **kwargs)

        monkeypatch.setattr(scorer_base.Stage2Context, "head_attention", spy)
    k = 3
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=10, stage2={"name": "fastv", "query": query},
                                               n2=5, layer=k), processor=processor)
    with torch.no_grad():
        pruned(**batch)
    scores = pruned.last_stage2_scores

    reference = PrunedVLM(eager_model, PruningPlan(stage1="random", n1=10), processor=processor)
    with torch.no_grad():
        out = reference(**batch, output_attentions=True)
    attn = out.attentions[k - 1]  # (B, H, L1, L1) of layer K-1 on the stage-1 sequence
    ids = batch["input_ids"].gather(1, reference.last_positions)
    mask = batch["attention_mask"].gather(1, reference.last_positions)
    expected = eager_text_to_vision(attn, ids, mask, sdpa_model.config.image_token_id, query)
    for b in range(ids.shape[0]):
        torch.testing.assert_close(scores[b], expected[b], atol=1e-5, rtol=0)
    if chunked:
        assert len(calls) > 1 and max(calls) == 2, calls


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


def test_padding_tokens_are_marked_and_never_kept(sdpa_model, batch, processor):
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4, layer=2),
                       processor=processor)
    with torch.no_grad():
        pruned(**batch)
    # 40x20 image: rows 0 and 3 of the 4x4 grid are padding; 20x30 image: columns 0 and 3 are padding (> 50%)
    tokens = get_adapter(sdpa_model, processor).encode(batch["pixel_values"], batch["image_sizes"])
    assert tokens.valid[0].view(4, 4).all(dim=1).tolist() == [False, True, True, False]
    assert tokens.valid[1].view(4, 4).all(dim=0).tolist() == [False, True, True, False]
    assert tokens.valid[2].all()
    for b in range(3):
        assert tokens.valid[b, pruned.last_kept["stage1"][b]].all()
        assert tokens.valid[b, pruned.last_kept["stage2"][b]].all()
        assert set(pruned.last_kept["stage2"][b].tolist()) <= set(pruned.last_kept["stage1"][b].tolist())


def test_labels_give_a_loss_on_surviving_tokens(sdpa_model, batch):
    inputs = text_inputs(batch)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, -1] = -100
    # every image token but the first is ignored: the row of the LAST kept image token must be scored against
    # the token after it in the unpruned sequence (ignored unless it is the last image token), never against
    # the next surviving token
    image = inputs["input_ids"] == sdpa_model.config.image_token_id
    labels = labels.masked_fill(image & (image.cumsum(dim=1) > 1), -100)
    with torch.no_grad():
        ref = sdpa_model(**inputs, labels=labels).loss
        out = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=N, stage2="fastv", n2=N))(
            **inputs, labels=labels).loss
        pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=4, stage2="fastv", n2=2, layer=2))
        result = pruned(**inputs, labels=labels)
    torch.testing.assert_close(out, ref)
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).gather(1, pruned.last_positions)
    rows = next_labels != -100
    expected = torch.nn.functional.cross_entropy(result.logits[rows], next_labels[rows])
    torch.testing.assert_close(result.loss, expected, atol=1e-6, rtol=1e-6)


def test_apply_context_manager_matches_pruned_vlm_and_restores(sdpa_model, batch, processor):
    plan = PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4, layer=2)
    expected = PrunedVLM(sdpa_model, plan, processor=processor).generate(**batch, **GEN)
    with torch.no_grad():
        expected_logits = PrunedVLM(sdpa_model, plan, processor=processor)(**batch).logits
    inputs = text_inputs(batch)
    unpruned = sdpa_model.generate(**inputs, **GEN)
    with plan.apply(sdpa_model, processor=processor) as pruned:
        assert torch.equal(sdpa_model.generate(**batch, **GEN), expected)
        with torch.no_grad():
            assert torch.equal(sdpa_model(**batch).logits, expected_logits)
        assert pruned.last_kept["stage2"].shape == (3, 4)
    assert "forward" not in vars(sdpa_model) and "generate" not in vars(sdpa_model)
    assert torch.equal(sdpa_model.generate(**inputs, **GEN), unpruned)


def two_image_inputs(processor):
    images = make_images(((40, 20), (20, 30), (32, 32), (30, 40)))
    prompts = ["USER : <image> <image> what color ? ASSISTANT :", "USER : <image> and <image> how many ? ASSISTANT :"]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def test_two_images_per_prompt(sdpa_model, processor):
    inputs = two_image_inputs(processor)
    with torch.no_grad():
        ref = sdpa_model(**inputs).logits
        full = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=N, stage2="fastv", n2=N))(**inputs).logits
        pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=6, stage2="fastv", n2=3))
        out = pruned(**inputs).logits
    assert torch.equal(full, ref)
    kept1, kept2 = pruned.last_kept["stage1"], pruned.last_kept["stage2"]
    assert kept1.shape == (4, 6) and kept2.shape == (4, 3)  # per image, indices into that image's N tokens
    for image in range(4):
        assert set(kept2[image].tolist()) <= set(kept1[image].tolist())
    # the surviving rows are exactly the text tokens plus the kept tokens of each image, in order
    image_pos = (inputs["input_ids"] == sdpa_model.config.image_token_id).nonzero()[:, 1].view(2, 2 * N)
    for row in range(2):
        kept_pos = torch.cat([image_pos[row, i * N:(i + 1) * N][kept2[2 * row + i]] for i in range(2)])
        text_pos = (inputs["input_ids"][row] != sdpa_model.config.image_token_id).nonzero()[:, 0]
        assert torch.equal(pruned.last_positions[row], torch.cat([text_pos, kept_pos]).sort().values)
    assert out.shape[1] == inputs["input_ids"].shape[1] - 2 * (N - 3)


@dataclass
class FirstImageDominates(Scorer):
    """Scores every token of a row's first image above every token of its second (a scorer whose budget, shared
    across the row, would go to the first image alone)."""

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        first = (ctx.vision_image == 0).float() * 100.0
        return first + ctx.vision_index.float() / 1000


def test_stage2_budget_is_per_image_when_one_image_dominates(sdpa_model, processor):
    inputs = two_image_inputs(processor)
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=6, stage2=FirstImageDominates(), n2=3, layer=2))
    with torch.no_grad():
        pruned(**inputs)
    kept1, kept2 = pruned.last_kept["stage1"], pruned.last_kept["stage2"]
    # within each image, the 3 highest scores (largest index) of its 6 stage-1 tokens
    assert torch.equal(kept2, kept1[:, 3:])
    image = inputs["input_ids"].gather(1, pruned.last_positions) == sdpa_model.config.image_token_id
    assert image.sum(dim=1).tolist() == [6, 6]


def test_question_aware_head_never_reads_the_answer(sdpa_model, tokenizer, processor):
    """Training sequences hold prompt + answer; the stage-1 selection must be the one serving (prompt only) makes."""
    from modules.head import PrunerHead

    torch.manual_seed(0)
    head = PrunerHead.for_model(get_adapter(sdpa_model), question=True, d_model=32, depth=1, heads=2).eval()
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1=head, n1=5))
    images = make_images()
    prompts = [p for p in PROMPTS]
    answers = ["red circle . yes", "three", "a blue square is left of the yellow triangle"]
    served = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    trained = processor(images=images, text=[p + " " + a for p, a in zip(prompts, answers)], return_tensors="pt",
                        padding=True)
    answer_len = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    prompt_end = torch.tensor([trained["input_ids"].shape[1] - 1 - n for n in answer_len])
    with torch.no_grad():
        pruned(**served)
        serving = pruned.last_kept["stage1"].clone()
        pruned(**trained, prompt_end=prompt_end)
    assert torch.equal(pruned.last_kept["stage1"], serving)
    # the head's scores, not just its top-5, are the same (up to the float noise of a longer padded prompt)
    with torch.no_grad():
        tokens = pruned.encode(served["pixel_values"])
        a = head.logits(pruned.attach_prompt(tokens, served["input_ids"], served["attention_mask"]).tokens)
        b = head.logits(pruned.attach_prompt(tokens, trained["input_ids"], trained["attention_mask"],
                                             prompt_end).tokens)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan", [
    PruningPlan(stage1="random", n1=N, stage2="fastv", n2=N, layer=2),
    PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4, layer=2),
], ids=["keep-all", "pruned"])
def test_beam_search_and_several_return_sequences(sdpa_model, processor, batch, plan):
    """num_beams / num_return_sequences: keep-all equals the unpruned model's beam search; pruned beams score
    exactly what a cache-free forward of the pruned model gives their tokens."""
    beams = {"max_new_tokens": 5, "do_sample": False, "num_beams": 3, "num_return_sequences": 2,
             "length_penalty": 0.0, "output_scores": True, "return_dict_in_generate": True}
    pruned = PrunedVLM(sdpa_model, plan, processor=processor)
    out = pruned.generate(**batch, **beams)
    assert out.sequences.shape[0] == 6
    assert torch.equal(out.sequences[:, :batch["input_ids"].shape[1]],
                       batch["input_ids"].repeat_interleave(2, dim=0))
    if plan.n1 == N:
        ref = sdpa_model.generate(**text_inputs(batch), **beams)
        assert torch.equal(out.sequences, ref.sequences)
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores)
        return
    kept = pruned.last_kept
    assert kept["stage2"].shape == (3, 4)
    replay = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=8, stage2=ReplayScorer(kept["stage2"]), n2=4,
                                               layer=2), processor=processor)
    prompt_len = batch["input_ids"].shape[1]
    eos = sdpa_model.generation_config.eos_token_id
    for j in range(6):
        row = j // 2
        new = out.sequences[j, prompt_len:]
        if (new == eos).any():
            new = new[: int((new == eos).nonzero()[0]) + 1]
        ids = torch.cat([batch["input_ids"][row], new]).unsqueeze(0)
        mask = torch.cat([batch["attention_mask"][row], torch.ones_like(new)]).unsqueeze(0)
        replay.scorer.kept = kept["stage2"][row:row + 1]
        with torch.no_grad():
            logits = replay(input_ids=ids, pixel_values=batch["pixel_values"][row:row + 1], attention_mask=mask,
                            image_sizes=batch["image_sizes"][row:row + 1], prompt_end=torch.tensor([prompt_len - 1]),
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
        assert torch.equal(replay.last_kept["stage1"], kept["stage1"][row:row + 1])
        logp = torch.log_softmax(logits[0, -len(new) - 1:-1].float(), dim=-1).gather(1, new.unsqueeze(1)).sum()
        torch.testing.assert_close(logp, out.sequences_scores[j], atol=1e-4, rtol=1e-5)


def test_static_cache_works_for_stage1_and_is_refused_for_stage2(sdpa_model, batch, processor):
    stage1 = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=8), processor=processor)
    assert torch.equal(stage1.generate(**batch, **GEN, cache_implementation="static"), stage1.generate(**batch, **GEN))
    both = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=8, stage2="fastv", n2=4, layer=2),
                     processor=processor)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        both.generate(**batch, **GEN, cache_implementation="static")


def test_apply_restores_instance_attributes_it_did_not_create(sdpa_model, batch, processor):
    """accelerate's device_map models carry an instance `forward`; apply() must put it back, not delete it."""
    calls = []
    class_forward = type(sdpa_model).forward

    def dispatching_forward(*args, **kwargs):
        calls.append(1)
        return class_forward(sdpa_model, *args, **kwargs)

    sdpa_model.forward = dispatching_forward
    try:
        with PruningPlan(stage1="random", n1=8).apply(sdpa_model, processor=processor):
            with torch.no_grad():
                sdpa_model(**batch)
        assert vars(sdpa_model)["forward"] is dispatching_forward and "generate" not in vars(sdpa_model)
        calls.clear()
        with torch.no_grad():
            sdpa_model(**text_inputs(batch))
        assert calls == [1]
    finally:
        del sdpa_model.forward


def test_gather_position_ids_is_not_fooled_by_a_batch_of_three():
    """(3, B, L) M-RoPE positions with B == 3 have the shape of a (B, L, D) tensor with D == L."""
    from modules.vlm.base import gather_last, gather_position_ids

    positions = torch.arange(3 * 3 * 5).view(3, 3, 5)  # (axes, B, L)
    index = torch.tensor([[0, 2], [1, 4], [3, 4]])
    expected = torch.stack([torch.stack([positions[a, b, index[b]] for b in range(3)]) for a in range(3)])
    assert torch.equal(gather_position_ids(positions, index), expected)
    hidden = torch.arange(3 * 5 * 3).view(3, 5, 3).float()  # (B, L, D)
    assert torch.equal(gather_last(hidden, index), torch.stack([hidden[b, index[b]] for b in range(3)]))


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
def test_budget_above_n_raises_at_call(sdpa_model, batch, processor, plan, message):
    with pytest.raises(ValueError, match=message):
        PrunedVLM(sdpa_model, plan, processor=processor)(**batch)


def test_missing_or_mismatched_image_tokens_raise(sdpa_model, batch):
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=8))
    ids = batch["input_ids"].clone()
    no_image = ids.masked_fill(ids == sdpa_model.config.image_token_id, 7)
    with pytest.raises(ValueError, match=f"no image token \\(id {sdpa_model.config.image_token_id}\\)"):
        pruned(input_ids=no_image, pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="48 image tokens \\(id 4\\) but the 2 image"):
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


# ---- validity from the processor actually used ---------------------------------------------------------------

def padding_fraction(pixel_values: torch.Tensor, processor, grid: int = 4) -> torch.Tensor:
    """(n_images, grid * grid) fraction of each patch's pixels that carry the pad colour (read from the pixels)."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    pad = (torch.tensor([int(m * 255) for m in ip.image_mean]).view(1, 3, 1, 1) / 255 - mean) / std
    is_pad = ((pixel_values - pad).abs() < 1e-3).all(dim=1).float()  # (n, H, W)
    size = is_pad.shape[-1] // grid
    return is_pad.unfold(1, size, size).unfold(2, size, size).mean(dim=(-1, -2)).flatten(1)


SIZES = ((40, 20), (20, 30), (32, 32), (30, 40), (64, 24), (24, 56))


def test_validity_follows_a_pad_to_square_processor(sdpa_model, processor):
    images = make_images(SIZES)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    sizes = torch.tensor([[im.height, im.width] for im in images])
    tokens = get_adapter(sdpa_model, processor).encode(pixels, sizes)
    fraction = padding_fraction(pixels, processor)
    clear = (fraction - 0.5).abs() > 0.15  # patches the resize does not blend at the threshold
    assert bool((tokens.valid == (fraction <= 0.5))[clear].all())
    assert int((~tokens.valid).sum()) >= 6 * 4  # the non-square images do have padding rows or columns


def test_validity_follows_a_center_crop_processor(sdpa_model, tokenizer, batch):
    """llava-hf processors resize and centre-crop: every token shows the image, whatever its aspect ratio."""
    from data.tiny import tiny_llava_processor

    crop = tiny_llava_processor(tokenizer, pad_to_square=False)
    assert crop.image_processor.do_center_crop and not crop.image_processor.do_pad
    images = make_images(SIZES)
    pixels = crop.image_processor(images, return_tensors="pt")["pixel_values"]
    sizes = torch.tensor([[im.height, im.width] for im in images])
    assert float(padding_fraction(pixels, crop).max()) < 0.1
    assert get_adapter(sdpa_model, crop).encode(pixels, sizes).valid is None
    inputs = crop(images=make_images(), text=PROMPTS, return_tensors="pt", padding=True)
    plan = PruningPlan(stage1="fastervlm", n1=8, stage2={"name": "debiased", "inner": "fastv"}, n2=4, layer=2)
    pruned = PrunedVLM(sdpa_model, plan, processor=crop)
    with torch.no_grad():
        with_sizes = pruned(**inputs, image_sizes=batch["image_sizes"]).logits
        kept = dict(pruned.last_kept)
        without = pruned(**inputs).logits
    assert torch.equal(with_sizes, without)
    assert all(torch.equal(kept[k], pruned.last_kept[k]) for k in kept)


def test_image_sizes_without_the_processor_raise(sdpa_model, batch):
    with pytest.raises(ValueError, match=r"processor=processor"):
        PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=8))(**batch)


def test_each_call_returns_its_own_decisions(sdpa_model, batch, processor):
    """`out.pruning` belongs to the call that made it; `last_*` are the latest call's, for convenience."""
    pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="fastervlm", n1=8, stage2="fastv", n2=4, layer=2),
                       processor=processor)
    with torch.no_grad():
        first = pruned(**batch)
        second = pruned(**{**batch, "input_ids": batch["input_ids"].flip(0), "attention_mask":
                           batch["attention_mask"].flip(0), "pixel_values": batch["pixel_values"].flip(0),
                           "image_sizes": batch["image_sizes"].flip(0)})
    assert pruned.last is second.pruning and pruned.last_kept is second.pruning.kept
    for stage in ("stage1", "stage2"):  # the flipped batch's decisions are the first's, flipped
        assert torch.equal(second.pruning.kept[stage], first.pruning.kept[stage].flip(0))
    assert first.pruning.positions.shape == (3, first.logits.shape[1])
    # the scores agree to rounding only: a BLAS kernel may block a batch differently by the rows' order
    torch.testing.assert_close(second.pruning.stage2_scores, first.pruning.stage2_scores.flip(0), rtol=1e-5,
                               atol=1e-7)
    out = pruned.generate(**batch, **GEN, return_dict_in_generate=True)
    assert all(torch.equal(out.pruning.kept[s], first.pruning.kept[s]) for s in ("stage1", "stage2"))


def test_unsupported_model_type_lists_every_supported_one():
    from types import SimpleNamespace

    from modules.vlm import ADAPTERS

    model = SimpleNamespace(config=SimpleNamespace(model_type="idefics3"))
    with pytest.raises(ValueError, match="'idefics3'") as info:
        get_adapter(model)
    assert all(repr(t) in str(info.value) for t in ADAPTERS) and ADAPTERS


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an aten op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


def test_stage2_holds_no_attention_matrix_even_with_every_text_token_a_query(sdpa_model, eager_model, tokenizer,
                                                                            monkeypatch):
    """Memory linear in the sequence: with a long prompt scored by every text token (query="text"), nothing the
    pruned SDPA forward builds comes near one layer's (H, L, L) attention, which the usual eager way returns per
    layer (checked too, so the detector is known to see such a tensor)."""
    from modules.scorers import base as scorer_base

    cfg = sdpa_model.config
    n, text = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2, 240
    words = torch.randint(1, 40, (1, text))
    words[words == cfg.image_token_id] = 1
    ids = torch.cat([torch.full((1, n), cfg.image_token_id), words], dim=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)}
    length, heads = ids.shape[1], cfg.text_config.num_attention_heads
    monkeypatch.setattr(scorer_base, "_QUERY_BLOCK", 16 * length)  # 16 query rows at a time, as at 7B scale
    plan = PruningPlan(stage2={"name": "fastv", "query": "text"}, n2=4, layer=2)
    with torch.no_grad(), _LargestTensor() as ours:
        PrunedVLM(sdpa_model, plan)(**inputs)
    with torch.no_grad(), _LargestTensor() as usual:
        eager_model(**inputs, output_attentions=True)
    assert usual.most >= heads * length * length
    assert ours.most < heads * length * length / 4, (ours.most, heads * length * length)


def test_stage2_reuses_the_layers_own_projections(sdpa_model, batch, processor):
    """Stage 2 scores with layer K-1's own q_proj and k_proj outputs, captured as the layer runs: each projection
    of every layer runs once per forward, as in the unpruned model (scores == eager: see above)."""
    k = 2
    calls = {}
    handles = [getattr(layer.self_attn, name).register_forward_hook(
        lambda *_, key=(i, name): calls.__setitem__(key, calls.get(key, 0) + 1))
        for i, layer in enumerate(get_adapter(sdpa_model).language_layers()) for name in ("q_proj", "k_proj")]
    try:
        pruned = PrunedVLM(sdpa_model, PruningPlan(stage1="random", n1=10, stage2={"name": "fastv", "query": "text"},
                                                   n2=5, layer=k), processor=processor)
        with torch.no_grad():
            pruned(**batch)
    finally:
        for h in handles:
            h.remove()
    assert set(calls.values()) == {1} and len(calls) == 2 * get_adapter(sdpa_model).num_layers, calls
