"""Distillation: what gets gradients, that the KL falls, and the LoRA path."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from modules.distill import DistillPruner
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.selectors import Selector

HEAD = {"d_model": 32, "depth": 1, "heads": 2}
SERVE_INPUTS = ("input_ids", "pixel_values", "attention_mask", "image_sizes")


def make_module(workspace, **kwargs) -> DistillPruner:
    torch.manual_seed(0)
    module = DistillPruner(model=str(workspace / "model"), **{"n1": 4, "head": HEAD, **kwargs})
    # a random tiny LM barely reads the image; louder image features make the pruning visible in the KL
    module.vlm.model.multi_modal_projector.linear_2.weight.data *= 8
    module.train()
    return module


def grads(module: DistillPruner) -> set[str]:
    return {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("mode", ["straight_through", "soft_mask", "policy"])
def test_gradients_reach_only_the_head_without_lora(tiny_workspace, tiny_batch, mode):
    module = make_module(tiny_workspace, n2=2, layer=2, head={**HEAD, "mode": mode})
    module.shared_step(tiny_batch, module.train_metrics).backward()
    touched = grads(module)
    head = {f"pruned.selector.{n}" for n, _ in module.head.named_parameters()}
    assert touched and touched <= head
    assert {n for n, p in module.named_parameters() if p.requires_grad} == head


def test_question_aware_head_learns_from_the_prompt(tiny_workspace, tiny_batch):
    module = make_module(tiny_workspace, head={**HEAD, "mode": "soft_mask", "question": True})
    module.shared_step(tiny_batch, module.train_metrics).backward()
    touched = grads(module)
    assert {"pruned.selector.proj_prompt.weight", "pruned.selector.proj_in.weight"} <= touched
    assert not any(name.startswith("pruned.model") for name in touched)  # the embeddings stay frozen


class FixedSelection(Selector):
    """Keeps given indices (one row): replays a selection the policy sampled."""

    def __init__(self, keep: torch.Tensor):
        self.kept = keep

    def keep(self, tokens, n):
        return self.kept


def test_policy_loss_is_reinforce_with_a_leave_one_out_baseline(tiny_workspace, tiny_batch):
    copies, n1 = 3, 3
    module = make_module(tiny_workspace, n1=n1, head={**HEAD, "mode": "policy"}, policy_samples=copies)
    module.head.noise_seed = 5
    loss = module.shared_step(tiny_batch, module.train_metrics)
    log_prob, keep = module.pruned.last_log_prob, module.pruned.last_kept["stage1"]
    rows = copies * tiny_batch["input_ids"].shape[0]
    assert log_prob.shape == (rows,) and keep.shape == (rows, n1)
    # independent reference: replay each sampled selection alone; reward = -(its mean KL over answer tokens),
    # baseline = the mean reward of the other copies of the same input
    teacher = module._teacher(tiny_batch, False).logits
    inputs = [k for k in ("input_ids", "pixel_values", "attention_mask", "image_sizes") if k in tiny_batch]
    per_copy, every_row = [], []
    with torch.no_grad():
        for row in range(rows):
            b = row // copies
            pruned = PrunedVLM(module.vlm, PruningPlan(stage1=FixedSelection(keep[row:row + 1]), n1=n1),
                               processor=module.pruned.adapter.processor)
            student = pruned(**{k: tiny_batch[k][b:b + 1] for k in inputs}).logits[0]
            positions = pruned.last_positions[0]  # the surviving rows of the pruned sequence
            answer = F.pad(tiny_batch["labels"][b, 1:], (0, 1), value=-100)[positions] != -100
            s, t = student[answer], teacher[b, positions][answer]
            kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
            per_copy.append(kl.mean())
            every_row.append(kl)
    reward = -torch.stack(per_copy).view(-1, copies)
    advantage = reward - (reward.sum(1, keepdim=True) - reward) / (copies - 1)
    expected = torch.cat(every_row).mean() - (advantage.flatten() * log_prob).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    loss.backward()
    assert grads(module) and all(name.startswith("pruned.selector.") for name in grads(module))
    with pytest.raises(ValueError, match="policy_samples=1"):
        make_module(tiny_workspace, head={**HEAD, "mode": "policy"}, policy_samples=1)


def test_lora_adapters_train_with_the_head_never_the_vision_tower(tiny_workspace, tiny_batch):
    module = make_module(tiny_workspace, lora={"r": 4}, ce_weight=0.5)
    module.shared_step(tiny_batch, module.train_metrics).backward()
    touched = grads(module)
    assert any(".lora_A." in n or ".lora_B." in n for n in touched)
    assert any(n.startswith("pruned.selector.") for n in touched)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in trainable)
    assert all(n.startswith("pruned.selector.") or "lora_" in n for n in trainable)
    assert all("language_model" in n for n in trainable if "lora_" in n)


def test_teacher_ignores_lora_adapters(tiny_workspace, tiny_batch):
    module = make_module(tiny_workspace, lora={"r": 4})
    inputs = {k: tiny_batch[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    before = module._teacher(tiny_batch, False).logits
    with torch.no_grad():
        torch.testing.assert_close(module.vlm(**inputs).logits, before)  # lora_B starts at 0: no effect yet
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.data.normal_()  # make the adapters matter
        assert not torch.allclose(module.vlm(**inputs).logits, before, atol=1e-3), "the adapters now matter"
    assert torch.equal(module._teacher(tiny_batch, False).logits, before)


@pytest.mark.parametrize("mode", ["straight_through", "soft_mask"])
def test_kl_falls_on_a_fixed_batch(tiny_workspace, tiny_batch, mode):
    module = make_module(tiny_workspace, n1=3, head={**HEAD, "mode": mode}, lr=1e-2)
    module.head.tau, module.head.noise_seed = 0.05, 0
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = module.shared_step(tiny_batch, module.train_metrics)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0], losses


def test_metrics_and_effective_budget(tiny_workspace, tiny_batch):
    module = make_module(tiny_workspace, n1=8, n2=2, layer=1)
    module.eval()
    with torch.no_grad():
        teacher = module._teacher(tiny_batch, False).logits
        # the teacher's own predictions as labels: its accuracy is 1, the student's is its agreement on them
        labels = tiny_batch["labels"].clone()
        answer = labels[:, 1:] != -100
        labels[:, 1:][answer] = teacher.argmax(-1)[:, :-1][answer]
        module.shared_step({**tiny_batch, "labels": labels}, module.val_metrics)
        student = module.pruned(**{k: tiny_batch[k] for k in SERVE_INPUTS},
                                prompt_end=tiny_batch.get("prompt_end")).logits
    values = module.val_metrics.compute()
    positions = module.pruned.last_positions
    t = teacher.gather(1, positions.unsqueeze(-1).expand(-1, -1, teacher.shape[-1]))
    rows = F.pad(labels[:, 1:], (0, 1), value=-100).gather(1, positions) != -100
    first = rows & (rows.cumsum(dim=1) == 1)
    kl = F.kl_div(student[rows].log_softmax(-1), t[rows].log_softmax(-1), log_target=True,
                  reduction="none").sum(-1).mean()
    agree = student.argmax(-1) == t.argmax(-1)
    assert float(kl) > 1e-4, "pruning 16 -> 8 -> 2 tokens changes the answer distribution"
    assert float(values["val/kl"]) == pytest.approx(float(kl), rel=1e-4)
    assert float(values["val/teacher_accuracy"]) == 1.0
    assert float(values["val/teacher_agreement"]) == pytest.approx(float(agree[rows].float().mean()))
    assert float(values["val/accuracy"]) == pytest.approx(float(agree[first].float().mean()))
    n_layers = 4
    assert values["val/kept_ratio"] == pytest.approx((1 * 8 + (n_layers - 1) * 2) / n_layers / 16)


def test_train_n1_draws_a_budget_per_step_and_restores_n1(tiny_workspace, tiny_batch):
    module = make_module(tiny_workspace, n1=4, train_n1=[2, 6, 0.5])
    drawn = []
    for step in range(12):
        # the hooks read the step and the schedule length from the trainer: a stand-in is enough
        module._trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=12, global_rank=0)
        module.on_train_batch_start(tiny_batch, step)
        drawn.append(module.pruned.plan.n1)
        with torch.no_grad():
            module.shared_step(tiny_batch, module.train_metrics)
        kept = module.pruned.last_kept["stage1"].shape[1]
        assert kept == (8 if drawn[-1] == 0.5 else drawn[-1])  # N = 16
        module.on_train_batch_end(None, tiny_batch, step)
        assert module.pruned.plan.n1 == 4
    module._trainer = None
    assert set(drawn) == {2, 6, 0.5}
    again = make_module(tiny_workspace, n1=4, train_n1=[2, 6, 0.5])
    for step in range(12):
        again._trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=12, global_rank=0)
        again.on_train_batch_start(tiny_batch, step)
        assert again.pruned.plan.n1 == drawn[step], "the draw depends on (seed, step) only"
    again._trainer = None


def test_init_head_continues_a_released_head_in_another_training_mode(tiny_workspace, tiny_batch, tmp_path):
    first = make_module(tiny_workspace, head={**HEAD, "mode": "soft_mask"})
    first.head.save_pretrained(tmp_path / "head")
    tuned = make_module(tiny_workspace, init_head=str(tmp_path / "head"),
                        head={**HEAD, "mode": "straight_through", "tau": 0.3})
    assert tuned.head.config.mode == "straight_through" and tuned.head.tau == 0.3
    for key, value in first.head.state_dict().items():
        assert torch.equal(value, tuned.head.state_dict()[key])
    tuned.head.noise_seed = 0
    tuned.shared_step(tiny_batch, tuned.train_metrics).backward()
    assert tuned.pruned.last_kept["stage1"].shape[1] == 4, "straight-through: hard top-n in training"
    with pytest.raises(ValueError, match="changes \\['d_model'\\]"):
        make_module(tiny_workspace, init_head=str(tmp_path / "head"), head={**HEAD, "d_model": 64})


def test_bad_arguments(tiny_workspace):
    with pytest.raises(ValueError, match="exactly one of model"):
        DistillPruner()
    with pytest.raises(ValueError, match="kl_temperature=0"):
        DistillPruner(model=str(tiny_workspace / "model"), kl_temperature=0)
    with pytest.raises(ValueError, match="unknown lora keys \\['rank'\\]"):
        DistillPruner(model=str(tiny_workspace / "model"), lora={"rank": 4})
    with pytest.raises(ValueError, match="train_n1=\\[\\]"):
        DistillPruner(model=str(tiny_workspace / "model"), train_n1=[])
    with pytest.raises(ValueError, match="n2=4 exceeds n1=2"):
        DistillPruner(model=str(tiny_workspace / "model"), n1=8, n2=4, train_n1=[8, 2])


def export_lora_pruner(workspace, batch, directory) -> DistillPruner:
    """A DistillPruner with LoRA, trained two steps and exported to `directory` (head + adapter/)."""
    module = make_module(workspace, n2=2, layer=2, lora={"r": 4}, ce_weight=1.0)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        module.shared_step(batch, module.train_metrics).backward()
        optimizer.step()
        optimizer.zero_grad()
    module.export_head(directory)
    assert (directory / "adapter" / "adapter_model.safetensors").is_file()
    return module


def serving_model(workspace):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(workspace / "model").eval()
    model.model.multi_modal_projector.linear_2.weight.data *= 8  # as make_module did to the training copy
    return model



def test_lora_pruner_exports_and_serves_identically(tiny_workspace, tiny_batch, tmp_path):
    from modules.serve import load_pruned

    module = export_lora_pruner(tiny_workspace, tiny_batch, tmp_path / "pruner")
    served = load_pruned(serving_model(tiny_workspace), tmp_path / "pruner", processor=module.pruned.adapter.processor)
    inputs = {k: tiny_batch[k] for k in SERVE_INPUTS}
    module.eval()
    with torch.no_grad():
        expected = module.pruned(**inputs).logits
        got = served(**inputs).logits
    assert torch.equal(served.last_kept["stage1"], module.pruned.last_kept["stage1"])
    torch.testing.assert_close(got, expected)


def test_load_pruned_from_a_hub_id_applies_its_lora_adapter(tiny_workspace, tiny_batch, tmp_path, monkeypatch):
    import huggingface_hub

    from modules.serve import load_pruned

    module = export_lora_pruner(tiny_workspace, tiny_batch, tmp_path / "snapshot")
    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):  # offline stand-in for the hub
        asked.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    processor = module.pruned.adapter.processor
    from_hub = load_pruned(serving_model(tiny_workspace), "org/name", processor=processor)
    local = load_pruned(serving_model(tiny_workspace), tmp_path / "snapshot", processor=processor)
    assert [repo for repo, _ in asked] == ["org/name"] and "adapter/*" in asked[0][1]
    assert from_hub.selector.source == "org/name"  # a plan still names the head by its hub id
    lora = {n for n, _ in from_hub.model.named_parameters() if "lora_" in n}
    assert lora and lora == {n for n, _ in local.model.named_parameters() if "lora_" in n}
    inputs = {k: tiny_batch[k] for k in SERVE_INPUTS}
    with torch.no_grad():
        bare = PrunedVLM(serving_model(tiny_workspace), from_hub.plan, processor=processor)(**inputs).logits
        got, expected = from_hub(**inputs).logits, local(**inputs).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(bare, expected, atol=1e-4), "the trained adapter changes the output"


def test_replicate_batch_keeps_each_prompt_with_its_images():
    from modules.distill import replicate_batch

    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "pixel_values": torch.arange(4).view(4, 1),
             "image_sizes": torch.arange(8).view(4, 2), "labels": torch.tensor([[5, 6], [7, 8]]), "meta": ["a", "b"]}
    out, image_rows = replicate_batch(batch, 3)  # two images per prompt
    assert out["input_ids"][:, 0].tolist() == [1, 1, 1, 3, 3, 3]
    assert image_rows.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    assert out["pixel_values"].flatten().tolist() == image_rows.tolist()
    assert torch.equal(out["image_sizes"], batch["image_sizes"][image_rows]) and out["meta"] == ["a", "b"]


# ---- gradient checkpointing, no KV cache in training -------------------------------------------------------------


def visible_dropout(module: DistillPruner, p: float = 0.5) -> None:
    """Give every dropout of the VLM a real rate, so that a VLM module left in training mode changes the logits."""
    for m in module.vlm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        for name in ("attention_dropout", "dropout"):  # Llama and CLIP attention read a float rate
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, p)


def count_attention_calls(module: DistillPruner) -> list[int]:
    """Appends to the returned list on every forward call of the first decoder layer's self-attention; a layer
    recomputed in the backward pass (gradient checkpointing) calls it again."""
    calls: list[int] = []
    layer = module.pruned.adapter.language_layers()[0]
    layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("mode, through_lm", [("straight_through", True), ("policy", False)])
def test_gradient_checkpointing_recomputes_the_language_model_without_dropout(tiny_workspace, tiny_batch, mode,
                                                                               through_lm):
    """Straight-through: the head's gradient flows back through every decoder layer, which checkpointing
    recomputes. Policy: the head's gradient is its log-probability alone; the student pass stays off the
    backward path, checkpointing or not."""
    runs = {}
    for checkpointing in (False, True):
        module = make_module(tiny_workspace, gradient_checkpointing=checkpointing, head={**HEAD, "mode": mode})
        visible_dropout(module)
        module.head.noise_seed = 0
        calls = count_attention_calls(module)
        losses, counts = [], []
        for seed in (1, 2):  # the global RNG drives dropout; the Gumbel noise follows noise_seed only
            torch.manual_seed(seed)
            module.zero_grad()
            calls.clear()
            loss = module.shared_step(tiny_batch, module.train_metrics)
            loss.backward()
            losses.append(loss.detach())
            counts.append(len(calls))
        runs[checkpointing] = losses, counts, {n: p.grad.clone() for n, p in module.named_parameters()
                                               if p.grad is not None}
    (plain_losses, plain_counts, plain_grads), (ckpt_losses, ckpt_counts, ckpt_grads) = runs[False], runs[True]
    assert plain_counts == [2, 2], "teacher and student pass"
    assert ckpt_counts == ([3, 3] if through_lm else [2, 2]), "+ the student's layer again in the backward pass"
    # no dropout anywhere in the VLM: another RNG state gives the same loss, with or without checkpointing
    assert torch.equal(plain_losses[0], plain_losses[1]) and torch.equal(ckpt_losses[0], ckpt_losses[1])
    assert torch.equal(plain_losses[0], ckpt_losses[0])
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


class StepProbe(L.Callback):
    """Per training batch: how often the first decoder layer's attention ran, and which VLM modules trained."""

    def __init__(self, calls: list[int]):
        self.calls, self.counts, self.training = calls, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.clear()
        self.training.append({id(m) for m in pl_module.vlm.modules() if m.training})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(len(self.calls))  # after the backward pass and the optimizer step


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_holds_through_trainer_fit(tiny_workspace, tiny_batch, checkpointing):
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    module = DistillPruner(model=str(tiny_workspace / "model"), n1=4, head=HEAD,
                           gradient_checkpointing=checkpointing)  # as a config builds it: no .train() call
    probe = StepProbe(count_attention_calls(module))
    batches = DataLoader([tiny_batch] * 2, batch_size=None)
    # a sanity validation before training and a validation after each step: Lightning's eval/restore of modes
    trainer = L.Trainer(accelerator="cpu", max_steps=2, val_check_interval=1, limit_val_batches=1,
                        num_sanity_val_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe])
    trainer.fit(module, batches, DataLoader([tiny_batch], batch_size=None))
    layers = {id(layer) for layer in module.pruned.adapter.language_layers()}
    assert probe.counts == ([3, 3] if checkpointing else [2, 2])
    # the decoder layers' own flag at most, never their attention, MLP or dropout
    assert probe.training == ([layers] * 2 if checkpointing else [set(), set()])


