"""Accuracy of every pruning method at matched budgets on ToyWorld, behind three sanity gates.

    python bench/accuracy.py --teacher checkpoints/toyworld-teacher --head checkpoints/toyworld-pruner \
        --data outputs/toyworld/data --n-test 1000 --out bench/out/accuracy

An answer counts as correct when the argmax of the next-token logits after the prompt equals the first token of
the (one-word) answer. Budgets are fractions of the N visual tokens; every stage-1 selector, every stage-2 scorer
(with and without attention debiasing), the learned head (alone and with a debiased FastV stage 2 at the same
effective budget) and two oracles that know where the objects are run at each budget.

The comparison is refused (exit code 2) unless the teacher is worth pruning: it must beat the majority baseline
clearly (gate a), it must actually look at the image (gate b: shuffling images within a batch hurts), and pruning
must be able to matter (gate c: at the smallest budget the question oracle beats random).

Writes accuracy.md, accuracy.json, accuracy.png (and overlay.png with --overlay > 0) to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from data.llava_json import LlavaJsonDataset
from data.toyworld import QUESTION_TYPES, majority_baselines, write_split
from modules.budget import effective_budget, topk_keep
from modules.calibrate import calibrate
from modules.overlay import grid_views, kept_per_item, render_grid
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.scorers import DEFAULT_SCORERS, get_scorer
from modules.scorers.debiased import Debiased
from modules.selectors import DEFAULT_SELECTORS, Selector
from modules.vlm import get_adapter
from modules.vlm.base import VisionTokens

BUDGETS = (0.5, 0.25, 0.11, 0.055)
GATE_BUDGET = 0.055
OVERLAY_BUDGET = 0.11
OVERLAY_METHODS = ("random", "fastervlm", "vispruner", "divprune", "stage2:fastv", "learned", "oracle-question")
STAGE2_PREFIX = "stage2:"  # some methods exist at both stages (finepruner): stage-2 rows are named apart
# gate thresholds (see `check_gates`)
MIN_GAIN_OVER_MAJORITY = 0.15
SHUFFLE_DROP_FRACTION = 0.5
MIN_ORACLE_GAIN = 0.03
REFUSED_EXIT_CODE = 2


# -- oracles ---------------------------------------------------------------------------------------------------------


class OracleSelector(Selector):
    """Keeps the tokens with the highest per-batch `priority` (B, N), ties by lower index, padding last.

    The priority comes from the ground truth of each sample, so it is set by the bench before every batch
    (`set_batch`); a stale or missing priority would silently score the wrong images, so it must match the batch.
    """

    name = "oracle"

    def __init__(self) -> None:
        self.priority: torch.Tensor | None = None

    def set_batch(self, metas: list[dict], num_tokens: int) -> None:
        self.priority = torch.stack([self.priority_for(m, num_tokens) for m in metas])

    def priority_for(self, meta: dict, num_tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def keep(self, tokens: VisionTokens, n: int) -> torch.Tensor:
        if self.priority is None or tuple(self.priority.shape) != (tokens.batch_size, tokens.num_tokens):
            got = None if self.priority is None else tuple(self.priority.shape)
            raise RuntimeError(f"{type(self).__name__}: priority {got} does not match the batch "
                               f"({tokens.batch_size}, {tokens.num_tokens}); call set_batch first")
        return topk_keep(self.priority.to(tokens.feats.device), n, tokens.valid)


class ObjectsOracle(OracleSelector):
    """Every patch of every object first."""

    name = "oracle-objects"

    def priority_for(self, meta: dict, num_tokens: int) -> torch.Tensor:
        p = torch.zeros(num_tokens)
        p[meta["object_patches"]] = 1.0
        return p


class QuestionOracle(OracleSelector):
    """The patches of the objects the question is about first, then the other objects, then the rest."""

    name = "oracle-question"

    def priority_for(self, meta: dict, num_tokens: int) -> torch.Tensor:
        p = torch.zeros(num_tokens)
        p[meta["object_patches"]] = 1.0
        p[meta["target_patches"]] = 2.0
        return p


# -- budgets ---------------------------------------------------------------------------------------------------------


def round_half_up(x: float) -> int:
    # Python's round() rounds halves to even, which would make n2 = n/2 jump between budgets (2.5 -> 2, 3.5 -> 4)
    return math.floor(x + 0.5)


def budget_count(fraction: float, num_tokens: int) -> int:
    return max(1, round_half_up(fraction * num_tokens))


def solve_two_stage(n: int, num_tokens: int, layer: int, num_layers: int) -> tuple[int, int]:
    """(n1, n2) with n2 ~ n / 2 and an effective budget (K n1 + (L - K) n2) / L as close to n as counts allow."""
    n2 = max(1, round_half_up(n / 2))
    n1 = round_half_up((num_layers * n - (num_layers - layer) * n2) / layer)
    return max(n2, min(num_tokens, n1)), n2


# -- data ------------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    id: str
    image: Image.Image
    image_size: tuple[int, int]  # (height, width)
    messages: list[dict]  # the user turn only
    meta: dict


def load_split(root: Path, split: str, n: int, write_n: int) -> list[Sample]:
    """The first n samples of `split` with their meta, writing `write_n` samples first if the split is missing."""
    if not (root / f"{split}.json").is_file():
        print(f"writing ToyWorld {split} split ({write_n} samples) to {root}")
        write_split(root, split, write_n)
    meta = json.loads((root / f"{split}_meta.json").read_text())
    dataset = LlavaJsonDataset(root / f"{split}.json", root / "images")
    samples = []
    for i in range(min(n, len(dataset))):
        item = dataset[i]
        if item is None:  # unreadable image: counted in dataset.skipped
            continue
        samples.append(Sample(item["id"], item["image"], item["image_size"], item["messages"][:1], meta[item["id"]]))
    if len(samples) < n:
        print(f"note: {split} has {len(samples)} usable samples, fewer than the {n} asked for "
              f"({dataset.summary()})")
    return samples


def answer_token_id(processor, messages: list[dict], answer: str) -> int:
    """The first token of the answer as the model would produce it after the generation prompt."""
    tokenizer = processor.tokenizer
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = processor.apply_chat_template(
        messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if len(full_ids) > len(prompt_ids) and full_ids[:len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids)]
    # templates that merge the answer into the generation prompt's last token: tokenize the answer alone
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]


def encode_batches(processor, samples: list[Sample], batch_size: int) -> list[dict]:
    """Prompt-only model inputs per batch (left padded), plus the answer token ids and the samples' meta."""
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        prompts = [processor.apply_chat_template(s.messages, tokenize=False, add_generation_prompt=True)
                   for s in chunk]
        enc = processor(images=[s.image for s in chunk], text=prompts, return_tensors="pt", padding=True)
        batches.append({
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values": enc["pixel_values"],
            "image_sizes": torch.tensor([s.image_size for s in chunk]),
            "answer_ids": torch.tensor([answer_token_id(processor, s.messages, s.meta["answer"]) for s in chunk]),
            "meta": [s.meta for s in chunk],
        })
    return batches


