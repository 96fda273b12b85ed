"""Realistic-geometry tier: the generic contracts on models with LLaVA-1.5-7B's geometry at tiny depth.

CLIP ViT-L/336 vision tower (576 tokens of a 24 x 24 grid, 16 heads of 64; 2 layers), `vision_feature_layer=-2`,
the "default" (576) and "full" (577) strategies and a list of feature layers; a Llama language model with
head_dim 128, with and without GQA (3 layers); bf16 end to end; real `LlavaProcessor`s with llava-hf's centre
crop and with pad-to-square; left-padded batches of 2 prompts x 2 images of different aspect ratios
(640x480, 300x600, 400x400, 500x280). The tiny models of test_pruned_vlm.py hide what only this geometry shows
(several images of 576 tokens in one prompt, grids that are not padded, head_dim 128, GQA groups, bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import realistic as R
import torch

from conftest import eager_text_to_vision
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.scorers import SCORERS, Scorer, Stage2Context
from modules.selectors.base import ScoreSelector
from modules.vlm import get_adapter
from modules.vlm.base import VisionTokens

REPO = Path(__file__).resolve().parents[1]
GEN = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
N1, N2, K = 64, 16, 2  # stage-1 / stage-2 budgets per image, stage-2 layer (of 3)


def slow(*values):
    """A parameter set of the slow tier (still run in CI, left out of `-m "not slow"`)."""
    return pytest.param(*values, marks=pytest.mark.slow)


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    yield
    R.model.cache_clear()
    batch_for.cache_clear()
    unpruned_logits.cache_clear()


@cache
def batch_for(image_processing: str = "crop", strategy: str = "default", dtype: torch.dtype = torch.float32):
    """The 2 prompts x 2 images batch made by that processor (shared: tests must not modify it)."""
    return R.make_batch(R.processor(image_processing, strategy), dtype=dtype)


def variant_batch(variant: str, image_processing: str = "crop") -> dict:
    v = R.VARIANTS[variant]
    return batch_for(image_processing, v.strategy, v.dtype)


@cache
def unpruned_logits(variant: str, impl: str) -> torch.Tensor:
    with torch.no_grad():
        return R.model(variant, impl)(**R.text_inputs(variant_batch(variant))).logits


# ---- selectors and scorers with known behaviour --------------------------------------------------------------

@dataclass
class FirstValid(ScoreSelector):
    """Keeps the first n valid tokens in raster order; records the VisionTokens it is given."""

    seen: list = field(default_factory=list)

    def score(self, tokens: VisionTokens) -> torch.Tensor:
        self.seen.append(tokens)
        return -torch.arange(tokens.num_tokens, dtype=torch.float32).expand(tokens.batch_size, -1)


@dataclass
class Recording(Scorer):
    """Scores with `inner` and keeps what it returned."""

    inner: Scorer
    scores: list = field(default_factory=list)

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        self.scores.append(self.inner.score(ctx))
        return self.scores[-1]


@dataclass
class Replay(Scorer):
    """Returns fixed scores (an earlier call's), so a recompute keeps the same stage-2 tokens."""

    scores: torch.Tensor

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        assert ctx.vision_index.shape == self.scores.shape
        return self.scores


@dataclass
class FirstImageDominates(Scorer):
    """Every token of a row's first image scores above every token of its other images."""

    num_tokens: int

    def score(self, ctx: Stage2Context) -> torch.Tensor:
        first = (ctx.vision_index < self.num_tokens).float()
        return first * 100.0 + torch.linspace(0, 1, ctx.vision_index.shape[1]).expand_as(first)


# ---- geometry ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["gqa", slow("mha-full"), slow("mha-layers")])
def test_models_and_processors_have_llava15_geometry(variant):
    """The fixtures are what they claim (576/577 tokens per 336-pixel image, head_dim 128, GQA or not), and the
    adapter's encoder output equals the model's own image features and [CLS] attention at this geometry."""
    v = R.VARIANTS[variant]
    model = R.model(variant)
    batch = variant_batch(variant)
    assert batch["pixel_values"].shape == (4, 3, 336, 336)
    per_row = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert per_row.tolist() == [2 * v.num_tokens] * 2
    assert bool((batch["attention_mask"][:, 0] == 0).any()), "the batch must be left padded"
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_attention_heads,
            vision.intermediate_size) == (336, 14, 1024, 16, 4096)
    assert model.config.vision_feature_layer == (v.feature_layers[0] if len(v.feature_layers) == 1
                                                 else v.feature_layers)
    text = model.config.text_config
    attn = model.model.language_model.layers[0].self_attn
    assert attn.head_dim == 128 and text.num_attention_heads == 4
    assert text.num_key_value_heads == v.config.get("kv_heads", 2)
    adapter = get_adapter(model)
    assert adapter.num_image_tokens == v.num_tokens
    assert adapter.feature_dims == {"pre": 1024 * len(v.feature_layers), "post": 512}

    with torch.no_grad():
        tokens = adapter.encode(batch["pixel_values"])
        ref = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        eager = R.model(variant, "eager").model.vision_tower(batch["pixel_values"], output_attentions=True)
    torch.testing.assert_close(tokens.feats, torch.stack(list(ref)), atol=0, rtol=0)
    assert tokens.feats.shape == (4, v.num_tokens, 512)
    if v.strategy == "default":
        assert tokens.grid == (R.GRID, R.GRID)
    # [CLS] attention of the layer that produces the last feature layer (hidden_states[i] = output of layer i-1)
    n_layers = model.config.vision_config.num_hidden_layers
    layer = v.feature_layers[-1] % (n_layers + 1) - 1
    drop = 1 if v.strategy == "default" else 0
    expected = eager.attentions[layer][:, :, 0, drop:].mean(dim=1)
    torch.testing.assert_close(tokens.cls_attn, expected, atol=1e-6, rtol=0)


