"""Bad inputs: the corpus in tests/bad_inputs/ (written by tests/make_bad_inputs.py) through the real data path
(LlavaJsonDataset + LlavaCollator + LlavaDataModule's skip accounting, as `python -m trainer fit` builds them), and
bad arguments and checkpoints through the public API. Each case does what its manifest entry says: a ValueError
naming the file and position, a skip counted by kind with a message naming the record and the field or file, or
acceptance with the right pixels and text. No case crashes, and the good records mixed with every bad one all
reach a batch."""

from __future__ import annotations

import json
import re
from collections import Counter

import make_bad_inputs as mbi
import numpy as np
import pytest
from PIL import Image, ImageFile

from data.collate import LlavaCollator
from data.datamodule import LlavaDataModule
from data.llava_json import ImageSkip, LlavaJsonDataset, load_image

MANIFEST = json.loads((mbi.CORPUS / "manifest.json").read_text())
CASES = MANIFEST["cases"]
RESULTS: dict[str, mbi.Result] = {}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return mbi.make_context(tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_case_behaves_as_its_manifest_entry_says(case, ctx, tmp_path):
    result = mbi.run_case(case, mbi.CORPUS, ctx, tmp_path)
    RESULTS[case["id"]] = result
    assert not result.problems, f"{case['id']} ({case['what']}):\n" + "\n".join(result.problems)


def test_summary_table_no_crash_no_lost_record(ctx, tmp_path):
    """The README figure: every case run (reusing the parametrised runs when they happened in this session)."""
    results = [RESULTS.get(c["id"]) or mbi.run_case(c, mbi.CORPUS, ctx, tmp_path / c["id"]) for c in CASES]
    table = mbi.summary_table(results)
    print(table)
    groups = Counter(c["group"] for c in CASES)
    assert all(groups[g] >= 10 for g in ("image", "record", "file", "api")), groups
    assert "crashed: 0, lost good records: 0, not as expected: 0" in table
    outcomes = Counter(r.outcome for r in results)
    assert outcomes["raised"] and outcomes["skipped"] and outcomes["accepted"] and not outcomes["crashed"]


def test_committed_corpus_is_what_the_script_writes(tmp_path):
    written = {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in mbi.write_corpus(tmp_path)}
    committed = {p.relative_to(mbi.CORPUS).as_posix(): p.read_bytes() for p in mbi.CORPUS.rglob("*") if p.is_file()}
    assert set(written) == set(committed)
    assert sum(len(b) for b in committed.values()) < 200_000
    same_jpeg = MANIFEST["jpeg_encoder"] == mbi.jpeg_encoder()
    for name, data in written.items():
        if name == "manifest.json" and not same_jpeg:
            got, want = json.loads(data), json.loads(committed[name])
            got.pop("jpeg_encoder"), want.pop("jpeg_encoder")
            assert got == want
        elif name.endswith(".jpg") and not same_jpeg:
            continue  # another libjpeg encodes other bytes; the cases check what the committed files do
        else:
            assert data == committed[name], f"{name} differs: rerun python tests/make_bad_inputs.py"


@pytest.mark.parametrize("orientation, restore", [(6, -1), (8, 1)])
def test_exif_rotation_shows_exactly_the_upright_pixels(orientation, restore):
    """The decoded array is the stored one turned upright (np.rot90 of PIL's raw decode), not merely close."""
    path = mbi.CORPUS / "images" / f"exif_rot{orientation}.jpg"
    with Image.open(path) as stored:
        assert stored.getexif()[0x0112] == orientation
        raw = np.asarray(stored.convert("RGB"))
    assert raw.shape == (32, 16, 3)  # stored sideways
    upright = np.asarray(load_image(str(path)))
    assert upright.shape == (16, 32, 3)
    assert np.array_equal(upright, np.rot90(raw, k=restore))


def test_a_bomb_header_is_refused_before_any_pixel_is_decoded(monkeypatch):
    # PIL's own guard, where it is on, refuses 30000x30000 at open: still the image_too_large kind
    with pytest.raises(ImageSkip, match=r"bomb_30000\.png'.*decompression bomb") as err:
        load_image(str(mbi.CORPUS / "images" / "bomb_30000.png"), max_pixels=None)
    assert err.value.kind == "image_too_large"
    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own guard off: ours must stand alone
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *a, **k: loads.append(self.size) or real(self))
    for side in (30000, 9000):
        path = str(mbi.CORPUS / "images" / f"bomb_{side}.png")
        with pytest.raises(ImageSkip, match=rf"bomb_{side}\.png' declares {side}x{side} = ") as err:
            load_image(path)
        assert err.value.kind == "image_too_large"
    assert loads == []
    assert load_image(str(mbi.CORPUS / "images" / "good_0.png")).size == (40, 20)
    assert loads and set(loads) == {(40, 20)}  # the spy sees ordinary decodes


