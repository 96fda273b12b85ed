"""`python -m trainer fit` on tiny LLaVA-NeXT / LLaVA-OneVision workspaces (`python -m data.tiny --family ...`):
batches mix one- and two-image prompts and images of different view counts, the teacher gets image_sizes (and
batch_num_images), the head trains with ratio budgets (straight-through; policy on LLaVA-NeXT, whose replication
copies each prompt's images with it), exports, and the exported pruner serves the tiny model keeping
round(r * N_i) of each image's content tokens (image_newline tokens excluded) at each stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_qwen_cli import fit_and_export
from transformers import AutoModelForImageTextToText

from conftest import make_images
from data.processors import load_processor
from data.tiny import TinyLlavaOnevisionProcessor, tiny_llava_next, tiny_llava_next_processor, tiny_tokenizer
from modules.distill import MODEL_INPUTS, DistillPruner, replicate_batch
from modules.head import PrunerHead
from modules.serve import load_pruned

FAMILIES = {"llava_next": "tiny_llava_next.yaml", "llava_onevision": "tiny_llava_onevision.yaml"}


def test_replicate_batch_per_image_and_per_prompt():
    """Prompts with different numbers of images: pixel_values / image_sizes follow their prompt's copies image by
    image, batch_num_images and the text side prompt by prompt."""
    pixels = torch.arange(3 * 2 * 1).float().view(3, 2, 1)  # (images, views, ...)
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "pixel_values": pixels,
             "image_sizes": torch.tensor([[10, 11], [20, 21], [30, 31]]), "batch_num_images": torch.tensor([1, 2]),
             "skipped": 0}
    out, image_rows = replicate_batch(batch, 2)
    assert image_rows.tolist() == [0, 0, 1, 2, 1, 2]
    assert out["input_ids"].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]
    assert out["batch_num_images"].tolist() == [1, 1, 2, 2]
    assert torch.equal(out["pixel_values"], pixels[[0, 0, 1, 2, 1, 2]])
    assert out["image_sizes"][:, 0].tolist() == [10, 10, 20, 30, 20, 30] and out["skipped"] == 0
    # the same from each image's prompt (LLaVA-NeXT has no batch_num_images)
    del batch["batch_num_images"]
    assert replicate_batch(batch, 2, [0, 1, 1])[1].tolist() == [0, 0, 1, 2, 1, 2]
    with pytest.raises(ValueError, match="image_prompts"):
        replicate_batch(batch, 2)  # 3 images over 2 prompts: not uniform


def test_policy_loss_sums_each_prompts_images():
    """Rows showing different numbers of images: a row's selection log-probability sums its own images'."""
    torch.manual_seed(0)
    copies, rows = 2, torch.ones(4, 3, dtype=torch.bool)
    row_kl = torch.rand(12)
    log_prob = torch.randn(6)  # images of rows 0, 1 (one each), 2 and 3 (two each)
    item_rows = torch.tensor([0, 1, 2, 2, 3, 3])
    summed = torch.stack([log_prob[0], log_prob[1], log_prob[2:4].sum(), log_prob[4:].sum()])
    torch.testing.assert_close(DistillPruner.policy_loss(row_kl, rows, copies, log_prob, item_rows),
                               DistillPruner.policy_loss(row_kl, rows, copies, summed))


def test_teacher_inputs_follow_the_adapter(tmp_path):
    """The teacher gets what PrunedVLM gives the unpruned model: LLaVA-NeXT's image_sizes (its forward needs
    them), not the collator's bookkeeping (labels, prompt_end, skipped)."""
    tokenizer = tiny_tokenizer()
    tiny_llava_next(tokenizer).save_pretrained(tmp_path)
    processor = tiny_llava_next_processor(tokenizer)
    processor.save_pretrained(tmp_path)
    module = DistillPruner(model=str(tmp_path), n1=0.5, n2=0.25, layer=2, head={"d_model": 16, "depth": 1, "heads": 2})
    inputs = processor(images=make_images(((40, 20), (20, 60))),
                       text=["USER : <image> what is the color ? ASSISTANT : red"] * 2, return_tensors="pt",
                       padding=True)
    batch = {**inputs, "labels": inputs["input_ids"], "prompt_end": torch.tensor([5, 5]), "skipped": 0}
    seen = {}
    forward = module.vlm.forward

    def spy(**kwargs):
        seen.update(kwargs)
        return forward(**kwargs)

    module.vlm.forward = spy
    module._teacher(batch, want_hidden=False)
    assert set(seen) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "output_hidden_states",
                         "use_cache"}
    assert "batch_num_images" in MODEL_INPUTS


@pytest.mark.parametrize(("family", "mode"), [("llava_next", "straight_through"), ("llava_onevision", "straight_through"),
                                            ("llava_next", "policy")])
def test_fit_export_load_prune(family, mode, tmp_path):
    config = FAMILIES[family]
    workspace = fit_and_export(family, config, mode, tmp_path, timeout=400)
    processor = load_processor(workspace / "model")
    if family == "llava_onevision":
        assert type(processor) is TinyLlavaOnevisionProcessor

    head = PrunerHead.from_pretrained(tmp_path / "head")
    assert (head.config.n1, head.config.n2, head.config.layer) == (0.5, 0.25, 2)
    model = AutoModelForImageTextToText.from_pretrained(workspace / "model").eval()
    content = [{"type": "image"}, {"type": "text", "text": "what is the color ?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = make_images(((40, 20), (20, 60), (50, 50)))  # aspect ratios 2, 1/3, 1
    nested = [[im] for im in images] if family == "llava_onevision" else images
    inputs = processor(images=nested, text=[text] * 3, return_tensors="pt", padding=True)

    pruned = load_pruned(model, tmp_path / "head", processor=processor)
    with torch.no_grad():
        out = pruned(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs})
    n_tokens = out.pruning.num_tokens  # content tokens per image, image_newline tokens excluded
    image_tokens = (inputs["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert len(set(n_tokens)) == 3 and all(n < t for n, t in zip(n_tokens, image_tokens))  # newlines not counted
    for stage, ratio in (("stage1", 0.5), ("stage2", 0.25)):
        assert [len(k) for k in out.pruning.kept[stage]] == [int(np.floor(ratio * n + 0.5)) for n in n_tokens]
    with torch.no_grad():
        ids = pruned.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert ids.shape == (3, inputs["input_ids"].shape[1] + 2)
    for stage, ratio in (("stage1", 0.5), ("stage2", 0.25)):
        assert [len(k) for k in pruned.last_kept[stage]] == [int(np.floor(ratio * n + 0.5)) for n in n_tokens]
