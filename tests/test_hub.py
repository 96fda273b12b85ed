"""Hub-ready pruners, offline: PrunerHead as a huggingface_hub PyTorchModelHubMixin (directory or hub id, push),
pruner_config.json versioning, the model card, and the errors a user can cause (pickles, truncated weights,
another model). The hub is stood in for by monkeypatched huggingface_hub functions that copy local directories."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load as load_safetensors_bytes

from data.tiny import tiny_llava
from modules.config import to_config
from modules.distill import DEFAULT_LORA_TARGET, HEAD_PREFIX, MODEL_PREFIX, export_pruner
from modules.head import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, PrunerFormatWarning, PrunerHead
from modules.pruned_vlm import PrunedVLM, PruningPlan
from modules.serve import load_pruned, push_pruner, trained_plan
from modules.vlm import get_adapter

BASE = "llava-hf/llava-1.5-7b-hf"
METRICS = {"test/accuracy": 0.6, "test/teacher_accuracy": 0.8, "test/kept_ratio": 0.25, "test/kl": 0.125}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def small_head(**kw) -> PrunerHead:
    torch.manual_seed(0)
    return PrunerHead(in_dim=16, d_model=32, depth=1, heads=2, base_model=BASE, model_type="llava", n1=6, n2=3,
                      layer=2, stage2={"name": "fastv", "query": "last"}, **kw).eval()


def assert_same_head(loaded: PrunerHead, head: PrunerHead) -> None:
    assert loaded.config == head.config
    ours, theirs = head.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def lora_pruner(tokenizer, processor, tmp_path_factory):
    """A tiny LLaVA with trained (randomised) LoRA adapters and a head, exported as a pruner directory with
    metrics and training data, as DistillPruner.export_head would write it."""
    from peft import LoraConfig, inject_adapter_in_model

    trained = tiny_llava(tokenizer)
    torch.manual_seed(3)
    head = PrunerHead.for_model(get_adapter(trained, processor), d_model=32, depth=1, heads=2).eval()
    plan = PruningPlan(stage1=head, n1=6, stage2="fastv", n2=3, layer=2)
    head.config.n1, head.config.n2, head.config.layer = 6, 3, 2
    head.config.stage2 = to_config(plan.scorer)
    head.config.base_model = BASE  # what DistillPruner records from its `model` argument
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGET)
    inject_adapter_in_model(lora, trained)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an untrained adapter would change nothing
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    state = {HEAD_PREFIX + k: v for k, v in head.state_dict().items()}
    state.update({MODEL_PREFIX + k: v.clone() for k, v in lora_params(trained).items()})
    directory = tmp_path_factory.mktemp("lora") / "pruner"
    export_pruner(directory, asdict(head.config), state, lora.to_dict(), metrics=METRICS,
                  training_data="data/toyworld/train.json")
    return SimpleNamespace(directory=directory, head=head, trained=trained, lora=lora_params(trained))


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub.snapshot_download copying from local directories `repos[repo_id]`, honouring
    allow_patterns as the hub does; every call is recorded. hf_hub_download must not be used."""
    repos: dict[str, Path] = {}
    calls: list[dict] = []

    def snapshot_download(repo_id, *, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns, "ignore_patterns": ignore_patterns,
                      **kwargs})
        source = repos[repo_id]
        snapshot = tmp_path / "hub-cache" / repo_id.replace("/", "--") / str(len(calls))
        snapshot.mkdir(parents=True)
        files = [p for p in source.rglob("*") if p.is_file()]
        for f in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                     key=lambda p: p.relative_to(source).as_posix()):
            target = snapshot / f.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        return str(snapshot)

    def hf_hub_download(*args, **kwargs):
        raise AssertionError(f"unexpected hf_hub_download{args}{kwargs}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", hf_hub_download)
    return SimpleNamespace(repos=repos, calls=calls)


