"""Train a pruning head by distillation from the unpruned VLM (same frozen weights as teacher and student).

batch -> teacher: frozen VLM, all visual tokens, no grad          -> logits at the answer positions
      -> student: head -> differentiable top-k -> splice -> (stage 2) -> logits at the same positions
loss = T^2 * KL(teacher || student at temperature T)  (+ hidden MSE, + answer CE, + soft-mask budget term)

Only the head (and, for domain fine-tuning, LoRA adapters of the language model) receive gradients. With LoRA,
the teacher runs with the adapters disabled, so it stays the original model.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from modules.budget import effective_budget
from modules.config import to_config
from modules.head import PrunerConfig, PrunerHead
from modules.metrics import distill_metrics
from modules.optim import adamw_warmup_cosine
from modules.pruned_vlm import PrunedVLM, PruningPlan, labels_at
from modules.vlm import get_adapter

# Batch keys handed to the pruned model (PrunedVLM keeps from the unpruned model those only learnprune reads, e.g.
# LLaVA-1.5's image_sizes; LLaVA-NeXT / OneVision's forward reads image_sizes and OneVision's batch_num_images).
MODEL_INPUTS = ("input_ids", "pixel_values", "attention_mask", "image_sizes", "batch_num_images", "image_grid_thw",
                "mm_token_type_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
DEFAULT_LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


def load_vlm(model: str | None, model_config: dict | None, attn_implementation: str, dtype: str | None
             ) -> nn.Module:
    """A transformers VLM from a path or hub id (`from_pretrained`), or randomly initialised from a config dict."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch_dtype = getattr(torch, dtype) if dtype else None
    if (model is None) == (model_config is None):
        raise ValueError("give exactly one of model (a path or hub id) and model_config (a config mapping)")
    if model is not None:
        return AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype,
                                                           attn_implementation=attn_implementation)
    config = dict(model_config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"model_config needs a 'model_type' key, got keys {sorted(model_config)}")
    cfg = AutoConfig.for_model(model_type, **config)
    cfg._attn_implementation = attn_implementation
    return AutoModelForImageTextToText.from_config(cfg, dtype=torch_dtype)


# batch entries with one row per image, not per prompt (LLaVA-NeXT / OneVision pixel_values: (images, views, C, H, W));
# OneVision's batch_num_images has one entry per prompt and is replicated with it
PER_IMAGE = ("pixel_values", "image_sizes", "image_grid_thw")


def replicated_rows(prompt_of: torch.Tensor, prompts: int, copies: int) -> torch.Tensor:
    """Rows of per-image (or per-item) entries after `replicate_batch`: `prompt_of` gives each entry's prompt (in
    batch order, a prompt's entries consecutive); each prompt's entries come `copies` times in a row."""
    prompt_of = torch.as_tensor(prompt_of).view(-1)
    if prompt_of.numel() == 0:
        return prompt_of.long()
    counts = torch.bincount(prompt_of, minlength=prompts).tolist()
    starts = [sum(counts[:p]) for p in range(prompts)]
    return torch.cat([torch.arange(starts[p], starts[p] + counts[p], device=prompt_of.device)
                      for p in range(prompts) for _ in range(copies)])