# -- evaluation ------------------------------------------------------------------------------------------------------

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


def model_inputs(batch: dict, device: torch.device, shuffle_images: bool = False) -> dict:
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS}
    if shuffle_images:
        # each prompt gets its neighbour's image (and that image's size, so its padding is still known)
        inputs["pixel_values"] = inputs["pixel_values"].roll(1, dims=0)
        inputs["image_sizes"] = inputs["image_sizes"].roll(1, dims=0)
    return inputs


@torch.no_grad()
def evaluate(model, plan: PruningPlan, batches: list[dict], num_tokens: int, shuffle_images: bool = False,
             processor=None) -> torch.Tensor:
    """(n_samples,) bool: is the argmax of the last-position logits the answer's first token. `processor`: the one
    that made the batches (it tells which visual tokens are padding)."""
    pruned = PrunedVLM(model, plan, processor=processor)
    device = next(model.parameters()).device
    correct = []
    for batch in batches:
        if isinstance(plan.selector, OracleSelector):
            plan.selector.set_batch(batch["meta"], num_tokens)
        out = pruned(**model_inputs(batch, device, shuffle_images), logits_to_keep=1)
        correct.append(out.logits[:, -1].argmax(dim=-1).cpu() == batch["answer_ids"])
    return torch.cat(correct)