@pytest.fixture
def fake_api(monkeypatch):
    """HfApi.create_repo / upload_folder recording the repo and the files an upload would send."""
    created, uploads = [], []

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        created.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = [p for p in folder.rglob("*") if p.is_file()]
        sent = {p.relative_to(folder).as_posix(): p.read_bytes() for p in filter_repo_objects(
            files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
            key=lambda p: p.relative_to(folder).as_posix())}
        uploads.append({"repo_id": repo_id, "files": sent, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return SimpleNamespace(created=created, uploads=uploads)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling fails the test (not with a ValueError: a refusal must come before it)."""
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)


# ---- save / load ---------------------------------------------------------------------------------------------
def test_round_trip_through_from_pretrained_keeps_every_weight_and_the_config(tmp_path):
    head = small_head(question=True, prompt_dim=24)
    assert isinstance(head, huggingface_hub.PyTorchModelHubMixin)
    assert head.save_pretrained(tmp_path / "h") == tmp_path / "h"
    assert {p.name for p in (tmp_path / "h").iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, "README.md"}
    raw = json.loads((tmp_path / "h" / CONFIG_NAME).read_text())
    assert raw["format_version"] == FORMAT_VERSION == 1 and raw["base_model"] == BASE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file this version wrote loads without a warning
        loaded = PrunerHead.from_pretrained(str(tmp_path / "h"))
    assert_same_head(loaded, head)
    assert loaded.source == str(tmp_path / "h") and loaded.directory == tmp_path / "h" and not loaded.training


def test_hub_id_downloads_a_snapshot_with_the_adapter_and_load_pruned_applies_it(lora_pruner, fake_hub, tokenizer,
                                                                                 processor, batch, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(lora_pruner.directory, repo)
    torch.save({"decoy": torch.zeros(1)}, repo / "pytorch_model.bin")  # on the hub too: never downloaded
    fake_hub.repos["org/llava-pruner"] = repo

    served = load_pruned(tiny_llava(tokenizer), "org/llava-pruner", processor=processor, revision="v1")
    (call,) = fake_hub.calls
    assert call["repo_id"] == "org/llava-pruner" and call["revision"] == "v1"
    assert {CONFIG_NAME, WEIGHTS_NAME, "adapter/*"} <= set(call["allow_patterns"])
    snapshot = served.selector.directory
    assert (snapshot / "adapter" / "adapter_model.safetensors").is_file()
    assert not [p for p in snapshot.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert served.selector.source == "org/llava-pruner"  # plans keep naming the head by its hub id
    assert_same_head(served.selector, lora_pruner.head)
    assert served.plan.n1 == 6 and served.plan.n2 == 3 and served.layer == 2
    got = lora_params(served.model)
    assert got.keys() == lora_pruner.lora.keys()
    for name, value in lora_pruner.lora.items():
        assert torch.equal(got[name], value), name
    reference = PrunedVLM(lora_pruner.trained, trained_plan(lora_pruner.head), processor=processor)
    bare = PrunedVLM(tiny_llava(tokenizer), trained_plan(lora_pruner.head), processor=processor)
    with torch.no_grad():
        out, expected, without = served(**batch).logits, reference(**batch).logits, bare(**batch).logits
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, without, atol=1e-4), "the adapter from the snapshot changes the output"

    head = PrunerHead.from_pretrained("org/llava-pruner", revision="v1")
    assert_same_head(head, lora_pruner.head)
    assert len(fake_hub.calls) == 2


def test_push_to_hub_uploads_config_weights_and_card_never_a_pickle(fake_api, lora_pruner, tmp_path):
    head = small_head()
    url = head.push_to_hub("org/head", private=True, model_card_kwargs={"metrics": METRICS})
    assert url == "https://huggingface.co/org/head/commit/0"
    assert fake_api.created == [{"repo_id": "org/head", "private": True, "exist_ok": True}]
    (upload,) = fake_api.uploads
    assert upload["repo_id"] == "org/head" and set(upload["files"]) == {CONFIG_NAME, WEIGHTS_NAME, "README.md"}
    config = json.loads(upload["files"][CONFIG_NAME])
    assert config["format_version"] == 1 and config["base_model"] == BASE
    weights = load_safetensors_bytes(upload["files"][WEIGHTS_NAME])
    assert weights.keys() == head.state_dict().keys()
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in weights.items())
    card = upload["files"]["README.md"].decode()
    assert f"base_model: {BASE}" in card and "library_name: learnprune" in card and "75.0%" in card

    # a whole pruner directory, with its LoRA adapter, and nothing else that lies there
    directory = tmp_path / "pruner"
    shutil.copytree(lora_pruner.directory, directory)
    torch.save({"decoy": torch.zeros(1)}, directory / "pytorch_model.bin")
    (directory / "notes.txt").write_text("private")
    push_pruner(directory, "org/pruner")
    files = fake_api.uploads[-1]["files"]
    assert set(files) == {CONFIG_NAME, WEIGHTS_NAME, "README.md", "adapter/adapter_config.json",
                          "adapter/adapter_model.safetensors"}
    assert fake_api.uploads[-1]["repo_id"] == "org/pruner"


# ---- pruner_config.json across versions ------------------------------------------------------------------------
def test_unknown_config_keys_warn_name_them_and_are_ignored(tmp_path):
    head = small_head()
    head.save_pretrained(tmp_path / "h")
    raw = json.loads((tmp_path / "h" / CONFIG_NAME).read_text())
    (tmp_path / "h" / CONFIG_NAME).write_text(json.dumps({**raw, "colour": 1, "scorer_v2": {"name": "x"}}))
    with pytest.warns(PrunerFormatWarning, match=r"unknown keys \['colour', 'scorer_v2'\]"):
        loaded = PrunerHead.from_pretrained(tmp_path / "h")
    assert_same_head(loaded, head)


def test_newer_format_version_warns_and_old_files_load_as_before(tmp_path):
    head = small_head()
    head.save_pretrained(tmp_path / "h")
    raw = json.loads((tmp_path / "h" / CONFIG_NAME).read_text())
    (tmp_path / "h" / CONFIG_NAME).write_text(json.dumps({**raw, "format_version": FORMAT_VERSION + 1}))
    with pytest.warns(PrunerFormatWarning, match=f"format_version {FORMAT_VERSION + 1}, newer"):
        assert_same_head(PrunerHead.from_pretrained(tmp_path / "h"), head)
    old = {k: v for k, v in raw.items() if k not in ("format_version", "base_model")}  # as written before both
    (tmp_path / "h" / CONFIG_NAME).write_text(json.dumps(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = PrunerHead.from_pretrained(tmp_path / "h")
    assert loaded.config.base_model is None and loaded.config.n1 == 6
    (tmp_path / "h" / CONFIG_NAME).write_text(json.dumps({**raw, "format_version": "one"}))
    with pytest.raises(ValueError, match="format_version='one'"):
        PrunerHead.from_pretrained(tmp_path / "h")


# ---- errors a user can cause -----------------------------------------------------------------------------------
def test_pickled_only_directory_is_refused_without_unpickling(tmp_path, fake_hub, request):
    head = small_head()
    head.save_pretrained(tmp_path / "h")
    (tmp_path / "h" / WEIGHTS_NAME).unlink()
    torch.save(head.state_dict(), tmp_path / "h" / "pytorch_model.bin")
    torch.save(head.state_dict(), tmp_path / "bare.pt")
    (tmp_path / "only").mkdir()
    shutil.move(tmp_path / "bare.pt", tmp_path / "only" / "head.pt")
    fake_hub.repos["org/pickled"] = tmp_path / "h"
    request.getfixturevalue("no_unpickling")  # from here on, any unpickling fails the test
    with pytest.raises(ValueError, match=r"pickled weights \['pytorch_model\.bin'\].*will not unpickle"):
        PrunerHead.from_pretrained(tmp_path / "h")
    with pytest.raises(ValueError, match=r"\['head\.pt'\].*will not unpickle"):
        PrunerHead.from_pretrained(tmp_path / "only")
    with pytest.raises(ValueError, match=r"'org/pickled' has no model\.safetensors"):
        PrunerHead.from_pretrained("org/pickled")
    assert not any(p.endswith((".bin", ".pt")) or p in ("*", "*.*") for p in fake_hub.calls[0]["allow_patterns"])


def test_truncated_or_missing_weights_are_value_errors_naming_the_file(tmp_path, lora_pruner, tokenizer, processor):
    small_head().save_pretrained(tmp_path / "h")
    weights = tmp_path / "h" / WEIGHTS_NAME
    data = weights.read_bytes()
    for size in (0, 5, 60, len(data) - 16):
        weights.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"model\.safetensors' is not a readable safetensors file"):
            PrunerHead.from_pretrained(tmp_path / "h")
    weights.unlink()
    with pytest.raises(ValueError, match=r"has no model\.safetensors"):
        PrunerHead.from_pretrained(tmp_path / "h")
    # the LoRA adapter too, refused before it touches the model
    directory = tmp_path / "pruner"
    shutil.copytree(lora_pruner.directory, directory)
    adapter = directory / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    model = tiny_llava(tokenizer)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors' is not a readable safetensors file"):
        load_pruned(model, directory, processor=processor)
    assert not lora_params(model)


def test_a_pruner_for_another_model_is_refused_before_its_adapter_is_applied(tmp_path, lora_pruner, tokenizer,
                                                                            processor):
    directory = tmp_path / "pruner"
    shutil.copytree(lora_pruner.directory, directory)
    raw = json.loads((directory / CONFIG_NAME).read_text())
    raw.update(model_type="qwen2_5_vl", base_model="Qwen/Qwen2.5-VL-3B-Instruct")
    (directory / CONFIG_NAME).write_text(json.dumps(raw))
    model = tiny_llava(tokenizer)
    with pytest.raises(ValueError, match=r"'qwen2_5_vl' \(Qwen/Qwen2\.5-VL-3B-Instruct\), the model is 'llava'"):
        load_pruned(model, directory, processor=processor)
    assert not lora_params(model)
    raw.update(model_type="llava", in_dim=48)
    (directory / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match"):
        load_pruned(model, directory, processor=processor)


# ---- the model card --------------------------------------------------------------------------------------------
def test_model_card_records_base_model_budgets_training_data_and_retention(lora_pruner, tmp_path):
    card = ModelCard.load(lora_pruner.directory / "README.md")
    assert card.data.base_model == BASE and card.data.library_name == "learnprune"
    assert {"learnprune", "visual-token-pruning"} <= set(card.data.tags)
    record = card.data.learnprune
    assert (record["n1"], record["n2"], record["layer"]) == (6, 3, 2)
    assert record["stage2"] == {"name": "fastv", "query": "last"} and record["lora_adapter"] is True
    assert record["training_data"] == "data/toyworld/train.json"
    assert record["metrics"]["retention"] == pytest.approx(0.75) and record["metrics"]["kept_ratio"] == 0.25
    text = card.text
    for fragment in (f"`{BASE}`", "| 6 tokens", "| 3 tokens", "| stage 2: layer K | 2 |", "`fastv`",
                     "data/toyworld/train.json", "0.6000", "0.8000", "0.7500 (75.0%)", "0.2500 (25.0%)", "test/kl"):
        assert fragment in text, fragment
    assert json.loads((lora_pruner.directory / CONFIG_NAME).read_text())["base_model"] == BASE

    # a local base model is named in the text, not as hub metadata (the Hub takes model ids there only); no
    # metrics, no retention section; re-exporting rewrites the card
    head = small_head()
    state = {HEAD_PREFIX + k: v for k, v in head.state_dict().items()}
    config = {**asdict(head.config), "base_model": str(tmp_path)}
    export_pruner(tmp_path / "p", config, state)
    card = ModelCard.load(tmp_path / "p" / "README.md")
    assert card.data.base_model is None and f"`{tmp_path}`" in card.text and "retention" not in card.text
    export_pruner(tmp_path / "p", config, state, metrics={"accuracy": 0.5, "teacher_accuracy": 1.0})
    assert "0.5000 (50.0%)" in (tmp_path / "p" / "README.md").read_text()


def test_export_pruner_replaces_an_earlier_export_whole_and_warns_on_unknown_config_keys(tmp_path):
    head = small_head()
    state = {HEAD_PREFIX + k: v for k, v in head.state_dict().items()}
    export_pruner(tmp_path / "p", asdict(head.config), state)
    (tmp_path / "p" / "adapter").mkdir()  # e.g. an earlier export's LoRA adapter: load_pruned would apply it
    export_pruner(tmp_path / "p", asdict(head.config), state)
    assert not (tmp_path / "p" / "adapter").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a pruner")
    with pytest.raises(ValueError, match="is not a pruner directory"):
        export_pruner(tmp_path / "mine", asdict(head.config), state)
    with pytest.warns(PrunerFormatWarning, match=r"\['from_the_future'\]"):
        out = export_pruner(tmp_path / "q", {**asdict(head.config), "from_the_future": 1}, state)
    assert_same_head(PrunerHead.from_pretrained(out), head)