def replicate_batch(batch: dict[str, Any], copies: int, image_prompts: torch.Tensor | list[int] | None = None
                    ) -> tuple[dict[str, Any], torch.Tensor]:
    """Each prompt `copies` times in a row (prompt b -> rows b*copies ... b*copies + copies-1), its images with it;
    and the image row each new image row comes from.

    `image_prompts`: the prompt (row) of every image, in batch order (images of one prompt are consecutive), for
    prompts with different numbers of images; default: from `batch_num_images` (images per prompt) when the batch
    has it, else the same number of images per prompt."""
    prompts = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    grids = batch.get("image_grid_thw")
    n_images = batch["pixel_values"].shape[0] if grids is None else grids.shape[0]
    if image_prompts is None and batch.get("batch_num_images") is not None:
        counts = torch.as_tensor(batch["batch_num_images"], device=device).view(-1)
        image_prompts = torch.arange(prompts, device=device).repeat_interleave(counts)
    if image_prompts is None:
        if n_images % prompts:
            raise ValueError(f"{n_images} images over {prompts} prompts: pass image_prompts (each image's prompt)")
        image_prompts = torch.arange(prompts, device=device).repeat_interleave(n_images // prompts)
    image_prompts = torch.as_tensor(image_prompts, device=device).view(-1)
    if image_prompts.numel() != n_images or bool((image_prompts.diff() < 0).any()):
        raise ValueError(f"image_prompts {image_prompts.tolist()} must give each of the {n_images} images its "
                         "prompt, in batch order")
    prompt_rows = torch.arange(prompts, device=device).repeat_interleave(copies)
    image_rows = replicated_rows(image_prompts, prompts, copies)
    out = {}
    for key, value in batch.items():
        if key == "pixel_values" and grids is not None:
            pass  # Qwen's flat patches are not indexed per image; the encoded tokens passed along replace them
        elif torch.is_tensor(value) and value.dim() > 0:
            value = value[image_rows if key in PER_IMAGE else prompt_rows]
        out[key] = value
    return out, image_rows


def _timed(metrics, key: str, run):
    """`run()`; when `metrics` has `key` (the test metrics), its wall-clock milliseconds go there, the device's
    queued work included (CUDA runs asynchronously; training steps are never synchronised for it)."""
    if key not in metrics:
        return run()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = run()
    if cuda:
        torch.cuda.synchronize()
    metrics[key]((time.perf_counter() - start) * 1e3)
    return out


class DistillPruner(L.LightningModule):
    """LightningModule that trains a `PrunerHead` (stage 1) by distillation, optionally with stage 2 active.

    Args:
        model: path or hub id of the VLM (loaded with `from_pretrained`); or
        model_config: a config mapping with `model_type` (random weights; tests and toy runs).
        n1, n2: stage-1 / stage-2 budgets (int count or float ratio of N); n2 None = no stage 2 in training.
        train_n1: stage-1 budgets to draw from at each training step (seeded by step), so that one head ranks
            well at every budget it will serve; validation, test and the exported config use n1.
        stage2: stage-2 scorer (name or {"name": ..., ...}); layer: its decoder layer K (default L // 2).
        head: PrunerConfig fields (features, d_model, depth, heads, mode, tau).
        init_head: a released head directory to start from (domain fine-tuning); `head` may then only change
            how it trains (mode, tau), not its architecture.
        lora: {"r": 8, "alpha": 16, "dropout": 0.0, "target": regex} adds LoRA to the language model.
        kl_temperature, hidden_mse_weight, ce_weight, budget_weight: loss terms.
        tau_start, tau_end: Gumbel noise scale of the straight-through top-k (the policy's temperature in
            `head: {mode: policy}`), annealed linearly.
        policy_samples: selections sampled per training input in policy mode (>= 2: each sample's baseline is
            the mean reward of the others, REINFORCE leave-one-out); the student pass runs on that many copies.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up and cosine decay.
        gradient_checkpointing: recompute the language model's activations in the backward pass. The frozen VLM
            stays in eval mode (no dropout); only its decoder layers themselves, not their attention or MLP, are
            flagged as training, which is what transformers checks before checkpointing a layer.
        attn_implementation, dtype: how the VLM is loaded ("sdpa", "bfloat16", ...).
        processor: path or hub id of the processor the training batches are built with (its image geometry,
            pad-to-square or crop, decides which visual tokens are padding); default: `model`, none with
            `model_config`.
        seed: drives the Gumbel noise per (step, rank), so a resumed run continues exactly.
    """

    def __init__(
        self,
        model: str | None = None,
        model_config: dict[str, Any] | None = None,
        n1: int | float = 0.25,
        n2: int | float | None = None,
        train_n1: list[int | float] | None = None,
        stage2: str | dict[str, Any] | None = "fastv",
        layer: int | None = None,
        head: dict[str, Any] | None = None,
        init_head: str | None = None,
        lora: dict[str, Any] | None = None,
        kl_temperature: float = 1.0,
        hidden_mse_weight: float = 0.0,
        ce_weight: float = 0.0,
        budget_weight: float = 1.0,
        tau_start: float = 1.0,
        tau_end: float = 0.05,
        policy_samples: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        dtype: str | None = None,
        seed: int = 0,
        processor: str | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        if processor is None and model is not None:
            # recorded resolved, so hparams name the processor the adapter reads; Lightning also requires it to
            # equal a data module's `processor` hparam (the one the batches are made with), when that has one
            processor = model
        self.save_hyperparameters()
        if kl_temperature <= 0:
            raise ValueError(f"kl_temperature={kl_temperature} must be positive")
        if policy_samples < 2:
            raise ValueError(f"policy_samples={policy_samples}: the leave-one-out baseline needs at least 2")
        if train_n1 is not None and not train_n1:
            raise ValueError("train_n1=[] lists no budget; leave it unset to train at n1 only")
        for budget in train_n1 or ():
            # each drawn budget must make a valid plan (with n2 <= it)
            PruningPlan(stage1="random", n1=budget, stage2=stage2 if n2 is not None else None, n2=n2,
                        layer=layer if n2 is not None else None)
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.nonfinite_skipped = 0  # training steps skipped for a non-finite loss or gradient (skip_nonfinite)
        self._skip_step = False  # this optimizer step's gradients are dropped (decided on every rank alike)
        self._batch_ids: list | None = None  # record ids of the current training batch, for messages
        stage2_on = stage2 is not None and n2 is not None
        self.train_metrics = distill_metrics("train", stage2_on)
        self.val_metrics = distill_metrics("val", stage2_on)
        self.test_metrics = distill_metrics("test", stage2_on, timed=True)
        # Built here rather than in configure_model: under ZeRO-3 that hook runs inside deepspeed.zero.Init, where
        # from_pretrained would load into already-partitioned parameters; DeepSpeed partitions these at setup.
        self.pruned = self._build()
        self.train(self.training)  # sets the VLM's modes (see `train`)

    # ---- construction ------------------------------------------------------------------------------------
    def _build(self) -> PrunedVLM:
        hp = self.hparams
        vlm = load_vlm(hp.model, hp.model_config, hp.attn_implementation, hp.dtype)
        vlm.requires_grad_(False)
        if hp.gradient_checkpointing:
            # effective only in layers flagged as training, see `train`
            if hasattr(vlm, "activation_checkpointing_enable"):  # transformers >= 5.24
                vlm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # enabling also makes the input embeddings require grad (needed by reentrant checkpoints only): that
            # would put the frozen LM on the backward path where nothing needs it (the policy's student pass)
            vlm.disable_input_require_grads()
        adapter = get_adapter(vlm)
        if hp.init_head is not None:
            head = PrunerHead.from_pretrained(hp.init_head)
            self._override_training_fields(head, hp.head or {})
            head.check_compatible(adapter)
        else:
            head = PrunerHead.for_model(adapter, **(hp.head or {}))
        if hp.lora is not None:
            vlm = self._add_lora(vlm, hp.lora)
        head.train()
        plan = PruningPlan(stage1=head, n1=hp.n1, stage2=hp.stage2 if hp.n2 is not None else None, n2=hp.n2,
                           layer=hp.layer if hp.n2 is not None else None)
        pruned = PrunedVLM(vlm, plan, processor=self._load_processor())
        cfg = head.config
        cfg.n1, cfg.n2, cfg.layer = hp.n1, hp.n2, pruned.layer
        cfg.base_model = hp.model
        cfg.stage2 = None if plan.scorer is None else to_config(plan.scorer)
        return pruned

    def _load_processor(self):
        """The processor named by `processor` (default: `model`), or None with neither (a `model_config` run)."""
        if self.hparams.processor is None:
            return None
        # AutoProcessor, except Qwen-VL processors without their (torchvision) video processor: data/processors.py
        from data.processors import load_processor

        return load_processor(self.hparams.processor)

    def train(self, mode: bool = True) -> DistillPruner:
        """Train mode for the head and the LoRA adapters only: the frozen VLM stays in eval mode (no dropout).
        With gradient checkpointing, the language model's decoder layers are flagged as training too, the flag
        alone (their attention and MLP stay in eval mode): transformers checkpoints a layer only when its own
        `training` is set. Lightning's validation loop records and restores these per-module modes."""
        super().train(mode)
        if mode and getattr(self, "pruned", None) is not None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self.vlm.eval()
            for module in self.vlm.modules():
                if isinstance(module, BaseTunerLayer):
                    module.train()  # LoRA adapters train, their dropout included
            if self.hparams.gradient_checkpointing:
                for layer in self.pruned.adapter.language_layers():
                    layer.training = True
        return self

    @staticmethod
    def _override_training_fields(head: PrunerHead, overrides: dict[str, Any]) -> None:
        training = {"mode", "tau"}
        fixed = {k for k, v in overrides.items() if k not in training and getattr(head.config, k, None) != v}
        if fixed:
            raise ValueError(f"init_head fixes the head architecture; head={overrides} changes {sorted(fixed)}: "
                             f"only {sorted(training)} can be overridden")
        merged = PrunerConfig(**{**asdict(head.config), **{k: overrides[k] for k in training & set(overrides)}})
        head.config = merged
        head.tau = merged.tau

    def _add_lora(self, vlm: nn.Module, lora: dict[str, Any]) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        unknown = set(lora) - {"r", "alpha", "dropout", "target"}
        if unknown:
            raise ValueError(f"unknown lora keys {sorted(unknown)}; use r, alpha, dropout, target")
        config = LoraConfig(r=lora.get("r", 8), lora_alpha=lora.get("alpha", 16),
                            lora_dropout=lora.get("dropout", 0.0),
                            target_modules=lora.get("target", DEFAULT_LORA_TARGET))
        self.lora_config = config
        return inject_adapter_in_model(config, vlm)

    @property
    def head(self) -> PrunerHead:
        return self.pruned.selector

    @property
    def vlm(self) -> nn.Module:
        return self.pruned.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ---- the losses ------------------------------------------------------------------------------------------
    def _teacher(self, batch: dict[str, torch.Tensor], want_hidden: bool):
        # The model's own inputs, as PrunedVLM hands them to it: the text side, and the visual inputs less those
        # only learnprune reads (LLaVA-1.5's image_sizes); so Qwen-VL gets image_grid_thw and mm_token_type_ids
        # (M-RoPE positions), LLaVA-NeXT / OneVision image_sizes (and batch_num_images)
        vision, rest = self.pruned.split_vision({k: batch[k] for k in MODEL_INPUTS if k in batch})
        inputs = {**rest, **self.pruned.model_vision_inputs(vision)}
        with torch.no_grad(), self._adapters_disabled():
            return self.vlm(**inputs, output_hidden_states=want_hidden, use_cache=False)

    def _adapters_disabled(self):
        if self.hparams.lora is None:
            return contextlib.nullcontext()
        from peft.tuners.tuners_utils import BaseTunerLayer

        @contextlib.contextmanager
        def disabled():
            layers = [m for m in self.vlm.modules() if isinstance(m, BaseTunerLayer)]
            for m in layers:
                m.enable_adapters(False)
            try:
                yield
            finally:
                for m in layers:
                    m.enable_adapters(True)

        return disabled()

    def shared_step(self, batch: dict[str, torch.Tensor], metrics) -> torch.Tensor | None:
        if "input_ids" not in batch:  # every sample of the batch was a bad record
            return None
        hp = self.hparams
        want_hidden = hp.hidden_mse_weight > 0
        teacher = _timed(metrics, "teacher_ms", lambda: self._teacher(batch, want_hidden))
        t_logits_all = teacher.logits
        t_hidden_all = teacher.hidden_states[-1] if want_hidden else None
        copies = hp.policy_samples if self._policy_step() else 1
        vision_tokens = item_rows = None
        if copies > 1:  # several sampled selections per input; the teacher and the vision tower run once
            vision, _ = self.pruned.split_vision(batch)
            vision_tokens = self.pruned.encode(**vision)
            prompts = batch["input_ids"].shape[0]
            # visual items (images, or AnyRes views / video frames) by their prompt, as the adapter lays them out
            item_prompts = torch.tensor(self.item_rows(batch), dtype=torch.long, device=batch["input_ids"].device)
            batch, _ = replicate_batch(batch, copies, self._image_prompts(batch, item_prompts))
            vision_tokens = vision_tokens.index(replicated_rows(item_prompts, prompts, copies))
            # the row of every visual item of the copies (prompts may show different numbers of images)
            counts = torch.bincount(item_prompts, minlength=prompts).repeat_interleave(copies)
            item_rows = torch.arange(prompts * copies, device=counts.device).repeat_interleave(counts)
            t_logits_all = t_logits_all.repeat_interleave(copies, dim=0)
            t_hidden_all = None if t_hidden_all is None else t_hidden_all.repeat_interleave(copies, dim=0)
        labels = batch["labels"]
        student = _timed(metrics, "pruned_ms", lambda: self.pruned(
            **{k: batch[k] for k in MODEL_INPUTS if k in batch}, vision_tokens=vision_tokens,
            prompt_end=batch.get("prompt_end"), output_hidden_states=want_hidden, use_cache=False))
        pruning = student.pruning
        positions = pruning.positions  # (B, L_out) original index of each student row
        # row p predicts the label at p + 1; answers are text, so every predicting row survives pruning
        next_labels = labels_at(labels, positions)
        rows = next_labels != -100
        if not bool(rows.any()):
            raise ValueError("a batch has no answer tokens (labels are all -100)")
        s_logits = student.logits[rows].float()
        t_logits = t_logits_all.gather(1, positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, t_logits_all.shape[-1]))
        t_logits = t_logits[rows].float()
        temp = hp.kl_temperature
        row_kl = F.kl_div(F.log_softmax(s_logits / temp, -1), F.log_softmax(t_logits / temp, -1), log_target=True,
                          reduction="none").sum(-1) * temp**2
        kl = row_kl.mean()
        loss = kl
        if hp.hidden_mse_weight > 0:
            t_hidden = t_hidden_all.gather(1, positions.clamp(min=0).unsqueeze(-1)
                                           .expand(-1, -1, t_hidden_all.shape[-1]))
            loss = loss + hp.hidden_mse_weight * F.mse_loss(student.hidden_states[-1][rows].float(),
                                                            t_hidden[rows].float())
        if hp.ce_weight > 0:
            loss = loss + hp.ce_weight * F.cross_entropy(s_logits, next_labels[rows])
        if pruning.aux_loss is not None:
            loss = loss + hp.budget_weight * pruning.aux_loss
        if copies > 1:
            loss = loss + self.policy_loss(row_kl, rows, copies, pruning.log_prob, item_rows)
        # answers are judged on their first token (the one the prompt alone predicts), agreement on every token;
        # calling (not .update) keeps the batch value too, so the metrics log per step as well as per epoch
        first = rows & (rows.cumsum(dim=1) == 1)
        first_in_rows = first[rows]
        metrics["teacher_agreement"](s_logits.argmax(-1), t_logits.argmax(-1))
        metrics["accuracy"](s_logits[first_in_rows].argmax(-1), next_labels[first])
        metrics["teacher_accuracy"](t_logits[first_in_rows].argmax(-1), next_labels[first])
        metrics["kl"](kl.detach())
        metrics["kept_ratio"](torch.tensor(self.kept_ratio(pruning)))
        metrics["visual_tokens"](torch.tensor(pruning.num_tokens, dtype=torch.float32))
        for stage, kept in pruning.budgets.items():
            metrics[f"kept_{stage}"](torch.tensor(kept, dtype=torch.float32))
        return loss

    def _image_prompts(self, batch: dict, item_prompts: torch.Tensor) -> torch.Tensor | None:
        """The prompt of every image of a batch (prompts may show different numbers of images) when the visual
        items are the images; None otherwise (videos, AnyRes views as items, or batch_num_images, which
        `replicate_batch` reads itself)."""
        if (batch.get("pixel_values_videos") is not None or batch.get("batch_num_images") is not None
                or getattr(self.pruned.adapter, "view_unit", "image") != "image"):
            return None
        return item_prompts

    def _policy_step(self) -> bool:
        return self.head.config.mode == "policy" and self.head.training and torch.is_grad_enabled()

    @staticmethod
    def policy_loss(row_kl: torch.Tensor, rows: torch.Tensor, copies: int, log_prob: torch.Tensor,
                    item_rows: torch.Tensor | None = None) -> torch.Tensor:
        """REINFORCE with a leave-one-out baseline: reward = -KL of a sampled selection (mean over its answer
        rows), advantage = reward - mean reward of the other samples of the same input; returns
        -mean(advantage * log-probability of the selection). A prompt's selection is that of all its images, so
        its log-probability is the sum of theirs (`log_prob` is per image; `item_rows`: the row of each, needed
        when prompts show different numbers of images; default: the same number per row). The student's loss
        terms carry no gradient in this mode (its tokens are hard-selected), so this is what trains the head."""
        sample = rows.nonzero()[:, 0]
        per_sample = torch.zeros(rows.shape[0], device=row_kl.device).index_add(0, sample, row_kl.detach())
        reward = -(per_sample / rows.sum(dim=1).clamp(min=1)).view(-1, copies)
        baseline = (reward.sum(dim=1, keepdim=True) - reward) / (copies - 1)
        advantage = (reward - baseline).flatten()
        if item_rows is None:
            per_prompt = log_prob.view(rows.shape[0], -1).sum(dim=1)
        else:
            per_prompt = log_prob.new_zeros(rows.shape[0]).index_add(0, item_rows.to(log_prob.device), log_prob)
        return -(advantage * per_prompt).mean()

    def kept_ratio(self, pruning) -> float:
        """Mean over the batch's visual items of their FLOPs-equivalent kept tokens / N_i."""
        n1s, n2s = pruning.budgets["stage1"], pruning.budgets.get("stage2")
        ratios = [self.effective_tokens(n1, None if n2s is None else n2s[i]) / n
                  for i, (n1, n) in enumerate(zip(n1s, pruning.num_tokens, strict=True))]
        return sum(ratios) / len(ratios)

    def effective_tokens(self, n1: int, n2: int | None) -> float:
        """FLOPs-equivalent visual tokens per layer: (K * n1 + (L - K) * n2) / L."""
        return effective_budget(n1, n2, self.pruned.layer, self.pruned.adapter.num_layers)

    # ---- Lightning hooks -----------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx) -> None:
        total = max(1, self.trainer.estimated_stepping_batches)
        progress = min(1.0, self.global_step / total)
        hp = self.hparams
        self.head.tau = hp.tau_end + (hp.tau_start - hp.tau_end) * (1 - progress)
        self.head.noise_seed = hp.seed * 1_000_003 + self.global_step * 1009 + self.global_rank
        if hp.train_n1:
            # the same draw on every rank: the step, not the rank, picks the budget
            self.pruned.plan.n1 = hp.train_n1[random.Random(hp.seed * 7919 + self.global_step).randrange(
                len(hp.train_n1))]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.pruned.plan.n1 = self.hparams.n1

    def training_step(self, batch, batch_idx):
        self._batch_ids = batch.get("ids")
        loss = self.shared_step(batch, self.train_metrics)
        if self._any_rank(loss is not None and not bool(torch.isfinite(loss.detach()))):
            self._nonfinite("loss", loss)
            loss = None
            self._skip_step = True
        if loss is None:  # no usable record in this batch, or a skipped non-finite one
            return self._empty_step()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/tau", self.head.tau, batch_size=batch["input_ids"].shape[0])
        self.log_dict(self.train_metrics, on_step=True, on_epoch=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        if not self._skip_step and params:
            finite = torch.stack([torch.isfinite(p.grad).all() for p in params]).all()
            if self._any_rank(not bool(finite)):
                self._nonfinite("gradient", None)
                self._skip_step = True
        if self._skip_step:  # AdamW leaves parameters without gradients alone: no update, no moment, no decay
            for p in params:
                p.grad = None
            self._skip_step = False

    def _any_rank(self, flag: bool) -> bool:
        """`flag` on any process (a collective: every rank calls it at the same point of every step)."""
        trainer = self._trainer
        return trainer.strategy.reduce_boolean_decision(flag, all=False) if trainer is not None else flag

    def _nonfinite(self, what: str, loss: torch.Tensor | None) -> None:
        """Stop on a non-finite loss or gradient, naming the step and the batch's records; or, with
        skip_nonfinite, count the step as skipped and say so."""
        value = f" ({float(loss.detach())})" if loss is not None else ""
        where = (f"non-finite training {what}{value} at global step {self.global_step} (epoch {self.current_epoch});"
                 f" records of this batch on rank {self.global_rank}: {self._batch_ids}")
        if not self.hparams.skip_nonfinite:
            raise FloatingPointError(f"{where}. Training stops rather than continue on it; set "
                                     "model.skip_nonfinite: true to skip such steps (counted and logged).")
        self.nonfinite_skipped += 1
        rank_zero_warn(f"{where}: step skipped ({self.nonfinite_skipped} so far)")
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), reduce_fx="max")

    def _empty_step(self) -> torch.Tensor | None:
        """What a training step without a usable loss returns. One process: None (Lightning skips backward and
        the optimizer step). Several: Lightning requires a loss on every rank, so a zero one that reaches every
        trainable parameter (DDP all-reduces each gradient); a skipped non-finite step then has its gradients
        dropped in `on_before_optimizer_step` on every rank. Under DeepSpeed the engine owns the gradients and
        steps anyway: the step runs with zero gradients (Adam's moments decay by one step)."""
        if self.trainer.world_size == 1:
            self._skip_step = False
            return None
        return sum((p * 0).sum() for p in self.trainable_parameters())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_skipped = int(checkpoint.get("nonfinite_skipped", 0))

    def validation_step(self, batch, batch_idx):
        loss = self.shared_step(batch, self.val_metrics)
        if loss is not None:
            self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
            self.log_dict(self.val_metrics, batch_size=batch["input_ids"].shape[0])

    def test_step(self, batch, batch_idx):
        loss = self.shared_step(batch, self.test_metrics)
        if loss is not None:
            self.log("test/loss", loss, batch_size=batch["input_ids"].shape[0], sync_dist=True)
            self.log_dict(self.test_metrics, batch_size=batch["input_ids"].shape[0])

    def predict_step(self, batch, batch_idx):
        """Teacher-forced predictions per sample: kept visual tokens ({stage: one index list per image of the
        prompt}) and the student's answer tokens."""
        if "input_ids" not in batch:
            return []
        out = self.pruned(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, prompt_end=batch.get("prompt_end"),
                          use_cache=False)
        next_labels = labels_at(batch["labels"], out.pruning.positions)
        predicted = out.logits.argmax(-1)
        item_rows = self.item_rows(batch)
        return [{"kept": {k: [v[j].tolist() for j in range(len(v)) if item_rows[j] == i]
                          for k, v in out.pruning.kept.items()},
                 "predicted": predicted[i][next_labels[i] != -100].tolist(),
                 "labels": next_labels[i][next_labels[i] != -100].tolist()}
                for i in range(predicted.shape[0])]

    def item_rows(self, batch: dict) -> list[int]:
        """The row (prompt) of every visual item of a batch."""
        vision, _ = self.pruned.split_vision(batch)
        spans = self.pruned.adapter.item_spans(batch["input_ids"], vision)
        return [row for row, _ in spans]

    @torch.no_grad()
    def evaluate(self, loader, max_batches: int | None = None) -> dict[str, float]:
        """Metrics of the current head (inference-mode selection) over a dataloader, outside the Trainer loop.

        In a multi-process run call it on EVERY rank with the same batches (e.g. the same unsharded loader):
        under ZeRO-3 each forward pass gathers partitioned weights with collectives, so ranks that run
        different numbers of batches hang; the metrics are synchronised across ranks as they are computed."""
        was_training = self.training
        self.eval()
        metrics = distill_metrics("eval", self.pruned.plan.scorer is not None).to(self.device)
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            self.shared_step(batch, metrics)
        values = {k.split("/", 1)[1]: float(v) for k, v in metrics.compute().items()}
        self.train(was_training)
        return values

    def configure_optimizers(self):
        hp = self.hparams
        params = self.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: the head and LoRA adapters have no trainable parameters")
        return adamw_warmup_cosine(params, hp.lr, hp.weight_decay, hp.warmup_steps,
                                   self.trainer.estimated_stepping_batches)

    # ---- checkpoints: only what trains -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning's DeepSpeed save drops checkpoint["state_dict"] and lets DeepSpeed write the module
        # itself: there the frozen VLM stays out through the strategy's exclude_frozen_parameters
        # (trainer/strategies.py).
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["pruner_config"] = asdict(self.head.config)
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        if self.hparams.lora is not None:
            checkpoint["lora_config"] = self.lora_config.to_dict()

    def export_head(self, directory, metrics: dict[str, float] | None = None,
                    training_data: str | None = None) -> None:
        """Write the head (and LoRA adapters) as a pruner directory; `metrics` (e.g. `evaluate`'s) and
        `training_data` go on its model card.

        Under DeepSpeed ZeRO-3 each rank holds a shard of every parameter: call this on EVERY rank (it gathers
        the trained weights with collectives, `deepspeed.zero.GatheredParameters`); rank 0 writes the full
        weights, the other ranks write nothing."""
        with _gathered(self.trainable_parameters()):
            state = {}
            if self.global_rank == 0:
                # inside the context the gathered parameters hold their full data; the frozen VLM's are not
                # needed (and stay partitioned placeholders): keep the head's and the adapters' entries only
                state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()
                         if k.startswith(HEAD_PREFIX) or _is_lora_key(k)}
        if self.global_rank == 0:
            export_pruner(directory, asdict(self.head.config), state,
                          self.lora_config.to_dict() if self.hparams.lora is not None else None,
                          metrics=metrics, training_data=training_data)