def test_load_time_skips_reach_the_epoch_summary_by_kind_from_workers(ctx, tmp_path):
    """Decoding happens in a DataLoader worker; the kinds and messages of its skips still reach the summary."""
    good = MANIFEST["good_records"]
    bad = [{"id": f"bad_{name}", "image": name, "conversations": mbi._turns((mbi.QUESTION, "red"))}
           for name in ("bomb_9000.png", "truncated.png", "corrupt.jpg")]
    (tmp_path / "train.json").write_text(json.dumps(good[:2] + bad + good[2:]))
    dm = LlavaDataModule(image_root=str(mbi.CORPUS / "images"), train_json=str(tmp_path / "train.json"),
                         batch_size=2, num_workers=1)
    dm.set_processor(ctx.processors["llava"])
    dm.setup("fit")
    ids = []
    for batch in dm.train_dataloader():
        dm.record_skipped(batch, stage="train", epoch=0)
        ids += batch.get("ids", [])
    assert sorted(ids) == sorted(r["id"] for r in good)
    assert dm.skip_summary("train", 0) == ("train: skipped 0 of 7 records; dropped at load (epoch 0): 3 "
                                           "(unreadable_image=2, image_too_large=1)")
    assert dm.skip_counts("train", 0) == Counter(unreadable_image=2, image_too_large=1)
    report = dm.skip_report("train", 0)
    for text in ("(id 'bad_bomb_9000.png')", "9000x9000", "truncated.png' cannot be decoded", "corrupt.jpg"):
        assert text in report, report


def test_16_bit_values_in_mode_i_are_scaled_not_clipped():
    """Older Pillow opens 16-bit grayscale PNGs as mode I (32-bit): scaled like I;16; 8-bit data in I is kept."""
    from data.llava_json import to_rgb

    wide = Image.fromarray(np.array([[0, 257, 65535, 70000]], dtype=np.int32), "I")
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 1, 255, 255]
    narrow = Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32), "I")
    assert np.asarray(to_rgb(narrow))[0, :, 0].tolist() == [0, 7, 255]


def test_an_image_that_disappears_after_construction_is_a_missing_image(ctx, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes((mbi.CORPUS / "images" / "good_0.png").read_bytes())
    (tmp_path / "train.json").write_text(json.dumps([mbi._rec("gone", image="a.png")]))
    ds = LlavaJsonDataset(tmp_path / "train.json", tmp_path / "img", ctx.processors["llava"])
    (tmp_path / "img" / "a.png").unlink()
    assert ds[0] is None and ds.skipped == Counter(missing_image=1)
    assert ds.take_load_skips() == [("missing_image", ds.skip_examples["missing_image"][0])]
    assert "a.png' disappeared" in ds.skip_examples["missing_image"][0] and ds.take_load_skips() == []


def test_batches_that_do_not_name_their_drops_count_them_as_unreadable_images(tmp_path):
    (tmp_path / "train.json").write_text("[]")
    dm = LlavaDataModule(image_root=str(tmp_path), train_json=str(tmp_path / "train.json"))
    dm.record_skipped({"skipped": 2}, stage="train", epoch=0)
    dm.record_skipped({"skipped": 3, "skipped_kinds": {"too_long": 1}}, stage="train", epoch=0)
    assert dm.skip_counts("train", 0) == Counter(unreadable_image=4, too_long=1)
    assert dm.skip_summary("train", 0).endswith("dropped at load (epoch 0): 5 (too_long=1, unreadable_image=4)")


def _items(ctx, tmp_path, n):
    good = MANIFEST["good_records"][:3]
    (tmp_path / "train.json").write_text(json.dumps([dict(r, id=f"{r['id']}_{k}") for k in range(n) for r in good]))
    ds = LlavaJsonDataset(tmp_path / "train.json", mbi.CORPUS / "images", ctx.processors["llava"])
    return [ds[i] for i in range(len(ds))]


def test_a_processor_that_rejects_everything_is_an_error_not_silence(ctx, tmp_path, monkeypatch):
    items = _items(ctx, tmp_path, 12)
    collator = LlavaCollator(ctx.processors["llava"])

    def refuse(images, texts):
        raise ValueError("misconfigured processor")

    monkeypatch.setattr(collator, "_process", refuse)
    limit = LlavaCollator.MAX_REJECTED_IN_A_ROW
    for start in range(0, limit - 4, 4):  # single bad items are dropped and counted ...
        assert collator(items[start:start + 4]) == {"skipped": 4}
    with pytest.raises(ValueError, match=rf"rejected {limit} items in a row.*misconfigured processor"):
        collator(items[limit - 4:limit + 4])  # ... but not a processor that accepts nothing


def test_a_batch_that_fails_only_as_a_batch_raises(ctx, tmp_path, monkeypatch):
    items = _items(ctx, tmp_path, 1)
    collator = LlavaCollator(ctx.processors["llava"])
    real = collator._process

    def only_alone(images, texts):
        if len(texts) > 1:
            raise ValueError("cannot batch these")
        return real(images, texts)

    monkeypatch.setattr(collator, "_process", only_alone)
    with pytest.raises(ValueError, match="cannot batch these"):
        collator(items)


@pytest.mark.parametrize("name, text, message", [
    ("list.yaml", "- 1\n- 2\n", "must hold a mapping of plan fields, got a list"),
    ("scalar.yaml", "5\n", "must hold a mapping of plan fields, got a int"),
    ("syntax.yaml", "stage1: [\n", "is not valid YAML"),
    ("syntax.json", "{bad", "is not valid JSON"),
    ("list.json", "[1, 2]", "must hold a mapping of plan fields, got a list"),
    ("unknown.yaml", "stage_1: random\n", "unknown PruningPlan keys ['stage_1']"),
    ("budget.yaml", "stage1: random\nn1: 0\n", "n1"),
])
def test_malformed_plan_files_are_value_errors_naming_the_file(tmp_path, name, text, message):
    from modules.pruned_vlm import PruningPlan

    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        PruningPlan.load(tmp_path / name)
    assert str(tmp_path / name) in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        PruningPlan.load(tmp_path / "missing.yaml")