def summarize(correct: torch.Tensor, qtypes: list[str]) -> dict:
    per_type = {}
    for qtype in QUESTION_TYPES:
        mask = torch.tensor([t == qtype for t in qtypes])
        if bool(mask.any()):
            per_type[qtype] = float(correct[mask].float().mean())
    return {"accuracy": float(correct.float().mean()), "per_type": per_type}


# -- conditions ------------------------------------------------------------------------------------------------------


@dataclass
class Condition:
    """A method evaluated at every budget: `plan(n)` builds its PruningPlan for n kept tokens per image."""

    name: str
    plan: Callable[[int], PruningPlan]
    kept_stage: str = "stage1"  # which `last_kept` entry shows the tokens that reach the answer
    dashed: bool = False
    layer: int | None = None  # stage-2 layer K, for stage-2 conditions
    needs_calibration: list = field(default_factory=list)  # (component, calibration plan) pairs
    budgets_used: dict = field(default_factory=dict)  # n -> {"n1", "n2", "n_eff"} when it is not simply n


def own(component):
    """A fresh copy of a default instance: each condition owns its components, so calibrating one condition (which
    fits the wrapper and the method it wraps, e.g. AgilePruner's erank_scale) never changes another condition, nor the
    shared DEFAULT_SELECTORS / DEFAULT_SCORERS."""
    return copy.deepcopy(component)


def stage1_conditions() -> list[Condition]:
    conditions = []
    for default in DEFAULT_SELECTORS:
        if default.name == "debiased":
            continue  # the registered default wraps fastervlm: it is "fastervlm+debias" below
        plain = own(default)
        conditions.append(Condition(default.name, lambda n, s=plain: PruningPlan(stage1=s, n1=n)))
        if hasattr(default, "score"):  # attention-based: debiasing applies
            wrapped = Debiased(own(default))
            conditions.append(Condition(f"{default.name}+debias",
                                        lambda n, s=wrapped: PruningPlan(stage1=s, n1=n),
                                        needs_calibration=[(wrapped, lambda s=wrapped: PruningPlan(stage1=s, n1=1))]))
    return conditions


def stage2_conditions(layer: int, num_tokens: int, num_layers: int) -> list[Condition]:
    """Stage-2 scorers alone: all N tokens up to layer K, n after it. Their compute is NOT that of n tokens:
    the effective budget (K N + (L - K) n) / L is recorded so the table can say so."""
    conditions = []
    used = {n: {"n1": num_tokens, "n2": n, "layer": layer,
                "n_eff": effective_budget(num_tokens, n, layer, num_layers)}
            for n in (budget_count(b, num_tokens) for b in BUDGETS)}
    for default in DEFAULT_SCORERS:
        if default.name == "debiased":
            continue  # the registered default wraps fastv: it is "fastv+debias" below
        name = STAGE2_PREFIX + default.name
        plain = own(default)
        conditions.append(Condition(name, lambda n, s=plain: PruningPlan(stage2=s, n2=n, layer=layer),
                                    kept_stage="stage2", layer=layer, budgets_used=dict(used)))
        wrapped = Debiased(own(default))
        conditions.append(Condition(
            f"{name}+debias", lambda n, s=wrapped: PruningPlan(stage2=s, n2=n, layer=layer),
            kept_stage="stage2", layer=layer, budgets_used=dict(used),
            needs_calibration=[(wrapped, lambda s=wrapped: PruningPlan(stage2=s, n2=1, layer=layer))]))
    return conditions


