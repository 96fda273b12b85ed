"""bench/accuracy.py: the gates refuse a random teacher, the oracles keep exactly what they should, and the
two-stage budget solver matches the effective budget."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from data.tiny import tiny_llava_config
from data.toyworld import IMAGE_SIZE, PATCH, toyworld_processor, toyworld_tokenizer
from modules.vlm.base import VisionTokens

BENCH = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("teacher")
    tokenizer = toyworld_tokenizer()
    processor = toyworld_processor(tokenizer)
    cfg = tiny_llava_config(len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id, image_size=IMAGE_SIZE, patch_size=PATCH,
                            vision_hidden=16, vision_layers=2, text_hidden=32, text_layers=2, heads=2, kv_heads=1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_random_teacher_is_refused(bench, random_teacher, tmp_path):
    out = tmp_path / "out"
    code = bench.main(["--teacher", str(random_teacher), "--data", str(tmp_path / "data"), "--n-test", "32",
                       "--batch-size", "16", "--majority-n", "200", "--overlay", "0", "--out", str(out),
                       "--device", "cpu"])
    assert code == bench.REFUSED_EXIT_CODE
    report = json.loads((out / "accuracy.json").read_text())
    assert report["refused"] is True
    assert report["gates"]["a_full_beats_majority"]["passed"] is False
    assert "a_full_beats_majority" in report["failed_gates"]
    assert "results" not in report  # no comparison was made
    assert not (tmp_path / "data" / "train.json").exists()  # nothing was calibrated either
    assert (tmp_path / "data" / "test.json").exists()


def tokens_for(batch: int, n: int, valid: torch.Tensor | None = None) -> VisionTokens:
    return VisionTokens(feats=torch.zeros(batch, n, 4), valid=valid)


def test_oracles_keep_the_right_patches(bench):
    meta = {"object_patches": [1, 2, 5, 6, 9], "target_patches": [5, 9]}
    objects, question = bench.ObjectsOracle(), bench.QuestionOracle()
    for oracle in (objects, question):
        oracle.set_batch([meta], 12)
    tokens = tokens_for(1, 12)
    assert objects.select(tokens, 3).tolist() == [[1, 2, 5]]  # objects first, ties by index
    assert objects.select(tokens, 6).tolist() == [[0, 1, 2, 5, 6, 9]]  # then the rest by index
    assert question.select(tokens, 2).tolist() == [[5, 9]]  # targets first
    assert question.select(tokens, 4).tolist() == [[1, 2, 5, 9]]  # then the other objects
    assert question.select(tokens, 6).tolist() == [[0, 1, 2, 5, 6, 9]]
    # padding goes last even for an oracle (a contrived object patch on padding included)
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, :2] = False
    assert objects.select(tokens_for(1, 12, valid), 6).tolist() == [[2, 3, 4, 5, 6, 9]]
    with pytest.raises(RuntimeError, match="set_batch"):
        objects.select(tokens_for(2, 12), 3)  # a priority for one image does not fit a batch of two


@pytest.mark.parametrize("layers, layer", [(32, 16), (2, 1), (24, 6)])
def test_two_stage_solver_matches_the_effective_budget(bench, layers, layer):
    num_tokens = 576
    for fraction in bench.BUDGETS:
        n = bench.budget_count(fraction, num_tokens)
        n1, n2 = bench.solve_two_stage(n, num_tokens, layer, layers)
        assert n2 == max(1, bench.round_half_up(n / 2))
        assert n2 <= n1 <= num_tokens
        if n1 < num_tokens:  # rounding n1 moves n_eff by at most half a token times K / L
            assert abs(bench.effective_budget(n1, n2, layer, layers) - n) <= 0.5 * layer / layers + 1e-9


def test_solver_examples(bench):
    assert bench.solve_two_stage(32, 576, 16, 32) == (48, 16)
    assert bench.solve_two_stage(7, 64, 1, 2) == (10, 4)  # n2 = 3.5 rounds up; n1 = 2 * 7 - 4
    assert bench.solve_two_stage(1, 64, 1, 2) == (1, 1)
    assert bench.solve_two_stage(60, 64, 1, 4) == (64, 30)  # n1 capped at N


def component_state(component) -> dict:
    """What calibration may change in a component (its own fields; a wrapped method is a component of its own)."""
    if isinstance(component, torch.nn.Module):
        return {k: v.clone() for k, v in component.state_dict().items()}
    return {k: copy.deepcopy(v) for k, v in vars(component).items() if k != "inner" and not k.startswith("_")}


def same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def test_calibrating_a_condition_changes_no_other_condition(bench, sdpa_model, processor, batch):
    from modules.head import PrunerHead
    from modules.scorers import DEFAULT_SCORERS
    from modules.selectors import DEFAULT_SELECTORS
    from modules.vlm import get_adapter

    adapter = get_adapter(sdpa_model, processor)
    num_tokens, num_layers = adapter.num_image_tokens, adapter.num_layers
    torch.manual_seed(0)
    head = PrunerHead.for_model(adapter, d_model=32, depth=1, heads=2).eval()
    conditions = (bench.stage1_conditions() + bench.stage2_conditions(num_layers // 2, num_tokens, num_layers)
                  + bench.learned_conditions(head, num_tokens, num_layers) + bench.oracle_conditions())
    components = {c.name: [component for _, component in c.plan(1).components()] for c in conditions}
    defaults = {id(d): d for d in (*DEFAULT_SELECTORS, *DEFAULT_SCORERS)}
    default_states = {i: component_state(d) for i, d in defaults.items()}
    targets = [c for c in conditions if c.needs_calibration]
    assert {"agilepruner+debias", "stage2:finepruner+debias", "learned+stage2"} <= {c.name for c in targets}
    for target in targets:
        before = {name: [component_state(c) for c in comps] for name, comps in components.items()}
        bench.calibrate_conditions(sdpa_model, [target], [batch], processor=processor)
        after = {name: [component_state(c) for c in comps] for name, comps in components.items()}
        assert not same(before[target.name], after[target.name]), f"{target.name} was calibrated"
        changed = [name for name in components if name != target.name and not same(before[name], after[name])]
        assert changed == [], f"calibrating {target.name} changed {changed}"
        # the calibrated components are the ones its plans use at every budget
        assert all(a is b for a, b in zip(components[target.name], (c for _, c in target.plan(2).components())))
    # no component is shared between conditions, nor with the registry defaults every other user sees
    owners = [id(c) for comps in components.values() for c in comps]
    assert len(owners) == len(set(owners)) and not set(owners) & set(defaults)
    assert all(same(default_states[i], component_state(d)) for i, d in defaults.items())
