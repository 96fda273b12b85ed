"""Distillation metrics as torchmetrics, so they reduce correctly across processes and epochs."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric, Metric, MetricCollection


class AnswerAgreement(Metric):
    """Fraction of answer tokens where the student's top-1 equals a reference (teacher top-1 or the label)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("hits", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor, reference: torch.Tensor) -> None:
        self.hits += (predicted == reference).sum().float()
        self.total += reference.numel()

    def compute(self) -> torch.Tensor:
        return self.hits / self.total.clamp(min=1)


def distill_metrics(prefix: str, stage2: bool = False, timed: bool = False) -> MetricCollection:
    """Named `{prefix}/...`: teacher_agreement (student top-1 == teacher top-1 over all answer tokens), accuracy
    and teacher_accuracy (first answer token == label, i.e. what the prompt alone predicts), kl, kept_ratio
    (FLOPs-equivalent visual tokens per layer / N), visual_tokens (N per visual item), kept_stage1 and
    kept_stage2 (tokens each stage keeps per item; stage 2 only when the plan has one); with `timed`, also
    teacher_ms and pruned_ms (milliseconds of the teacher's and the pruned model's forward over each batch)."""
    metrics = {
        "teacher_agreement": AnswerAgreement(),
        "accuracy": AnswerAgreement(),
        "teacher_accuracy": AnswerAgreement(),
        "kl": MeanMetric(),
        "kept_ratio": MeanMetric(),
        "visual_tokens": MeanMetric(),
        "kept_stage1": MeanMetric(),
    }
    if stage2:
        metrics["kept_stage2"] = MeanMetric()
    if timed:
        metrics.update(teacher_ms=MeanMetric(), pruned_ms=MeanMetric())
    return MetricCollection(metrics, prefix=f"{prefix}/")