def learned_conditions(head, num_tokens: int, num_layers: int) -> list[Condition]:
    layer = head.config.layer or num_layers // 2
    stage2 = Debiased(get_scorer("fastv"))
    head2 = own(head)  # the same weights, its own instance (see `own`)

    def two_stage(n: int) -> PruningPlan:
        n1, n2 = solve_two_stage(n, num_tokens, layer, num_layers)
        return PruningPlan(stage1=head2, n1=n1, stage2=stage2, n2=n2, layer=layer)

    with_stage2 = Condition("learned+stage2", two_stage, kept_stage="stage2", layer=layer,
                            needs_calibration=[(stage2, lambda: PruningPlan(stage2=stage2, n2=1, layer=layer))])
    for fraction in BUDGETS:
        n = budget_count(fraction, num_tokens)
        n1, n2 = solve_two_stage(n, num_tokens, layer, num_layers)
        with_stage2.budgets_used[n] = {"n1": n1, "n2": n2, "layer": layer,
                                       "n_eff": effective_budget(n1, n2, layer, num_layers)}
    return [Condition("learned", lambda n: PruningPlan(stage1=head, n1=n)), with_stage2]


def oracle_conditions() -> list[Condition]:
    objects, question = ObjectsOracle(), QuestionOracle()
    return [Condition(o.name, lambda n, o=o: PruningPlan(stage1=o, n1=n), dashed=True) for o in (objects, question)]


def calibrate_conditions(model, conditions: list[Condition], train_batches: list[dict], processor=None) -> dict:
    """Fit each debiased component on training batches (never the test split) made by `processor`; returns the
    fitted trend rates (per relative position i / N, i.e. N times a per-token slope). A condition's calibration
    changes its own components only (see `own`)."""
    fitted = {}
    for condition in conditions:
        for component, calibration_plan in condition.needs_calibration:
            with warnings.catch_warnings():
                # while calibrating, the wrapper still selects with per-sample fits and warns that it does
                warnings.filterwarnings("ignore", message=".*is not calibrated.*")
                calibrate(model, calibration_plan(), train_batches, processor=processor)
            fitted[condition.name] = component.rate
    return fitted


# -- gates -----------------------------------------------------------------------------------------------------------


def check_gates(full: float, shuffled: float, majority: float, oracle: float, random: float) -> dict:
    gates = {
        "a_full_beats_majority": {
            "passed": full >= majority + MIN_GAIN_OVER_MAJORITY,
            "full": full, "majority": majority, "threshold": majority + MIN_GAIN_OVER_MAJORITY,
            "rule": f"full >= majority + {MIN_GAIN_OVER_MAJORITY}"},
        "b_shuffled_images_hurt": {
            "passed": shuffled <= full - SHUFFLE_DROP_FRACTION * (full - majority),
            "shuffled": shuffled, "full": full, "majority": majority,
            "threshold": full - SHUFFLE_DROP_FRACTION * (full - majority),
            "rule": f"shuffled <= full - {SHUFFLE_DROP_FRACTION} * (full - majority)"},
        "c_oracle_beats_random": {
            "passed": oracle >= random + MIN_ORACLE_GAIN,
            "oracle_question": oracle, "random": random, "threshold": random + MIN_ORACLE_GAIN,
            "budget": GATE_BUDGET, "rule": f"oracle-question >= random + {MIN_ORACLE_GAIN} at {GATE_BUDGET:.1%}"},
    }
    return gates


def print_gates(gates: dict) -> None:
    for name, gate in gates.items():
        numbers = ", ".join(f"{k}={v:.3f}" for k, v in gate.items() if isinstance(v, float))
        print(f"gate {name}: {'PASS' if gate['passed'] else 'FAIL'} ({gate['rule']}; {numbers})")


# -- reports ---------------------------------------------------------------------------------------------------------


def budget_header(fraction: float, n: int) -> str:
    return f"{fraction:.1%} (n={n})"


