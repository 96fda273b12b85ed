"""`python -m trainer test --config ...`: one table for the configured plan, printed and written as JSON.

The numbers come from `DistillPruner.test_step`'s torchmetrics (reduced over batches and processes by Lightning):
answer accuracy of the unpruned teacher and of the pruned model, retention (pruned / teacher), agreement with the
teacher, kept tokens per stage, the FLOPs-equivalent budget (visual tokens per layer, (K n1 + (L - K) n2) / L) and
the measured wall-clock time of the teacher's and the pruned model's forward over the test batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


def evaluation_report(metrics: dict[str, float]) -> dict[str, float | None]:
    """The table's values from the `test/...` metrics (plain floats, prefix stripped)."""
    m = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("test/")}
    if "accuracy" not in m:
        raise ValueError("no test metrics were logged: did the test loader yield any batch with an answer?")
    teacher, pruned = m["teacher_accuracy"], m["accuracy"]
    report = {
        "teacher_accuracy": teacher,
        "pruned_accuracy": pruned,
        "retention": pruned / teacher if teacher > 0 else None,
        "teacher_agreement": m["teacher_agreement"],
        "kl": m["kl"],
        "visual_tokens": m["visual_tokens"],
        "kept_stage1": m["kept_stage1"],
        "kept_stage2": m.get("kept_stage2"),
        "flops_equivalent_tokens": m["kept_ratio"] * m["visual_tokens"],
        "kept_ratio": m["kept_ratio"],
        "teacher_ms": m.get("teacher_ms"),
        "pruned_ms": m.get("pruned_ms"),
    }
    if report["teacher_ms"] and report["pruned_ms"]:
        report["speedup"] = report["teacher_ms"] / report["pruned_ms"]
    return report


def format_report(report: dict[str, float | None]) -> str:
    """A two-column markdown table: unpruned teacher | pruned."""

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    n = report["visual_tokens"]
    rows = [
        ("answer accuracy", pct(report["teacher_accuracy"]), pct(report["pruned_accuracy"])),
        ("retention (pruned / teacher)", "100.0%", pct(report["retention"])),
        ("agreement with the teacher (all answer tokens)", "100.0%", pct(report["teacher_agreement"])),
        ("KL(teacher || pruned), per answer token", "0", num(report["kl"], "{:.4f}")),
        ("visual tokens per item after stage 1", num(n), num(report["kept_stage1"])),
        ("visual tokens per item after stage 2", num(n), num(report["kept_stage2"])),
        ("FLOPs-equivalent visual tokens per layer", f"{num(n)} (100%)",
         f"{num(report['flops_equivalent_tokens'])} ({pct(report['kept_ratio'])})"),
        ("forward ms per batch (measured)", num(report["teacher_ms"]), num(report["pruned_ms"])),
    ]
    if report.get("speedup"):
        rows.append(("speed-up", "1.00x", f"{report['speedup']:.2f}x"))
    lines = ["| metric | unpruned | pruned |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


class EvaluationReport(L.Callback):
    """After `trainer.test`: print the evaluation table and write it as JSON to `path` (default:
    `<log dir or default_root_dir>/test_report.json`). Rank 0 prints and writes."""

    def __init__(self, path: str | None = None):
        self.path = path

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or "test/accuracy" not in trainer.callback_metrics:
            return
        report = evaluation_report({k: v.item() for k, v in trainer.callback_metrics.items()})
        self._write(trainer, report)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, report: dict) -> None:
        rank_zero_info("\n" + format_report(report))
        path = Path(self.path) if self.path else Path(trainer.log_dir or trainer.default_root_dir) / "test_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        rank_zero_info(f"evaluation report written to {path}")
