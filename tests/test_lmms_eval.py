"""The lmms-eval model `learnprune` (modules/eval_plugin.py) on tiny models built in code.

lmms-eval is not a dependency of the project venv. When it is importable the tests run against the real package
(and one of them runs lmms-eval's own evaluator on a tiny local task); when it is not, they run against
`stand_in_lmms_eval()`, a minimal stand-in of the interface written from lmms-eval 0.7.3's source
(`lmms_eval.api.model.lmms`, `lmms_eval.api.instance.Instance`, `lmms_eval.models.registry_v2.ModelManifest`,
`lmms_eval.utils.simple_parse_args_string`): the same constructor signatures, `Instance.args` layouts and
`create_from_arg_string` parsing, nothing else. Requests are built the way lmms-eval 0.7.3's `ConfigurableTask.
construct_requests` builds them:

    generate_until:  (context, gen_kwargs, doc_to_visual, doc_id, task, split)
    loglikelihood:   (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)
    multi-round:     (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)

and the documents are looked up in `lm.task_dict[task][split][doc_id]`, which lmms-eval's evaluator fills.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import make_images
from data.processors import load_processor
from data.tiny import (
    tiny_llava,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
    tiny_llava_onevision_tokenizer,
    tiny_llava_processor,
    tiny_qwen,
    tiny_qwen_processor,
    tiny_qwen_tokenizer,
    tiny_tokenizer,
)
from modules.head import PrunerHead
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.vlm import get_adapter

REPO = Path(__file__).resolve().parents[1]
REAL_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
TASK, SPLIT = "tiny", "test"
QUESTIONS = ["what is the color ?", "how many ?", "describe this image . what shape is left of the circle ?"]
# keeps a quarter of each image's tokens at stage 1 and an eighth from decoder layer 2 (ratios: every family)
PRUNING = {"stage1": "fastervlm", "n1": 0.25, "stage2": "fastv", "n2": 0.125, "layer": 2}
# a plan that keeps every token, through the pruning path (not the no-op shortcut)
KEEP_ALL = {"stage1": "fastervlm", "n1": 1.0}


# ---- the stand-in of lmms-eval 0.7.3's interface ----------------------------------------------------------------
def stand_in_lmms_eval() -> dict[str, types.ModuleType]:
    """Modules `lmms_eval`, `.api`, `.api.instance`, `.api.model`, `.models`, `.models.registry_v2` holding what
    learnprune's plugin uses of lmms-eval 0.7.3, with the same signatures and behaviour."""

    def parse_value(text: str):  # lmms_eval.utils.handle_arg_string
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        if text.isnumeric():
            return int(text)
        try:
            return float(text)
        except ValueError:
            return text

    def parse_args(arg_string: str) -> dict:  # lmms_eval.utils.simple_parse_args_string (no nested JSON here)
        arg_string = arg_string.strip()
        if not arg_string:
            return {}
        return {k: parse_value(v) for k, v in (part.split("=", 1) for part in arg_string.split(","))}

    @dataclasses.dataclass
    class Instance:
        request_type: str
        arguments: tuple
        idx: int
        metadata: dict = dataclasses.field(default_factory=dict)
        resps: list = dataclasses.field(default_factory=list)
        filtered_resps: dict = dataclasses.field(default_factory=dict)
        task_name: str | None = None
        doc_id: int | None = None
        repeats: int | None = None
        doc: dict | None = None

        def __post_init__(self):
            self.task_name = self.metadata["task"]
            self.doc_id = self.metadata["doc_id"]
            self.repeats = self.metadata["repeats"]

        @property
        def args(self):
            return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)

    class CacheHook:
        def __init__(self, cachinglm=None):
            pass

        def add_partial(self, attr, req, res):
            pass

    class lmms(abc.ABC):  # noqa: N801 - lmms-eval's name
        is_simple = True

        def __init__(self):
            self._rank, self._world_size = 0, 1
            self.cache_hook = CacheHook(None)
            self.task_dict = {}

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

        @classmethod
        def create_from_arg_string(cls, arg_string, additional_config=None):
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**parse_args(arg_string), **extra)

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

    @dataclasses.dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None
        chat_class_path: str | None = None
        aliases: tuple = ()

        def __post_init__(self):
            if self.simple_class_path is None and self.chat_class_path is None:
                raise ValueError(f"ModelManifest('{self.model_id}') requires at least one class path")

    mods = {name: types.ModuleType(name) for name in
            ("lmms_eval", "lmms_eval.api", "lmms_eval.api.instance", "lmms_eval.api.model", "lmms_eval.models",
             "lmms_eval.models.registry_v2")}
    for mod in mods.values():
        mod.__path__ = []  # packages, so that submodule imports resolve through sys.modules
    mods["lmms_eval.api.instance"].Instance = Instance
    mods["lmms_eval.api.model"].lmms = lmms
    mods["lmms_eval.api.model"].CacheHook = CacheHook
    mods["lmms_eval.api.model"].Instance = Instance
    mods["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    mods["lmms_eval"].api, mods["lmms_eval"].models = mods["lmms_eval.api"], mods["lmms_eval.models"]
    mods["lmms_eval.api"].model, mods["lmms_eval.api"].instance = (mods["lmms_eval.api.model"],
                                                                   mods["lmms_eval.api.instance"])
    mods["lmms_eval.models"].registry_v2 = mods["lmms_eval.models.registry_v2"]
    return mods


@pytest.fixture(scope="module")
def api():
    """(modules.eval_plugin, lmms base class, Instance, ModelManifest), against lmms-eval or its stand-in."""
    saved = {}
    if not REAL_LMMS_EVAL:
        for name, mod in stand_in_lmms_eval().items():
            saved[name] = sys.modules.get(name)
            sys.modules[name] = mod
    sys.modules.pop("modules.eval_plugin", None)
    try:
        plugin = importlib.import_module("modules.eval_plugin")
        from lmms_eval.api.instance import Instance
        from lmms_eval.api.model import lmms
        from lmms_eval.models.registry_v2 import ModelManifest

        yield types.SimpleNamespace(plugin=plugin, lmms=lmms, Instance=Instance, ModelManifest=ModelManifest)
    finally:
        sys.modules.pop("modules.eval_plugin", None)
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


# ---- tiny model directories ---------------------------------------------------------------------------------------
def _save(directory: Path, model, processor) -> Path:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """family -> a local model directory (random tiny model + its processor), as `pretrained=` takes it."""
    root = tmp_path_factory.mktemp("lmms_models")
    llava_tok, qwen_tok, ov_tok = tiny_tokenizer(), tiny_qwen_tokenizer(family="qwen2_5_vl"), \
        tiny_llava_onevision_tokenizer()
    return {
        "llava": _save(root / "llava", tiny_llava(llava_tok), tiny_llava_processor(llava_tok)),
        "qwen2_5_vl": _save(root / "qwen", tiny_qwen("qwen2_5_vl", qwen_tok),
                            tiny_qwen_processor("qwen2_5_vl", qwen_tok)),
        "llava_onevision": _save(root / "ov", tiny_llava_onevision(ov_tok), tiny_llava_onevision_processor(ov_tok)),
    }


def plan_file(tmp_path: Path, spec: dict, name: str = "plan.yaml") -> Path:
    PruningPlan(**spec).save(tmp_path / name)
    return tmp_path / name


def make_lm(api, directory: Path, pruner: Path | str | None = None, batch_size: int = 3):
    args = f"pretrained={directory},device=cpu" + (f",pruner={pruner}" if pruner is not None else "")
    # lmms-eval's evaluator hands --batch_size / --device over as `additional_config`
    return api.plugin.LearnPrune.create_from_arg_string(args, {"batch_size": batch_size, "device": None})


def docs_for(images) -> list[dict]:
    return [{"image": image, "id": i} for i, image in enumerate(images)]


def visual(doc):
    return [doc["image"]]


def request(api, request_type: str, arguments: tuple, doc_id: int):
    return api.Instance(request_type=request_type, arguments=arguments, idx=0,
                        metadata={"task": TASK, "doc_id": doc_id, "split": SPLIT, "repeats": 1})


def prompt_of(processor, question: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def reference_inputs(processor, texts: list[str], images: list, nested: bool = False) -> dict:
    """The processor's batch, left padded, built here independently of the plugin."""
    return dict(processor(images=[[im] for im in images] if nested else images, text=texts, return_tensors="pt",
                          padding=True, padding_side="left"))


IMAGES = make_images(((40, 20), (20, 30), (32, 32)))


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


# ---- import guard and registration --------------------------------------------------------------------------------
def test_import_without_lmms_eval_names_the_extra(monkeypatch):
    """Importing the plugin where lmms-eval is absent says how to install it."""
    for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import lmms_eval...` fail like a missing package
    monkeypatch.delitem(sys.modules, "modules.eval_plugin", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'learnprune\[eval\]'"):
        importlib.import_module("modules.eval_plugin")
    sys.modules.pop("modules.eval_plugin", None)


def test_entry_point_registers_learnprune(api):
    """pyproject's `lmms_eval.models` entry point is what lmms-eval 0.7's `load_entrypoint_manifests` accepts: a
    callable returning a ModelManifest whose simple class path is the plugin's class, a subclass of `lmms`."""
    entry_points = pyproject()["entry-points"]["lmms_eval.models"]
    assert list(entry_points) == ["learnprune"]
    module_name, attr = entry_points["learnprune"].split(":")
    payload = getattr(importlib.import_module(module_name), attr)
    assert callable(payload)
    manifest = payload()
    assert isinstance(manifest, api.ModelManifest)
    assert manifest.model_id == "learnprune" and manifest.chat_class_path is None
    class_module, class_name = manifest.simple_class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(class_module), class_name)
    assert cls is api.plugin.LearnPrune
    assert issubclass(cls, api.lmms) and cls.is_simple is True
    if REAL_LMMS_EVAL:  # lmms-eval's own registry resolves and validates it
        from lmms_eval.models.registry_v2 import ModelRegistryV2

        registry = ModelRegistryV2()
        for m in registry._coerce_payload_to_manifests(payload):
            registry.register_manifest(m)
        assert registry.get_model_class("learnprune") is api.plugin.LearnPrune


def test_eval_extra_pins_lmms_eval_07():
    """`pip install 'learnprune[eval]'` (the extra the import error names): lmms-eval 0.7.x, with filelock < 4
    (lmms-eval 0.7.3's `simple_evaluate` imports `filelock._api`, gone in filelock 4)."""
    extras = pyproject()["optional-dependencies"]
    assert extras["eval"] == ["lmms-eval>=0.7,<0.8", "filelock<4"]


# ---- model args ---------------------------------------------------------------------------------------------------
def test_pruner_arg_loads_plan_file_pruner_dir_or_nothing(api, model_dirs, tmp_path):
    """`pruner=plan.yaml` / `plan.json` loads the plan, `pruner=<dir>` the head (with its trained plan), no pruner
    is the unpruned model; `--batch_size` arrives through lmms-eval's additional config."""
    directory = model_dirs["llava"]
    lm = make_lm(api, directory, plan_file(tmp_path, PRUNING), batch_size=2)
    assert lm.batch_size == 2 and lm.device == torch.device("cpu")
    assert lm.plan.to_dict() == PruningPlan(**PRUNING).to_dict()
    lm = make_lm(api, directory, plan_file(tmp_path, {"stage1": "pool", "n1": 3}, "plan.json"))
    assert lm.plan.to_dict() == PruningPlan(stage1="pool", n1=3).to_dict()

    model = AutoModelForImageTextToText.from_pretrained(directory)
    head = PrunerHead.for_model(get_adapter(model), d_model=32, depth=1, heads=2, n1=5).eval()
    head.save_pretrained(tmp_path / "pruner")
    lm = make_lm(api, directory, tmp_path / "pruner")
    assert isinstance(lm.plan.selector, PrunerHead) and lm.plan.n1 == 5
    loaded = lm.plan.selector.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in head.state_dict().items())

    assert make_lm(api, directory).plan.is_noop
    with pytest.raises(ValueError, match="does not exist"):
        make_lm(api, directory, tmp_path / "missing.yaml")


def test_bad_model_args_are_refused(api, model_dirs):
    with pytest.raises(ValueError, match="batch_size='auto'"):
        make_lm(api, model_dirs["llava"], batch_size="auto")
    with pytest.raises(ValueError, match="dtype"):
        api.plugin.LearnPrune(pretrained=str(model_dirs["llava"]), device="cpu", dtype="float8")
    with pytest.raises(TypeError):  # a typo in --model_args is an error, not silently ignored
        api.plugin.LearnPrune.create_from_arg_string(f"pretrained={model_dirs['llava']},prunr=x", {})


def test_generation_kwargs(api, model_dirs):
    lm = make_lm(api, model_dirs["llava"])
    kwargs, until = lm.generation_kwargs({"until": "\n", "max_new_tokens": 7, "temperature": 0, "top_p": 0.9,
                                          "num_beams": 1, "do_sample": False})
    assert until == ["\n"]
    assert kwargs["max_new_tokens"] == 7 and kwargs["do_sample"] is False and "temperature" not in kwargs
    kwargs, until = lm.generation_kwargs({"temperature": 0.7, "top_p": 0.9})
    assert until == [] and kwargs["do_sample"] is True and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
    assert kwargs["max_new_tokens"] == lm.max_new_tokens
    assert lm.generation_kwargs({"temperature": 0.7, "do_sample": False})[0]["do_sample"] is False
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        lm.generation_kwargs({"image_aspect_ratio": "pad"})


# ---- generate_until -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("plan", ["none", "keep_all"])
def test_generate_until_unpruned_plan_equals_plain_greedy(api, model_dirs, tmp_path, plan):
    """A batch of prompts of different lengths (left padded): token-identical to the plain model's greedy
    generate, for no pruner and for a keep-all plan that runs the pruning path; results in request order."""
    directory = model_dirs["llava"]
    lm = make_lm(api, directory, None if plan == "none" else plan_file(tmp_path, KEEP_ALL))
    lm.task_dict = {TASK: {SPLIT: docs_for(IMAGES)}}
    gen_kwargs = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
    order = [2, 0, 1]  # not the batch's (longest first) order
    requests = [request(api, "generate_until", (QUESTIONS[i], dict(gen_kwargs), visual, i, TASK, SPLIT), i)
                for i in order]
    texts = lm.generate_until(requests)

    processor = load_processor(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    inputs = reference_inputs(processor, [prompt_of(processor, q) for q in QUESTIONS], IMAGES)
    assert (inputs["attention_mask"] == 0).any(dim=1).sum() == 2  # really left padded
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    ref_new = ref[:, inputs["input_ids"].shape[1]:]

    _, new, _ = lm.generate_ids(QUESTIONS, [[im] for im in IMAGES], gen_kwargs)
    assert torch.equal(new, ref_new)
    expected = processor.tokenizer.batch_decode(ref_new, skip_special_tokens=True)
    assert texts == [expected[i] for i in order]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision"])
def test_generate_until_prunes(api, model_dirs, tmp_path, family):
    """With a pruning plan, generate_until runs the pruned model: token-identical to `PrunedVLM.generate` on the
    same inputs, every image keeping its budget at both stages."""
    directory = model_dirs[family]
    images = make_images(((60, 40), (40, 64), (48, 48)), seed=1)
    lm = make_lm(api, directory, plan_file(tmp_path, PRUNING))
    lm.task_dict = {TASK: {SPLIT: docs_for(images)}}
    gen_kwargs = {"max_new_tokens": 5}
    texts = lm.generate_until([request(api, "generate_until", (q, dict(gen_kwargs), visual, i, TASK, SPLIT), i)
                               for i, q in enumerate(QUESTIONS)])
    budgets = lm.pruned.last.budgets
    n_tokens = lm.pruned.last.num_tokens
    assert budgets["stage1"] == [max(1, round(0.25 * n)) for n in n_tokens]
    assert budgets["stage2"] == [max(1, round(0.125 * n)) for n in n_tokens]
    assert all(b < n for b, n in zip(budgets["stage1"], n_tokens))

    processor = load_processor(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    nested = family == "llava_onevision"
    inputs = reference_inputs(processor, [prompt_of(processor, q) for q in QUESTIONS], images, nested)
    if "image_sizes" not in inputs:
        inputs["image_sizes"] = torch.tensor([[im.height, im.width] for im in images])
    pruned = PrunedVLM(model, PruningPlan(**PRUNING), processor=processor)
    ref = pruned.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.tokenizer.batch_decode(ref[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts == expected


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_onevision"])
def test_generate_until_several_images_per_request(api, model_dirs, tmp_path, family):
    """A request whose doc_to_visual returns two images next to one with one image: the images go to the
    processor as each family expects them (OneVision: nested per prompt, a lone image tiled, each of several one
    view) and the answers equal `PrunedVLM.generate` on inputs built here."""
    directory = model_dirs[family]
    images = make_images(((60, 40), (40, 64), (48, 48)), seed=4)
    docs = [{"images": images[:2]}, {"images": images[2:]}]
    questions = ["compare the left and the right image .", "what is the color ?"]
    lm = make_lm(api, directory, plan_file(tmp_path, PRUNING), batch_size=2)
    lm.task_dict = {TASK: {SPLIT: docs}}
    texts = lm.generate_until([request(api, "generate_until", (q, {"max_new_tokens": 4}, lambda d: d["images"], i,
                                                               TASK, SPLIT), i) for i, q in enumerate(questions)])
    assert len(lm.pruned.last.num_tokens) == 3  # three images in the batch, each with its own budget

    processor = load_processor(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    texts_in = [prompt_of(processor, q, len(d["images"])) for q, d in zip(questions, docs)]
    if family == "llava_onevision":
        inputs = dict(processor(images=[d["images"] for d in docs], text=texts_in, return_tensors="pt",
                                padding=True, padding_side="left"))
    else:
        inputs = reference_inputs(processor, texts_in, images)
    if "image_sizes" not in inputs:
        inputs["image_sizes"] = torch.tensor([[im.height, im.width] for im in images])
    pruned = PrunedVLM(model, PruningPlan(**PRUNING), processor=processor)
    ref = pruned.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert lm.pruned.last.num_tokens == pruned.last.num_tokens
    assert texts == processor.tokenizer.batch_decode(ref[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_until_cuts_the_text_and_stops_generating(api, model_dirs):
    directory = model_dirs["llava"]
    lm = make_lm(api, directory, batch_size=1)
    lm.task_dict = {TASK: {SPLIT: docs_for(IMAGES)}}
    images = [[IMAGES[0]]]
    _, full_ids, _ = lm.generate_ids(QUESTIONS[:1], images, {"max_new_tokens": 8})
    full = lm.tokenizer.decode(full_ids[0], skip_special_tokens=True)
    words = full.split()
    assert len(full_ids[0]) == 8 and len(words) >= 3, full
    stop = words[2]
    expected = full[: full.find(stop)]

    texts = lm.generate_until([request(api, "generate_until", (QUESTIONS[0], {"max_new_tokens": 8, "until": [stop]},
                                                               visual, 0, TASK, SPLIT), 0)])
    assert texts == [expected]
    assert lm.generate_until([request(api, "generate_until", (QUESTIONS[0], {"max_new_tokens": 8, "until": stop},
                                                              visual, 0, TASK, SPLIT), 0)]) == [expected]
    _, ids, _ = lm.generate_ids(QUESTIONS[:1], images, {"max_new_tokens": 8, "until": [stop]})
    assert ids.shape[1] < 8  # stopped once the text held the stop string
    assert torch.equal(ids[0], full_ids[0, : ids.shape[1]])


def test_generate_until_multi_round(api, model_dirs):
    """Round 0 answers the context; later rounds answer what doc_to_text returns until it signals the end."""
    directory = model_dirs["llava"]
    lm = make_lm(api, directory)
    lm.task_dict = {TASK: {SPLIT: docs_for(IMAGES)}}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return [doc["image"]], QUESTIONS[1], False, previous_output, {"round": round_idx}

    gen_kwargs = {"max_new_tokens": 4}
    out = lm.generate_until_multi_round([request(api, "generate_until_multi_round",
                                                 (QUESTIONS[0], gen_kwargs, visual, doc_to_text, 0, TASK, SPLIT), 0)])
    first = lm.generate_until([request(api, "generate_until", (QUESTIONS[0], gen_kwargs, visual, 0, TASK, SPLIT), 0)])
    second = lm.generate_until([request(api, "generate_until", (QUESTIONS[1], gen_kwargs, visual, 0, TASK, SPLIT), 0)])
    assert out == [[first[0], second[0]]]
    assert seen == [(1, [first[0]], None), (2, [first[0], second[0]], {"round": 1})]


# ---- loglikelihood -----------------------------------------------------------------------------------------------
def hand_loglikelihood(model, processor, question: str, continuation: str, image, pruned: PrunedVLM | None = None
                       ) -> tuple[float, bool, object]:
    """log P(continuation | prompt) and greedy, computed row by row from full logits (no batching, no padding)."""
    prompt = prompt_of(processor, question)
    tok = processor.tokenizer
    n = len(tok(prompt + continuation)["input_ids"]) - len(tok(prompt)["input_ids"])
    inputs = dict(processor(images=[image], text=[prompt + continuation], return_tensors="pt"))
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        if pruned is None:
            logits = model(**inputs).logits[0]
            positions = torch.arange(length)
            out = None
        else:
            inputs["image_sizes"] = torch.tensor([[image.height, image.width]])
            out = pruned(**inputs, prompt_end=torch.tensor([length - n - 1]))
            logits, positions = out.logits[0], out.pruning.positions[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    total, greedy = 0.0, True
    for column in range(length - n, length):
        row = int((positions == column - 1).nonzero().item())
        token = int(inputs["input_ids"][0, column])
        total += float(logprobs[row, token])
        greedy &= int(logprobs[row].argmax()) == token
    return total, greedy, out


def loglikelihood_requests(api, continuations):
    return [request(api, "loglikelihood", (q, c, visual, i, TASK, SPLIT), i)
            for i, (q, c) in enumerate(zip(QUESTIONS, continuations))]


def test_loglikelihood_unpruned_equals_hand_computation(api, model_dirs):
    """Batched (left padded) log-probabilities equal a row-by-row computation from the plain model's logits; the
    greedy flag is True exactly for the argmax continuation."""
    directory = model_dirs["llava"]
    processor = load_processor(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    # the plain model's own next token after the first prompt, as a continuation that must be greedy
    first = dict(processor(images=[IMAGES[0]], text=[prompt_of(processor, QUESTIONS[0])], return_tensors="pt"))
    with torch.no_grad():
        greedy_token = processor.tokenizer.decode([int(model(**first).logits[0, -1].argmax())])
    continuations = [f" {greedy_token}", " red circle", " two . yes"]
    lm = make_lm(api, directory)
    lm.task_dict = {TASK: {SPLIT: docs_for(IMAGES)}}
    got = lm.loglikelihood(loglikelihood_requests(api, continuations))
    for (value, greedy), q, c, im in zip(got, QUESTIONS, continuations, IMAGES):
        ref, ref_greedy, _ = hand_loglikelihood(model, processor, q, c, im)
        assert value == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy
    assert got[0][1] is True and got[2][1] is False
    assert got[2][0] < got[0][0] < 0


def test_loglikelihood_reads_doc_to_target_and_bare_requests(api, model_dirs):
    """A loglikelihood task passes doc_to_target (a callable of the doc); acc_mutual_info's unconditional requests
    are (context, continuation) with no visuals."""
    directory = model_dirs["llava"]
    lm = make_lm(api, directory)
    docs = [dict(d, answer=" red") for d in docs_for(IMAGES)]
    lm.task_dict = {TASK: {SPLIT: docs}}
    by_target = lm.loglikelihood([request(api, "loglikelihood", (QUESTIONS[0], lambda d: d["answer"], visual, 0,
                                                                 TASK, SPLIT), 0)])
    by_string = lm.loglikelihood(loglikelihood_requests(api, [" red"])[:1])
    assert by_target == by_string
    bare = lm.loglikelihood([request(api, "loglikelihood", ("", " red"), 0)])
    assert math.isfinite(bare[0][0]) and bare[0][0] != by_string[0][0]


def test_loglikelihood_nll_convention(api, model_dirs):
    """`loglikelihood=nll` returns -log P (lmms-eval 0.7's multiple_choice scoring takes the argmin)."""
    directory = model_dirs["llava"]
    requests = loglikelihood_requests(api, [" red", " two", " yes"])
    lm = make_lm(api, directory)
    lm.task_dict = {TASK: {SPLIT: docs_for(IMAGES)}}
    nll = api.plugin.LearnPrune.create_from_arg_string(f"pretrained={directory},device=cpu,loglikelihood=nll",
                                                       {"batch_size": 3})
    nll.task_dict = lm.task_dict
    logprob = lm.loglikelihood(requests)
    assert nll.loglikelihood(requests) == [(-v, g) for v, g in logprob]
    assert all(v < 0 for v, _ in logprob)
    with pytest.raises(ValueError, match="loglikelihood='loss'"):
        api.plugin.LearnPrune(pretrained=str(directory), device="cpu", loglikelihood="loss")


def test_loglikelihood_with_pruning_uses_the_pruned_model(api, model_dirs, tmp_path):
    """With a pruning plan: finite, different from the unpruned values, equal to a hand computation from the
    pruned forward's logits through `out.pruning.positions`, every image at its budget, and the selection made
    from the prompt alone (the same tokens as a forward of the prompt without the continuation)."""
    directory = model_dirs["llava"]
    continuations = [" red circle", " two", " yes the square ."]
    unpruned = make_lm(api, directory)
    unpruned.task_dict = {TASK: {SPLIT: docs_for(IMAGES)}}
    lm = make_lm(api, directory, plan_file(tmp_path, PRUNING))
    lm.task_dict = {TASK: {SPLIT: docs_for(IMAGES)}}
    base = unpruned.loglikelihood(loglikelihood_requests(api, continuations))
    got = lm.loglikelihood(loglikelihood_requests(api, continuations))
    assert all(math.isfinite(v) for v, _ in got)
    assert all(abs(v - b) > 1e-3 for (v, _), (b, _) in zip(got, base))
    n_tokens = lm.pruned.last.num_tokens
    assert lm.pruned.last.budgets == {"stage1": [round(0.25 * n) for n in n_tokens],
                                      "stage2": [round(0.125 * n) for n in n_tokens]}

    processor = load_processor(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    pruned = PrunedVLM(model, PruningPlan(**PRUNING), processor=processor)
    kept = lm.pruned.last.kept["stage2"]  # one item per image, in the batch's order: longest context first
    batch_row = {i: row for row, i in enumerate(sorted(range(3), key=lambda i: -len(QUESTIONS[i])))}
    for i, ((value, greedy), q, c, im) in enumerate(zip(got, QUESTIONS, continuations, IMAGES)):
        ref, ref_greedy, _ = hand_loglikelihood(model, processor, q, c, im, pruned)
        assert value == pytest.approx(ref, abs=1e-4) and greedy == ref_greedy
        prompt_only = dict(processor(images=[im], text=[prompt_of(processor, q)], return_tensors="pt"))
        prompt_only["image_sizes"] = torch.tensor([[im.height, im.width]])
        with torch.no_grad():
            out = pruned(**prompt_only)
        assert torch.equal(kept[batch_row[i]], out.pruning.kept["stage2"][0])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_loglikelihood_other_families(api, model_dirs, tmp_path, family):
    """The same path on Qwen2.5-VL (variable N per image, M-RoPE) and LLaVA-OneVision (AnyRes, nested images):
    finite, pruned at the budget, and the no-pruner values equal the plain model's on the batch."""
    directory = model_dirs[family]
    images = make_images(((60, 40), (40, 64), (48, 48)), seed=2)
    continuations = [" red", " two circle", " yes"]
    lm = make_lm(api, directory, plan_file(tmp_path, PRUNING))
    lm.task_dict = {TASK: {SPLIT: docs_for(images)}}
    got = lm.loglikelihood(loglikelihood_requests(api, continuations))
    assert all(math.isfinite(v) and v < 0 for v, _ in got)
    n_tokens = lm.pruned.last.num_tokens
    assert lm.pruned.last.budgets["stage1"] == [max(1, round(0.25 * n)) for n in n_tokens]

    unpruned = make_lm(api, directory)
    unpruned.task_dict = {TASK: {SPLIT: docs_for(images)}}
    base = unpruned.loglikelihood(loglikelihood_requests(api, continuations))
    assert all(abs(v - b) > 1e-4 for (v, _), (b, _) in zip(got, base))
    processor = load_processor(directory)
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    prompts = [prompt_of(processor, q) for q in QUESTIONS]
    tok = processor.tokenizer
    inputs = reference_inputs(processor, [p + c for p, c in zip(prompts, continuations)], images,
                              nested=family == "llava_onevision")
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
    length = inputs["input_ids"].shape[1]
    for row, (p, c) in enumerate(zip(prompts, continuations)):
        n = len(tok(p + c)["input_ids"]) - len(tok(p)["input_ids"])
        cols = torch.arange(length - n, length)
        ref = logprobs[row, cols - 1].gather(1, inputs["input_ids"][row, cols].unsqueeze(1)).sum().item()
        assert base[row][0] == pytest.approx(ref, abs=1e-4)


# ---- lmms-eval's own evaluator on a tiny local task ----------------------------------------------------------------
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function tiny_task_utils.doc_to_visual
doc_to_text: !function tiny_task_utils.doc_to_text
doc_to_target: answer
{extra}metadata:
  - version: 0.0
"""
GENERATE_EXTRA = """\
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function tiny_task_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
CHOICE_EXTRA = """\
doc_to_choice: !function tiny_task_utils.doc_to_choice
metric_list:
  - metric: acc
"""


def write_tiny_tasks(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Two local lmms-eval tasks over the same two documents (local PNG images, a JSON-lines file):
    `learnprune_tiny_gen` (generate_until, exact match) and `learnprune_tiny_mc` (multiple_choice)."""
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    utils = REPO / "tests" / "fixtures" / "lmms_eval_task" / "tiny_task_utils.py"
    (task_dir / "tiny_task_utils.py").write_text(utils.read_text())
    records = []
    for i, (question, answer, image) in enumerate(zip(["what is the color ?", "what is the shape ?"],
                                                      ["red", "circle"], make_images(((40, 30), (30, 40)), 3))):
        path = tmp_path / f"image_{i}.png"
        image.save(path)
        records.append({"image_path": str(path), "question": question, "answer": answer,
                        "choices": ["red", "circle", "two"]})
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, output_type, extra in (("learnprune_tiny_gen", "generate_until", GENERATE_EXTRA),
                                     ("learnprune_tiny_mc", "multiple_choice", CHOICE_EXTRA)):
        (task_dir / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, output_type=output_type,
                                                                extra=extra))
    return task_dir, records


@pytest.mark.skipif(not REAL_LMMS_EVAL, reason="needs lmms-eval installed (pip install 'learnprune[eval]')")
def test_lmms_eval_evaluator_runs_a_tiny_local_task(api, model_dirs, tmp_path, monkeypatch):
    """`simple_evaluate(model="learnprune", model_args="pretrained=...,pruner=plan.yaml")` on a local
    generate_until task: the registered name resolves, the model args parse, the metric is computed and every
    logged response is what the model answers for that document."""
    from lmms_eval import evaluator
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    # the installed distribution's entry point registers it; an older editable install may predate the entry point
    MODEL_REGISTRY_V2.register_manifest(api.plugin.lmms_eval_manifest(), overwrite=True)
    task_dir, records = write_tiny_tasks(tmp_path)
    plan = plan_file(tmp_path, PRUNING)
    results = evaluator.simple_evaluate(
        model="learnprune", model_args=f"pretrained={model_dirs['llava']},pruner={plan},device=cpu",
        tasks=["learnprune_tiny_gen"], batch_size=2, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager("WARNING", include_path=str(task_dir)))
    assert "exact_match,none" in results["results"]["learnprune_tiny_gen"]

    from PIL import Image

    lm = make_lm(api, model_dirs["llava"], plan)
    images = [Image.open(r["image_path"]).convert("RGB") for r in records]
    expected = lm.generate_texts([r["question"] for r in records], [[im] for im in images],
                                 {"max_new_tokens": 4, "temperature": 0, "do_sample": False})
    samples = sorted(results["samples"]["learnprune_tiny_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == expected  # one list of responses per doc (repeats)
    scores = [float(r["answer"] == e.strip()) for r, e in zip(records, expected)]
    assert results["results"]["learnprune_tiny_gen"]["exact_match,none"] == pytest.approx(sum(scores) / 2)


@pytest.mark.skipif(not REAL_LMMS_EVAL, reason="needs lmms-eval installed (pip install 'learnprune[eval]')")
def test_lmms_eval_multiple_choice_instances(api, model_dirs, tmp_path, monkeypatch):
    """The Instances lmms-eval's own multiple_choice task builds (one loglikelihood request per choice, the
    continuation " <choice>") are scored as `score` scores the choices of each document.
    (lmms-eval 0.7.3's evaluator turns every loglikelihood result into a string before `process_results`, so
    multiple_choice tasks cannot run end to end through it with any model; this calls the model on the task's
    requests directly.)"""
    from lmms_eval.tasks import TaskManager, get_task_dict

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    task_dir, records = write_tiny_tasks(tmp_path)
    task = get_task_dict(["learnprune_tiny_mc"], TaskManager("WARNING", include_path=str(task_dir)))[
        "learnprune_tiny_mc"]
    task.build_all_requests(rank=0, world_size=1)
    instances = task.instances
    assert len(instances) == 6 and {i.request_type for i in instances} == {"loglikelihood"}
    lm = make_lm(api, model_dirs["llava"], plan_file(tmp_path, PRUNING), batch_size=4)
    lm.task_dict = {"learnprune_tiny_mc": task.dataset}
    got = lm.loglikelihood(instances)

    from PIL import Image

    for record, doc_id in zip(records, range(2)):
        image = Image.open(record["image_path"]).convert("RGB")
        expected = lm.score([record["question"]] * 3, [f" {c}" for c in record["choices"]], [[image]] * 3)
        mine = [g for g, inst in zip(got, instances) if inst.doc_id == doc_id]
        assert [pytest.approx(v, abs=1e-4) for v, _ in expected] == [v for v, _ in mine]
        assert [g for _, g in expected] == [g for _, g in mine]
