"""Distillation: what gets gradients, that the KL falls, and the LoRA path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from modules.distill import DistillPruner
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.selectors import Selector

HEAD = {"d_model": 32, "depth": 1, "heads": 2}


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
            pruned = PrunedVLM(module.vlm, PruningPlan(stage1=FixedSelection(keep[row:row + 1]), n1=n1))
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
    before = module._teacher(tiny_batch, False).logits
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.data.normal_()  # make the adapters matter
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
        module.shared_step(tiny_batch, module.val_metrics)
    values = module.val_metrics.compute()
    n_layers = 4
    assert values["val/kept_ratio"] == pytest.approx((1 * 8 + (n_layers - 1) * 2) / n_layers / 16)
    assert 0 <= values["val/teacher_agreement"] <= 1 and values["val/kl"] >= 0
    assert values["val/teacher_accuracy"] >= 0


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


def test_lora_pruner_exports_and_serves_identically(tiny_workspace, tiny_batch, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from modules.head import load_pruned

    module = make_module(tiny_workspace, n2=2, layer=2, lora={"r": 4}, ce_weight=1.0)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        module.shared_step(tiny_batch, module.train_metrics).backward()
        optimizer.step()
        optimizer.zero_grad()
    module.export_head(tmp_path / "pruner")
    assert (tmp_path / "pruner" / "adapter" / "adapter_model.safetensors").is_file()

    model = LlavaForConditionalGeneration.from_pretrained(tiny_workspace / "model").eval()
    model.model.multi_modal_projector.linear_2.weight.data *= 8  # as make_module did to the training copy
    served = load_pruned(model, tmp_path / "pruner")
    inputs = {k: tiny_batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "image_sizes")}
    module.eval()
    with torch.no_grad():
        expected = module.pruned(**inputs).logits
        got = served(**inputs).logits
    assert torch.equal(served.last_kept["stage1"], module.pruned.last_kept["stage1"])
    torch.testing.assert_close(got, expected)


def test_replicate_batch_keeps_each_prompt_with_its_images():
    from modules.distill import replicate_batch

    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "pixel_values": torch.arange(4).view(4, 1),
             "image_sizes": torch.arange(8).view(4, 2), "labels": torch.tensor([[5, 6], [7, 8]]), "meta": ["a", "b"]}
    out, image_rows = replicate_batch(batch, 3)  # two images per prompt
    assert out["input_ids"][:, 0].tolist() == [1, 1, 1, 3, 3, 3]
    assert image_rows.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    assert out["pixel_values"].flatten().tolist() == image_rows.tolist()
    assert torch.equal(out["image_sizes"], batch["image_sizes"][image_rows]) and out["meta"] == ["a", "b"]