def test_training_builds_no_kv_cache(tiny_workspace, tiny_batch):
    module = make_module(tiny_workspace, n2=2, layer=2)
    inputs = {k: tiny_batch[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    with torch.no_grad():
        assert module.vlm(**inputs).get("cache") is not None, "the check below would see a cache"
    caches = []
    module.vlm.register_forward_hook(lambda m, args, kwargs, out: caches.append(out.get("cache")), with_kwargs=True)
    module.shared_step(tiny_batch, module.train_metrics).backward()
    assert caches == [None, None], "teacher and student pass"


# ---- the processor the batches are made with ----------------------------------------------------------------------


def test_processor_decides_which_tokens_are_padding(tiny_workspace, tiny_batch, tmp_path):
    from data.tiny import tiny_llava_processor, tiny_tokenizer

    tiny_llava_processor(tiny_tokenizer(), pad_to_square=False).save_pretrained(tmp_path / "crop")
    default = make_module(tiny_workspace)  # the workspace's processor pads to square: the model's, by default
    cropped = make_module(tiny_workspace, processor=str(tmp_path / "crop"))
    assert default.hparams.processor == str(tiny_workspace / "model")  # recorded resolved
    assert cropped.hparams.processor == str(tmp_path / "crop")
    pixels, sizes = tiny_batch["pixel_values"], tiny_batch["image_sizes"]
    assert bool((sizes[:, 0] != sizes[:, 1]).any()), "some images are not square"
    padded = default.pruned.encode(pixels, sizes).tokens.valid_or_all()
    assert not bool(padded.all()) and bool(padded.any(dim=1).all())  # every image shows some content
    assert bool(cropped.pruned.encode(pixels, sizes).tokens.valid_or_all().all())  # a crop leaves no padding


def test_model_config_takes_its_processor_explicitly(tiny_workspace, tiny_batch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_workspace / "model").to_dict()
    torch.manual_seed(0)
    bare = DistillPruner(model_config=config, n1=4, head=HEAD)
    assert bare.pruned.adapter.processor is None
    with pytest.raises(ValueError, match="processor"):
        bare.shared_step(tiny_batch, bare.train_metrics)  # image_sizes without the processor that made them
    no_sizes = {k: v for k, v in tiny_batch.items() if k != "image_sizes"}
    assert torch.isfinite(bare.shared_step(no_sizes, bare.train_metrics))
    torch.manual_seed(0)
    module = DistillPruner(model_config=config, n1=4, head=HEAD, processor=str(tiny_workspace / "model"))
    valid = module.pruned.encode(tiny_batch["pixel_values"], tiny_batch["image_sizes"]).tokens.valid_or_all()
    assert not bool(valid.all())  # the processor pads to square: non-square images show padding
    assert torch.isfinite(module.shared_step(tiny_batch, module.train_metrics))


def test_policy_loss_sums_the_log_probabilities_of_a_prompts_images():
    """With several images per prompt a sampled selection is that of every image: its log-probability is the sum."""
    copies, prompts, images = 2, 3, 2
    rows = torch.ones(prompts * copies, 4, dtype=torch.bool)
    row_kl = torch.rand(rows.shape[0] * 4)
    log_prob = torch.randn(prompts * copies * images)
    summed = log_prob.view(-1, images).sum(dim=1)
    expected = DistillPruner.policy_loss(row_kl, rows, copies, summed)
    torch.testing.assert_close(DistillPruner.policy_loss(row_kl, rows, copies, log_prob), expected)