HEAD_PREFIX = "pruned.selector."
MODEL_PREFIX = "pruned.model."


def _is_lora_key(key: str) -> bool:
    """A training state-dict key of the language model's LoRA adapters."""
    return key.startswith(MODEL_PREFIX) and "lora_" in key


def _gathered(params: list[torch.Tensor]):
    """`deepspeed.zero.GatheredParameters(params)` when some of them are ZeRO-3 partitioned (a collective:
    every rank must enter it), else a no-op that does not import deepspeed."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def export_pruner(directory, pruner_config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                  lora_config: dict[str, Any] | None = None, *, metrics: dict[str, Any] | None = None,
                  training_data: str | None = None):
    """Write a pruner directory from a training state dict: the head (pruner_config.json with `format_version`,
    model.safetensors), the model card README.md, and `adapter/` for LoRA weights.

    pruner_config: the head's config mapping (a training checkpoint's `pruner_config`); its `base_model` (the VLM's
        HF id or path) is recorded and shown on the card when present. Keys a newer learnprune wrote warn and are
        dropped (`PrunerConfig.from_dict`).
    metrics: measured on held-out data (accuracy, teacher_accuracy, kept_ratio, ...; plain or "test/"-prefixed),
        shown on the card as the retention (pruned / teacher accuracy) and kept ratio.
    training_data: what the head was trained on (e.g. the data config's train path), shown on the card."""
    from pathlib import Path

    from modules.head import ADAPTER_DIR, CONFIG_NAME

    head_state = {k[len(HEAD_PREFIX):]: v for k, v in state_dict.items() if k.startswith(HEAD_PREFIX)}
    if not head_state:
        raise ValueError(f"the checkpoint holds no head weights (no keys starting with {HEAD_PREFIX!r})")
    head = PrunerHead(PrunerConfig.from_dict(pruner_config, source="pruner_config"))
    try:
        head.load_state_dict(head_state)
    except RuntimeError as err:
        raise ValueError(f"the checkpoint's head weights do not match its pruner_config: {err}") from None
    lora_state = {k[len(MODEL_PREFIX):]: v.detach().cpu().contiguous() for k, v in state_dict.items()
                  if _is_lora_key(k)}
    has_lora = lora_config is not None and bool(lora_state)
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"{str(directory)!r} exists and is not a pruner directory (no {CONFIG_NAME}): export to a "
                         "new or empty directory, or to an earlier export (which is replaced whole)")
    with _replaced_atomically(directory) as staging:
        head.save_pretrained(staging, model_card_kwargs={"metrics": metrics, "training_data": training_data,
                                                         "lora": has_lora})
        if has_lora:
            _write_adapter(staging / ADAPTER_DIR, lora_config, lora_state)
    return directory


@contextlib.contextmanager
def _replaced_atomically(directory):
    """Yield an empty staging directory next to `directory`; when the block completes, the staging directory
    becomes `directory` (an earlier one is replaced whole: none of its files, e.g. a stale adapter, survive).
    A process killed while writing leaves `directory` as it was; killed between the two renames, it leaves the
    previous export beside it (`.<name>.previous-<pid>`) and no partial directory under the name."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = directory.parent / f".{directory.name}.previous-{os.getpid()}"
    if directory.exists():
        os.rename(directory, previous)
    os.rename(staging, directory)
    shutil.rmtree(previous, ignore_errors=True)


def _write_adapter(adapter_dir, lora_config: dict[str, Any], lora_state: dict[str, torch.Tensor]) -> None:
    """`adapter/` in peft format: adapter_config.json + adapter_model.safetensors (keys as the model names them)."""
    import json

    from safetensors.torch import save_file

    adapter_dir.mkdir(exist_ok=True)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora_config.items()}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    save_file(lora_state, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