def accuracy_table(results: dict, budgets: dict, full: dict, majority: dict, conditions: list[Condition],
                   num_tokens: int) -> str:
    header = ["condition"] + [budget_header(b, n) for b, n in budgets.items()] + ["notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    blank = [""] * len(budgets)
    lines.append("| full (unpruned) | " + " | ".join([f"{full['accuracy']:.3f}"] + blank[1:]) + " | all N tokens |")
    lines.append("| majority baseline | " + " | ".join([f"{majority['overall']:.3f}"] + blank[1:])
                 + " | image-blind upper bound |")
    for condition in conditions:
        cells = [f"{results[condition.name][str(b)]['accuracy']:.3f}" for b in budgets]
        notes = []
        if condition.name.startswith(STAGE2_PREFIX):
            notes.append(f"stage 2 only, n2 = n at layer {condition.layer}")
        elif condition.budgets_used:
            notes.append("n1/n2 = " + ", ".join(f"{u['n1']}/{u['n2']}" for u in condition.budgets_used.values()))
        if condition.budgets_used:
            notes.append("effective " + ", ".join(f"{u['n_eff'] / num_tokens:.1%}"
                                                  for u in condition.budgets_used.values()))
        if condition.dashed:
            notes.append("oracle")
        lines.append(f"| {condition.name} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")
    return "\n".join(lines)


def per_type_table(results: dict, budgets: dict, full: dict, majority: dict) -> str:
    types = [t for t in QUESTION_TYPES if t in full["per_type"]]
    header = ["model"] + types + ["overall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| majority baseline | " + " | ".join(f"{majority[t]:.3f}" for t in types)
                 + f" | {majority['overall']:.3f} |")
    lines.append("| full (unpruned) | " + " | ".join(f"{full['per_type'][t]:.3f}" for t in types)
                 + f" | {full['accuracy']:.3f} |")

    def relative(acc: float, ref: float) -> str:
        return f"{acc:.3f} ({100 * acc / ref:.0f}%)" if ref > 0 else f"{acc:.3f}"

    for name in ("learned", "learned+stage2"):
        if name not in results:
            continue
        for b in budgets:
            r = results[name][str(b)]
            cells = [relative(r["per_type"][t], full["per_type"][t]) for t in types]
            lines.append(f"| {name} @ {b:.1%} | " + " | ".join(cells)
                         + f" | {relative(r['accuracy'], full['accuracy'])} |")
    return "\n".join(lines)


def plot_accuracy(path: Path, results: dict, budgets: dict, full: dict, majority: dict,
                  conditions: list[Condition]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    xs = list(budgets)
    colors = plt.get_cmap("tab20")
    for i, condition in enumerate(conditions):
        ys = [results[condition.name][str(b)]["accuracy"] for b in xs]
        ax.plot(xs, ys, marker="s" if condition.kept_stage == "stage2" else "o", markersize=3,
                color=colors(i % 20), label=condition.name,
                linestyle="--" if condition.dashed else "-")
    ax.axhline(full["accuracy"], color="black", linewidth=1.5, label="full (unpruned)")
    ax.axhline(majority["overall"], color="gray", linestyle=":", linewidth=1.5, label="majority baseline")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{b:.1%}" for b in xs])
    ax.minorticks_off()
    ax.set_xlabel("visual token budget (fraction of N)")
    ax.set_ylabel("accuracy")
    ax.set_title("ToyWorld accuracy vs visual token budget")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_overlay(path: Path, model, samples: list[Sample], batch: dict, conditions: list[Condition],
                 num_tokens: int, image_size: int, processor=None) -> None:
    """Each sample's original image with every method's kept tokens (`modules.overlay`: kept cells as they are,
    pruned ones dimmed, the processor's padding striped), cells mapped back through the processor's fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {c.name: c for c in conditions}
    methods = [by_name[m] for m in OVERLAY_METHODS if m in by_name]
    n = budget_count(OVERLAY_BUDGET, num_tokens)
    device = next(model.parameters()).device
    adapter = get_adapter(model, processor)
    kept = {}
    with torch.no_grad():
        for condition in methods:
            plan = condition.plan(n)
            if isinstance(plan.selector, OracleSelector):
                plan.selector.set_batch(batch["meta"], num_tokens)
            pruned = PrunedVLM(model, plan, processor=processor)
            pruned(**model_inputs(batch, device), logits_to_keep=1)
            kept[condition.name] = pruned.last_kept[condition.kept_stage].cpu()
    fig = plt.figure(figsize=(1.9 * len(methods), 2.3 * len(samples)))
    rows = fig.subfigures(len(samples), 1, squeeze=False)[:, 0]
    for r, (sample, row) in enumerate(zip(samples, rows)):
        question = " ".join(c.get("text", "") for c in sample.messages[0]["content"] if c["type"] == "text")
        row.suptitle(f"{question} -> {sample.meta['answer']}", fontsize=8)
        axes = row.subplots(1, len(methods), squeeze=False)[0]
        [view] = grid_views(adapter, {"pixel_values": batch["pixel_values"][r:r + 1]},
                            image_sizes=[(sample.image.height, sample.image.width)], processor=processor)
        for ax, condition in zip(axes, methods):
            ax.imshow(render_grid(sample.image, view, kept_per_item(kept[condition.name])[r]).array)
            ax.set_title(condition.name, fontsize=7)
            ax.axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="LLaVA directory (model + processor)")
    parser.add_argument("--head", default=None, help="learned pruner head directory (skipped when missing)")
    parser.add_argument("--data", required=True, help="ToyWorld data root (test split written if missing)")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=256,
                        help="train samples used to calibrate the debiased methods (the train split is written "
                             "with this many samples if missing)")
    parser.add_argument("--majority-n", type=int, default=2000, help="questions per type for the majority baseline")
    parser.add_argument("--overlay", type=int, default=4, help="test samples in overlay.png (0: no overlay)")
    parser.add_argument("--out", default="bench/out/accuracy")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--force", action="store_true",
                        help="run the comparison even when a gate fails (debugging the bench on untrained models; "
                             "the outputs are marked as forced)")
    args = parser.parse_args(argv)
    if args.n_test <= 0 or args.batch_size <= 0 or args.calib_samples <= 0:
        parser.error("--n-test, --batch-size and --calib-samples must be positive")
    return args


def load_teacher(directory: str, device: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(directory).to(device).eval()
    processor = AutoProcessor.from_pretrained(directory)
    # stage 2 scores from the last prompt token, and the answer is read at the last position
    processor.tokenizer.padding_side = "left"
    return model, processor


def load_head(directory: str | None, model, device: str):
    if directory is None or not Path(directory).is_dir():
        if directory is not None:
            print(f"note: no pruner head at {directory}: learned rows skipped")
        return None
    from modules.head import PrunerHead

    head = PrunerHead.from_pretrained(directory).to(device)
    head.check_compatible(get_adapter(model))  # fail before any evaluation, not halfway through
    return head


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data)

    model, processor = load_teacher(args.teacher, args.device)
    adapter = get_adapter(model)
    num_tokens, num_layers = adapter.num_image_tokens, adapter.num_layers
    default_layer = num_layers // 2
    budgets = {b: budget_count(b, num_tokens) for b in BUDGETS}
    test = load_split(data_root, "test", args.n_test, args.n_test)
    qtypes = [s.meta["qtype"] for s in test]
    batches = encode_batches(processor, test, args.batch_size)
    majority = majority_baselines(args.majority_n)
    print(f"teacher {args.teacher}: N={num_tokens} visual tokens, L={num_layers} layers; {len(test)} test samples")
    timing: dict[str, float] = {"setup": time.perf_counter() - started}

    def run(name: str, plan: PruningPlan, shuffle: bool = False) -> dict:
        t0 = time.perf_counter()
        result = summarize(evaluate(model, plan, batches, num_tokens, shuffle, processor), qtypes)
        timing[name] = time.perf_counter() - t0
        return result

    # gates first: a teacher that does not read the image makes every comparison meaningless
    full = run("full", PruningPlan())
    shuffled = run("shuffled", PruningPlan(), shuffle=True)
    oracles = oracle_conditions()
    gate_n = budget_count(GATE_BUDGET, num_tokens)
    random_selector = next(s for s in DEFAULT_SELECTORS if s.name == "random")
    oracle_gate = run(f"oracle-question@{GATE_BUDGET}", oracles[1].plan(gate_n))
    random_gate = run(f"random@{GATE_BUDGET}", PruningPlan(stage1=random_selector, n1=gate_n))
    gates = check_gates(full["accuracy"], shuffled["accuracy"], majority["overall"],
                        oracle_gate["accuracy"], random_gate["accuracy"])
    print_gates(gates)
    failed = [name for name, gate in gates.items() if not gate["passed"]]
    report = {"teacher": args.teacher, "head": args.head, "data": str(data_root), "n_test": len(test),
              "num_tokens": num_tokens, "num_layers": num_layers, "default_layer": default_layer,
              "budgets": {str(b): n for b, n in budgets.items()}, "majority": majority, "full": full,
              "shuffled": shuffled, "gates": gates, "failed_gates": failed, "refused": bool(failed),
              "forced": bool(failed) and args.force}
    if failed and not args.force:
        print(f"REFUSED: gate(s) {', '.join(failed)} failed; no comparison is made (see {out / 'accuracy.json'})")
        report["timing_s"] = {**timing, "total": time.perf_counter() - started}
        write_json(out / "accuracy.json", report)
        return REFUSED_EXIT_CODE
    if failed:
        print(f"WARNING: gate(s) {', '.join(failed)} failed; --force given, numbers below are not meaningful")

    head = load_head(args.head, model, args.device)
    conditions = stage1_conditions() + stage2_conditions(default_layer, num_tokens, num_layers)
    if head is not None:
        conditions += learned_conditions(head, num_tokens, num_layers)
    conditions += oracles
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise RuntimeError(f"condition names must be unique (results are keyed by them): {names}")
    if any(c.needs_calibration for c in conditions):
        train = load_split(data_root, "train", args.calib_samples, args.calib_samples)
        t0 = time.perf_counter()
        report["calibration"] = calibrate_conditions(model, conditions,
                                                     encode_batches(processor, train, args.batch_size), processor)
        timing["calibration"] = time.perf_counter() - t0

    results: dict[str, dict] = {}
    already_run = {("random", GATE_BUDGET): random_gate, ("oracle-question", GATE_BUDGET): oracle_gate}
    for condition in conditions:
        results[condition.name] = {}
        for b, n in budgets.items():
            result = already_run.get((condition.name, b)) or run(f"{condition.name}@{b}", condition.plan(n))
            results[condition.name][str(b)] = {"n": n, **condition.budgets_used.get(n, {}), **result}
        print(f"{condition.name:>22}: " + "  ".join(f"{results[condition.name][str(b)]['accuracy']:.3f}"
                                                     for b in budgets))
    report["results"] = results
    report["conditions"] = {c.name: {"kept_stage": c.kept_stage, "oracle": c.dashed, "layer": c.layer}
                            for c in conditions}
    if head is not None:
        report["learned_stage2_budgets"] = {str(b): conditions_by(conditions, "learned+stage2").budgets_used[n]
                                            for b, n in budgets.items()}

    table = accuracy_table(results, budgets, full, majority, conditions, num_tokens)
    types = per_type_table(results, budgets, full, majority)
    banner = f"**Gates failed ({', '.join(failed)}); forced run: not meaningful.**\n\n" if failed else ""
    (out / "accuracy.md").write_text(
        f"# ToyWorld accuracy vs visual token budget\n\n{banner}Teacher `{args.teacher}`, {len(test)} test "
        f"samples, N = {num_tokens}, L = {num_layers}, stage 2 at layer {default_layer}.\n\n{table}\n\n"
        f"## Per question type\n\n{types}\n")
    plot_accuracy(out / "accuracy.png", results, budgets, full, majority, conditions)
    if args.overlay > 0:
        shown = test[:args.overlay]
        overlay_batch = encode_batches(processor, shown, len(shown))[0]
        plot_overlay(out / "overlay.png", model, shown, overlay_batch, conditions, num_tokens,
                     model.config.vision_config.image_size, processor)
    report["timing_s"] = {**timing, "total": time.perf_counter() - started}
    write_json(out / "accuracy.json", report)
    print()
    print(table)
    print(f"\nwrote {out}/accuracy.md, accuracy.json, accuracy.png{', overlay.png' if args.overlay > 0 else ''}; "
          f"total {report['timing_s']['total']:.1f} s")
    return 0


def conditions_by(conditions: list[Condition], name: str) -> Condition:
    return next(c for c in conditions if c.name == name)


if __name__ == "__main__":
    sys.exit(main())