# ---- keep-all == unpruned ---------------------------------------------------------------------------------

KEEP_ALL = {
    "ratios-K1": PruningPlan(stage1="random", n1=1.0, stage2="fastv", n2=1.0, layer=1),
    "counts-K2": PruningPlan(stage1="random", n1=R.N, stage2={"name": "fastv", "query": "text"}, n2=R.N, layer=K),
}


@pytest.mark.parametrize("variant, plan, impl", [
    ("gqa", "ratios-K1", "sdpa"), ("gqa", "ratios-K1", "eager"), ("mha-full", "ratios-K1", "sdpa"),
    ("mha-layers", "ratios-K1", "sdpa"), slow("gqa", "counts-K2", "sdpa"), slow("mha-layers", "ratios-K1", "eager"),
])
def test_keep_all_equals_unpruned(variant, plan, impl):
    model = R.model(variant, impl)
    inputs = R.text_inputs(variant_batch(variant))
    with torch.no_grad():
        out = PrunedVLM(model, KEEP_ALL[plan])(**inputs).logits
    assert torch.equal(out, unpruned_logits(variant, impl))


# ---- cached generate == cache-free recompute ---------------------------------------------------------------

@pytest.mark.parametrize("variant, impl, query, image_processing", [
    ("gqa", "sdpa", "last", "pad"),  # padding tokens marked from the processor (PrunedVLM(..., processor=...))
    ("mha-full", "sdpa", "text", "crop"),
    slow("gqa", "eager", "text", "crop"),
    slow("mha-layers", "eager", "last", "crop"),
])
def test_cached_generate_equals_cache_free_recompute(variant, impl, query, image_processing):
    """Greedy generate with both stages active (KV cache of layers >= K holds n2 tokens per image) == rerunning the
    whole pruned model on prompt + generated tokens without a cache, with the same selections."""
    v = R.VARIANTS[variant]
    model = R.model(variant, impl)
    batch = variant_batch(variant, image_processing)
    inputs, kwargs = batch, {}
    if image_processing == "pad":
        kwargs = {"processor": R.processor("pad", v.strategy)}
    else:
        inputs = R.text_inputs(batch)
    recording = Recording(SCORERS.build("fastv", query=query))
    pruned = PrunedVLM(model, PruningPlan(stage1="random", n1=N1, stage2=recording, n2=N2, layer=K), **kwargs)
    out = pruned.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
    kept = {k: t.clone() for k, t in pruned.last_kept.items()}
    prompt_len = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :prompt_len], batch["input_ids"])
    assert out.sequences.shape[1] == prompt_len + GEN["max_new_tokens"]
    assert len(recording.scores) == 1  # stage 2 scores once, in prefill

    replay = PrunedVLM(model, PruningPlan(stage1="random", n1=N1, stage2=Replay(recording.scores[0]), n2=N2,
                                          layer=K), **kwargs)
    with torch.no_grad():
        tokens = replay.encode(batch["pixel_values"], inputs.get("image_sizes"))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    eos = model.generation_config.eos_token_id
    for step in range(GEN["max_new_tokens"]):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = replay(input_ids=ids, pixel_values=batch["pixel_values"], attention_mask=mask,
                            position_ids=positions, image_sizes=inputs.get("image_sizes"), vision_tokens=tokens,
                            use_cache=False).logits[:, -1]
        for name, value in kept.items():
            assert torch.equal(replay.last_kept[name], value), name
        torch.testing.assert_close(logits, out.logits[step], atol=1e-5, rtol=1e-5)
        greedy = logits.clone()
        greedy[:, eos] = -float("inf")  # min_new_tokens: generate suppresses EOS at every step here
        assert torch.equal(greedy.argmax(-1), out.sequences[:, prompt_len + step])
        ids = torch.cat([ids, out.sequences[:, prompt_len + step:prompt_len + step + 1]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


# ---- batch == per-sample runs -------------------------------------------------------------------------------

@pytest.mark.parametrize("image_processing", ["pad"])
def test_batch_equals_single_runs(image_processing):
    """Each prompt (2 images) alone, unpadded, gives the same selections, last logits and greedy tokens as in the
    left-padded batch. With "pad", padding validity comes from the processor (image_sizes passed)."""
    model = R.model("gqa")
    proc = R.processor(image_processing)
    batch = batch_for(image_processing)
    kwargs = {"processor": proc} if image_processing == "pad" else {}

    def inputs_of(b):
        return b if image_processing == "pad" else R.text_inputs(b)

    pruned = PrunedVLM(model, PruningPlan(stage1="random", n1=N1, stage2="fastv", n2=N2, layer=K), **kwargs)
    with torch.no_grad():
        batched = pruned(**inputs_of(batch)).logits[:, -1]
    kept = {k: v.clone() for k, v in pruned.last_kept.items()}
    generated = pruned.generate(**inputs_of(batch), **GEN)[:, batch["input_ids"].shape[1]:]
    per_row = R.IMAGES_PER_PROMPT
    for row in range(2):
        images = slice(row * per_row, (row + 1) * per_row)
        single = R.make_batch(proc, prompts=[R.PROMPTS[row]], images=images)
        assert bool(single["attention_mask"].all())
        assert torch.equal(single["pixel_values"], batch["pixel_values"][images])
        with torch.no_grad():
            logits = pruned(**inputs_of(single)).logits[:, -1]
        assert torch.equal(pruned.last_kept["stage1"], kept["stage1"][images])  # (n_images, n1)
        assert torch.equal(pruned.last_kept["stage2"], kept["stage2"][images])  # (n_images, n2)
        torch.testing.assert_close(logits[0], batched[row], atol=1e-5, rtol=1e-5)
        gen = pruned.generate(**inputs_of(single), **GEN)[0, single["input_ids"].shape[1]:]
        assert torch.equal(gen, generated[row])


# ---- stage-2 scores == eager attention rows ---------------------------------------------------------------

@pytest.mark.parametrize("variant, query", [
    ("gqa", "text"), ("mha-layers", "last"), slow("gqa", "last"), slow("mha-layers", "text"),
])
def test_stage2_scores_equal_eager_attention(variant, query):
    """FastV's scores, recomputed from layer K-1's q/k projections and RoPE on an SDPA model (head_dim 128, GQA
    groups expanded), == the eager model's attention rows of layer K-1 to the visual keys, mean over heads."""
    batch = R.text_inputs(variant_batch(variant))
    recording = Recording(SCORERS.build("fastv", query=query))
    pruned = PrunedVLM(R.model(variant), PruningPlan(stage1="random", n1=N1, stage2=recording, n2=N2, layer=K))
    with torch.no_grad():
        pruned(**batch)
    scores = recording.scores[0]
    eager = R.model(variant, "eager")
    reference = PrunedVLM(eager, PruningPlan(stage1="random", n1=N1))
    with torch.no_grad():
        out = reference(**batch, output_attentions=True)
    attn = out.attentions[K - 1]  # (B, H, L1, L1) on the stage-1 sequence
    ids = batch["input_ids"].gather(1, reference.last_positions)
    mask = batch["attention_mask"].gather(1, reference.last_positions)
    assert scores.shape == (2, R.IMAGES_PER_PROMPT * N1)
    expected = eager_text_to_vision(attn, ids, mask, eager.config.image_token_id, query)
    for b in range(2):
        torch.testing.assert_close(scores[b], expected[b], atol=1e-5, rtol=0)


# ---- per-image budgets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scorer", ["fastv", "first-image-dominates"])
def test_every_image_keeps_exactly_its_budget(scorer):
    """n1 and n2 are budgets per image: with 2 images per prompt each keeps n1 after stage 1 and n2 after stage 2,
    even when one image outscores the other everywhere; the outputs and the KV cache shrink accordingly."""
    model = R.model("gqa")
    inputs = R.text_inputs(batch_for("crop"))
    stage2 = "fastv" if scorer == "fastv" else FirstImageDominates(R.N)
    pruned = PrunedVLM(model, PruningPlan(stage1="random", n1=N1, stage2=stage2, n2=N2, layer=K))
    with torch.no_grad():
        out = pruned(**inputs, use_cache=True)
    kept1, kept2 = pruned.last_kept["stage1"], pruned.last_kept["stage2"]
    assert kept1.shape == (4, N1)
    assert kept2.shape == (4, N2), f"stage 2 kept {tuple(kept2.shape)}: expected n2={N2} per image of 4"
    for i in range(4):
        assert kept1[i].unique().numel() == N1 and torch.equal(kept1[i], kept1[i].sort().values)
        assert 0 <= int(kept1[i].min()) and int(kept1[i].max()) < R.N
        assert kept2[i].unique().numel() == N2 and torch.equal(kept2[i], kept2[i].sort().values)
        assert set(kept2[i].tolist()) <= set(kept1[i].tolist())
    length = inputs["input_ids"].shape[1]
    after1, after2 = length - 2 * (R.N - N1), length - 2 * (R.N - N2)
    assert out.logits.shape[1] == after2
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    assert lengths == [after1] * K + [after2] * (3 - K)


# ---- validity from the processor --------------------------------------------------------------------------

def pixel_padding_fraction(pixel_values: torch.Tensor, proc) -> torch.Tensor:
    """(n_images, N) fraction of each patch's pixels that hold the pad-to-square background colour."""
    ip = proc.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    background = ((mean * 255).floor() / 255 - mean) / std  # the processor fills with int(mean * 255)
    is_bg = ((pixel_values - background.view(1, 3, 1, 1)).abs() < 1e-4).all(dim=1).float()  # (n, 336, 336)
    return torch.nn.functional.avg_pool2d(is_bg.unsqueeze(1), 14).flatten(1)


@pytest.mark.parametrize("image_processing, variant", [
    ("crop", "gqa"), ("pad", "gqa"), slow("llava-crop", "gqa"), slow("pad", "mha-full"),
])
def test_padding_validity_follows_the_processor(image_processing, variant):
    """Which tokens are padding is read from the processor that made pixel_values (issue 11, item 5): llava-hf's
    centre crop leaves none (a 640x480 image's 24 x 24 tokens all show the image), pad-to-square marks the rows or
    columns that show only the fill colour; the mask agrees with the pixels, and padding is never kept. With the
    "full" strategy the [CLS] token (index 0) is valid."""
    v = R.VARIANTS[variant]
    proc = R.processor(image_processing, v.strategy)
    batch = variant_batch(variant, image_processing)
    bg = pixel_padding_fraction(batch["pixel_values"], proc)
    truth = bg <= 0.5
    if image_processing == "pad":
        grid = truth.view(4, R.GRID, R.GRID)
        # 640x480 -> 80-pixel bands top and bottom of a 640 square = 42 of 336 pixels = 3 patch rows each
        assert grid[0].all(dim=1).tolist() == [False] * 3 + [True] * 18 + [False] * 3
        # 300x600 -> 150-pixel bands left and right of a 600 square = 84 of 336 pixels = 6 patch columns each
        assert grid[1].all(dim=0).tolist() == [False] * 6 + [True] * 12 + [False] * 6
        assert grid[2].all()
        assert not grid[3].all()
    else:
        assert bool((bg == 0).all()), "a centre-cropped image has no fill pixels"

    if v.strategy == "full":
        truth = torch.cat([torch.ones(4, 1, dtype=torch.bool), truth], dim=1)

    selector = FirstValid()
    n1 = 96  # the first 4 rows of a grid when nothing is padding
    pruned = PrunedVLM(R.model(variant), PruningPlan(stage1=selector, n1=n1, stage2="fastv", n2=N2, layer=K),
                       processor=proc)
    with torch.no_grad():
        pruned(**batch)
    valid = selector.seen[-1].valid_or_all()
    assert torch.equal(valid, truth)
    kept1, kept2 = pruned.last_kept["stage1"], pruned.last_kept["stage2"]
    first_valid = torch.stack([row.nonzero()[:n1, 0] for row in truth])
    assert torch.equal(kept1, first_valid)  # what FirstValid keeps: the first n1 tokens the mask allows
    if image_processing != "pad":
        assert torch.equal(kept1[0], torch.arange(n1))  # the top rows of the 640x480 image are image content
    assert kept2.shape == (4, N2) and bool(truth.gather(1, kept2).all())


# ---- bf16 -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bf16_end_to_end():
    """A bf16 model fed bf16 pixels: keep-all == unpruned bitwise; both stages, with padding read from a
    pad-to-square processor, give finite bf16 logits, exact per-image budgets that keep no padding, and a
    cached generate that runs."""
    model = R.model("gqa-bf16")
    inputs = R.text_inputs(variant_batch("gqa-bf16"))
    assert model.dtype == torch.bfloat16 and inputs["pixel_values"].dtype == torch.bfloat16
    with torch.no_grad():
        keep_all = PrunedVLM(model, KEEP_ALL["counts-K2"])(**inputs).logits
    assert keep_all.dtype == torch.bfloat16
    assert torch.equal(keep_all, unpruned_logits("gqa-bf16", "sdpa"))

    batch = batch_for("pad", "default", torch.bfloat16)
    selector = FirstValid()
    pruned = PrunedVLM(model, PruningPlan(stage1=selector, n1=N1, stage2="fastv", n2=N2, layer=K),
                       processor=R.processor("pad"))
    with torch.no_grad():
        out = pruned(**batch)
    assert out.logits.dtype == torch.bfloat16 and bool(torch.isfinite(out.logits).all())
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - 2 * (R.N - N2)
    kept1, kept2 = pruned.last_kept["stage1"], pruned.last_kept["stage2"]
    assert kept1.shape == (4, N1) and kept2.shape == (4, N2)
    valid = selector.seen[-1].valid_or_all()
    assert not bool(valid.all()) and bool(valid.gather(1, kept1).all()) and bool(valid.gather(1, kept2).all())
    assert selector.seen[-1].feats.dtype == torch.bfloat16
    ids = pruned.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert ids.shape == (2, batch["input_ids"].shape[1] + 3)


# ---- training through the CLI with DeepSpeed ZeRO-3 -----------------------------------------------------------

@pytest.mark.slow
def test_cli_fit_deepspeed_stage3_on_realistic_workspace(tmp_path):
    """`python -m trainer fit --trainer.strategy deepspeed_stage_3` on 2 CPU ranks, on a workspace whose model
    has the LLaVA-1.5 geometry and whose processor is llava-hf's (centre crop), with the 7B recipe's question-aware
    policy head and debiased FastV (at small width and 2 steps): the run trains and writes a
    ZeRO-3 checkpoint directory (one model-states shard per rank); the head exported from it prunes a prompt with
    two images of that model to n1 and n2 tokens per image."""
    from data.tiny import write_tiny_workspace

    workspace = write_tiny_workspace(tmp_path / "ws", n_train=8, n_eval=4, geometry="llava15")
    runs = tmp_path / "runs"
    env = dict(os.environ)
    env.update(LEARNPRUNE_TINY=str(workspace), LEARNPRUNE_RUNS=str(runs), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    # configs/tiny.yaml with the 7B recipe's head and stage 2 (configs/llava15_7b/learnpruner.yaml) at small width
    args = ["fit", "--config", str(REPO / "configs" / "tiny.yaml"),
            "--model.init_args.n1", str(N1), "--model.init_args.n2", str(N2), "--model.init_args.layer", str(K),
            "--model.init_args.stage2", "{name: debiased, inner: fastv, fit: sample}",
            "--model.init_args.head", "{features: pre, d_model: 32, depth: 1, heads: 2, question: true, mode: policy}",
            "--model.init_args.policy_samples", "2", "--model.init_args.tau_start", "1.0",
            "--model.init_args.tau_end", "1.0", "--data.init_args.batch_size", "2",
            "--trainer.devices", "2", "--trainer.strategy", "deepspeed_stage_3", "--trainer.max_steps", "2",
            "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ckpt = runs / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir(), f"{ckpt} is not a DeepSpeed checkpoint directory"
    shards = sorted(p.name for p in ckpt.glob("checkpoint/*model_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"], \
        shards

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from modules.head import PrunerHead
    from modules.serve import trained_plan
    from trainer.cli import export

    export(["--ckpt", str(ckpt), "--out", str(tmp_path / "head")])
    head = PrunerHead.from_pretrained(tmp_path / "head")
    assert (head.config.num_tokens, head.config.n1, head.config.n2, head.config.question) == (R.N, N1, N2, True)
    model = LlavaForConditionalGeneration.from_pretrained(workspace / "model").eval()
    processor = AutoProcessor.from_pretrained(workspace / "model")
    batch = R.make_batch(processor)
    pruned = PrunedVLM(model, trained_plan(head), processor=processor)
    with torch.no_grad():
        out = pruned(**batch)
    assert bool(torch.isfinite(out.logits).all())
    assert pruned.last_kept["stage1"].shape == (4, N1) and pruned.last_kept["stage2"].shape == (4, N2)
