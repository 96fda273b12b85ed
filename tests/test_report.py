"""`python -m trainer test --config ...`: one evaluation table for the configured plan, printed and as JSON."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import CONFIG, run_trainer

from data.datamodule import LlavaDataModule
from modules.distill import DistillPruner
from trainer.report import evaluation_report, format_report


def test_trainer_test_prints_and_writes_the_evaluation_table(tiny_workspace, tmp_path):
    report_path = tmp_path / "report.json"
    callbacks = tmp_path / "report.yaml"
    callbacks.write_text("trainer:\n  callbacks:\n    - class_path: trainer.report.EvaluationReport\n"
                         f"      init_args: {{path: {report_path}}}\n")
    proc = run_trainer(["test", "--config", CONFIG, "--config", str(callbacks)], tiny_workspace, tmp_path)
    report = json.loads(report_path.read_text())
    out = proc.stdout + proc.stderr
    assert "| answer accuracy |" in out and "| FLOPs-equivalent visual tokens per layer |" in out
    # the budgets of configs/tiny.yaml: n1 = 6, n2 = 3 of N = 16 tokens, K = 2 of L = 4 layers
    assert report["visual_tokens"] == 16 and report["kept_stage1"] == 6 and report["kept_stage2"] == 3
    assert report["flops_equivalent_tokens"] == pytest.approx((2 * 6 + 2 * 3) / 4)
    assert report["teacher_ms"] > 0 and report["pruned_ms"] > 0
    assert report["speedup"] == pytest.approx(report["teacher_ms"] / report["pruned_ms"])

    # the accuracies are the model's over the whole test split: recompute them outside the Trainer
    model = DistillPruner(model=str(tiny_workspace / "model"), n1=6, n2=3, stage2="fastv", layer=2,
                          head={"d_model": 32, "depth": 1, "heads": 2})
    torch.manual_seed(0)
    model.head.load_state_dict(_fresh_head_state(tiny_workspace))
    data = LlavaDataModule(image_root=str(tiny_workspace / "images"), train_json=str(tiny_workspace / "train.json"),
                           val_json=str(tiny_workspace / "val.json"), test_json=str(tiny_workspace / "test.json"),
                           processor=str(tiny_workspace / "model"), batch_size=8)
    data.setup("test")
    values = model.evaluate(data.test_dataloader())
    assert report["teacher_accuracy"] == pytest.approx(values["teacher_accuracy"])
    assert report["pruned_accuracy"] == pytest.approx(values["accuracy"])
    if values["teacher_accuracy"] > 0:  # a random tiny model may answer nothing right
        assert report["retention"] == pytest.approx(values["accuracy"] / values["teacher_accuracy"])


def _fresh_head_state(workspace) -> dict:
    """The head `python -m trainer test` builds: seed_everything(0), then DistillPruner's construction."""
    from lightning.pytorch import seed_everything

    seed_everything(0)
    return DistillPruner(model=str(workspace / "model"), n1=6, n2=3, stage2="fastv", layer=2,
                         head={"d_model": 32, "depth": 1, "heads": 2}).head.state_dict()


def test_report_without_stage2_or_answers():
    metrics = {"test/accuracy": 0.5, "test/teacher_accuracy": 0.8, "test/teacher_agreement": 0.9, "test/kl": 0.1,
               "test/visual_tokens": 576.0, "test/kept_stage1": 64.0, "test/kept_ratio": 64 / 576}
    report = evaluation_report(metrics)
    assert report["retention"] == pytest.approx(0.625) and report["kept_stage2"] is None
    assert report["flops_equivalent_tokens"] == pytest.approx(64.0) and "speedup" not in report
    table = format_report(report)
    assert "| answer accuracy | 80.0% | 50.0% |" in table and "| visual tokens per item after stage 2 | 576.0 | - |" in table
    with pytest.raises(ValueError, match="no test metrics"):
        evaluation_report({"val/accuracy": 1.0})
