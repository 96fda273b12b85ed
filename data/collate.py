"""Batch LLaVA chat items into model inputs with answer-only labels.

Answer tokens are located through character spans of the rendered chat template, not by re-tokenizing text
fragments: subword tokenizers (SentencePiece, BPE) merge across fragment boundaries, so fragment token counts do
not add up, while character offsets of one tokenization of the full text are exact. The processor's image-token
expansion is then undone by alignment: removing image tokens from both the processor's ids and the plain
tokenization must leave identical sequences.

Nothing here is model-specific: the chat template renders each image item as the processor's own placeholder
(LLaVA's `<image>`, Qwen's `<|vision_start|><|image_pad|><|vision_end|>`), the processor expands it (a fixed count
for LLaVA-1.5, each image's own count for Qwen, LLaVA-NeXT and LLaVA-OneVision), and the image token to undo comes
from the processor's `image_token_id` / `image_token`. Whatever else the processor returns (Qwen: `image_grid_thw`,
`mm_token_type_ids`; LLaVA-OneVision: `batch_num_images`) passes through as it made it.

The whole batch is one processor call, so batch-level layout is the processor's own: LLaVA-NeXT / OneVision
pixel_values (n_images, most views in the batch, C, H, W) are zero-padded on the view axis exactly as the processor
pads them. LLaVA-OneVision tells a prompt's lone image (tiled) from several (one view each) by the nesting of
`images`, so it is given each prompt's images as one list (see `LlavaCollator._process`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class _Encoded:
    text: str
    spans: list[tuple[int, int]]  # character spans of each answer (+ its end-of-turn text) in `text`
    turn_ends: list[int]  # character offset where each assistant turn's rendering ends
    ids: list[int]  # plain tokenization, `<image>` unexpanded
    offsets: list[tuple[int, int]]


class LlavaCollator:
    """Callable for `DataLoader(collate_fn=...)`; see `__call__` for the batch contract.

    With `max_length`, a conversation too long after image-token expansion loses trailing question/answer pairs;
    when not even the first pair fits the item is dropped and counted in `skipped`. Nothing is truncated
    mid-sequence: cutting image tokens would desynchronise them from the image features.

    One bad item never fails the batch: when the processor (or the chat template) raises for the batch, each item
    is tried alone and those it rejects alone are dropped (`rejected_by_processor`, e.g. Qwen-VL's processors
    refuse an image whose aspect ratio exceeds 200). If every item passes alone the batch's error is raised; if
    `MAX_REJECTED_IN_A_ROW` items in a row are rejected with none accepted between them, that is a configuration
    problem, not bad records, and a ValueError.

    `dataset` (optional, the `LlavaJsonDataset` the items come from): the batch then also reports its skips by
    kind, `skipped_kinds` {kind: count} (the dataset's load-time skips since the previous batch, drained with
    `take_load_skips`, plus this collator's own `too_long` / `rejected_by_processor`), and `skipped_messages`
    {kind: [message, ...]}, one message per skip naming the record and the file or field. Without it batches carry
    `skipped` only.
    """

    MAX_REJECTED_IN_A_ROW = 32

    def __init__(self, processor, max_length: int | None = None, dataset=None):
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"LlavaCollator needs a fast tokenizer (character offsets); got "
                             f"{type(self.tokenizer).__name__}")
        # Left padding puts every prompt's last token at the same column, which generation and scoring expect.
        self.tokenizer.padding_side = "left"
        self.max_length = max_length
        image_token = getattr(processor, "image_token", None) or "<image>"
        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"image token {image_token!r} is not in the tokenizer's vocabulary")
        image_processor = getattr(processor, "image_processor", None)
        self.nest_images = "batch_num_images" in getattr(image_processor, "model_input_names", ())
        self.dataset = dataset
        self._rejected_in_a_row = 0

    # -- text side ---------------------------------------------------------------------------------------------

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _encode(self, messages: list[dict]) -> _Encoded:
        text = self._render(messages)
        spans, turn_ends = [], []
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            upto = self._render(messages[: k + 1])
            if not text.startswith(upto):
                raise ValueError("chat template is not prefix-stable: rendering the first "
                                 f"{k + 1} messages is not a prefix of the whole conversation")
            prompt = self._render(messages[:k], add_generation_prompt=True)
            if upto.startswith(prompt):
                start = len(prompt)
            else:
                # Templates whose generation prompt differs from the assistant header: find the answer itself.
                answer = "".join(c.get("text", "") for c in msg["content"] if c.get("type") == "text")
                start = upto.find(answer, len(self._render(messages[:k])))
                if start < 0:
                    raise ValueError(f"cannot locate assistant answer {answer!r} in the rendered template")
            end = len(upto)
            # Whitespace around the span is template glue; labelling a token that only touches it would leak the
            # next turn's header into the labels.
            while start < end and upto[start].isspace():
                start += 1
            while end > start and upto[end - 1].isspace():
                end -= 1
            spans.append((start, end))
            turn_ends.append(len(upto))
        enc = self.tokenizer(text, return_offsets_mapping=True)
        return _Encoded(text, spans, turn_ends, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])

    def _plain_labels(self, enc: _Encoded) -> list[bool]:
        return [any(s < e_span and e > s_span for s_span, e_span in enc.spans) and e > s
                for s, e in enc.offsets]

    # -- batching ----------------------------------------------------------------------------------------------

    def _process(self, images: list[list], texts: list[str]):
        """One processor call for the batch: `images` holds each prompt's own list. Processors that tell one- from
        multi-image prompts (LLaVA-OneVision: `batch_num_images`; a lone image is tiled, each of several is one
        view) get them nested per prompt; the others get the flat list in batch order."""
        if self.nest_images:
            images = [list(ims) for ims in images]
        else:
            images = [im for ims in images for im in ims]
        return self.processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")

    @staticmethod
    def _images(item: dict) -> tuple[list, list]:
        """(images, their original (height, width)) of an item: "images"/"image_sizes" lists, or the one-image
        "image"/"image_size" form."""
        if "images" in item:
            return list(item["images"]), [tuple(s) for s in item["image_sizes"]]
        return [item["image"]], [tuple(item["image_size"])]

    @staticmethod
    def _n_images(messages: list[dict]) -> int:
        return sum(1 for m in messages if isinstance(m["content"], list)
                   for c in m["content"] if c.get("type") == "image")

    def _fit(self, item: dict, enc: _Encoded, n_expanded: int) -> _Encoded | None:
        """Drop trailing QA pairs (and the images only they show) until the expanded length fits `max_length`;
        None when even one pair does not."""
        extra = n_expanded - len(enc.ids)  # tokens the processor adds by expanding every image placeholder
        messages, images = item["messages"], item["images"]
        n_pairs = len(enc.turn_ends)
        keeps = [k + 1 for k, m in enumerate(messages) if m["role"] == "assistant"]  # messages up to pair i
        while n_pairs > 0:
            keep = keeps[n_pairs - 1]
            n_img = self._n_images(messages[:keep])
            if n_img == len(images):
                cut = enc.turn_ends[n_pairs - 1]
                # Tokens of the prefix: those starting before the prefix ends (+ special tokens, offsets (0, 0)).
                n = sum(1 for s, e in enc.offsets if s < cut or (s == e == 0)) + extra
            else:
                # Images shown only in later turns leave with them; their token counts are the processor's to say.
                out = self._process([images[:n_img]], [self._render(messages[:keep])])
                n = int(out["attention_mask"].sum())
            if n <= self.max_length:
                break
            n_pairs -= 1
        if n_pairs == 0:
            return None
        if n_pairs == len(enc.turn_ends):
            return enc
        keep = keeps[n_pairs - 1]
        n_img = self._n_images(messages[:keep])
        item["messages"] = messages[:keep]
        item["images"], item["image_sizes"] = images[:n_img], item["image_sizes"][:n_img]
        return self._encode(item["messages"])

    def __call__(self, items: list[dict | None]) -> dict:
        """Batch contract (B = kept items, L = padded length):

        input_ids (B, L) int64, attention_mask (B, L) int64, both LEFT padded; pixel_values as the processor
        returns them ((n_images, 3, H, W) float32 for LLaVA-1.5; Qwen's flat (sum of t*h*w patches, C*t*p*p)
        with image_grid_thw (n_images, 3) int64 (t, h, w) in patches, and mm_token_type_ids (B, L) int64, 0 text
        / 1 image, left padded like input_ids; LLaVA-NeXT / OneVision's (n_images, max views, 3, H, W) zero-padded
        on the view axis, with OneVision's batch_num_images (B,) int64, images per prompt); image_sizes (n_images, 2) int64, each image's original (height,
        width), images in batch order (row by row, each row's in conversation order); labels (B, L) int64, -100
        except answer tokens and the end-of-turn token after each answer; prompt_end (B,) int64, column of the
        last token before the first answer token; skipped: int, items dropped in this batch (None from the
        dataset, too long, or rejected by the processor); ids: the kept items' record ids. With a `dataset`,
        also skipped_kinds and skipped_messages (see the class docstring). When every item is dropped the batch
        has no input_ids, only {"skipped": k} (and the skip report): the training loop must skip it. Any other
        processor output passes through unchanged.

        Items: {"messages", "images", "image_sizes"} (or one "image" with its "image_size"), as LlavaJsonDataset
        makes them.
        """
        kinds, messages = Counter(), {}
        kept = []
        for it in items:
            if it is not None:
                it = dict(it)
                it["images"], it["image_sizes"] = self._images(it)
                kept.append(it)
        kept, encs = self._encode_items(kept, kinds, messages)
        out = None

        if kept and self.max_length is not None:
            kept, encs, out = self._process_items(kept, encs, kinds, messages)
            lengths = out["attention_mask"].sum(dim=1).tolist() if kept else []
            fitted_items, fitted_encs, changed = [], [], False
            for it, enc, n in zip(kept, encs, lengths):
                new = enc if n <= self.max_length else self._fit(it, enc, n)
                changed |= new is not enc
                if new is None:
                    where = it.get("source") or f"item {it.get('id')!r}"
                    self._note(kinds, messages, "too_long", f"{where}: {n} tokens after image-token expansion; not "
                               f"even its first question and answer fit max_length={self.max_length}")
                    continue
                fitted_items.append(it)
                fitted_encs.append(new)
            if changed:
                kept, encs, out = fitted_items, fitted_encs, None

        if kept and out is None:
            kept, encs, out = self._process_items(kept, encs, kinds, messages)
        skipped = len(items) - len(kept)
        report = self._skip_report(kinds, messages)
        if not kept:
            return {"skipped": skipped, **report}
        return {**self._finish(kept, encs, out, skipped), **report}

    # -- bad items ---------------------------------------------------------------------------------------------

    @staticmethod
    def _note(kinds: Counter, messages: dict[str, list[str]], kind: str, message: str) -> None:
        kinds[kind] += 1
        messages.setdefault(kind, []).append(message)

    def _reject(self, item: dict, err: Exception, kinds: Counter, messages: dict[str, list[str]]) -> None:
        paths = item.get("image_paths")
        where = item.get("source") or f"item {item.get('id')!r}"
        where += f" (images {paths})" if paths else ""
        self._note(kinds, messages, "rejected_by_processor",
                   f"{where}: the processor rejected it: {type(err).__name__}: {err}")
        self._rejected_in_a_row += 1
        if self._rejected_in_a_row >= self.MAX_REJECTED_IN_A_ROW:
            self._rejected_in_a_row = 0
            raise ValueError(f"the processor rejected {self.MAX_REJECTED_IN_A_ROW} items in a row and accepted "
                             f"none; the last, {where}: {type(err).__name__}: {err}. This looks like a processor or "
                             "configuration problem, not bad records") from err

    def _encode_items(self, kept: list[dict], kinds: Counter, messages: dict[str, list[str]]):
        good, encs = [], []
        for it in kept:
            try:
                enc = self._encode(it["messages"])
            except Exception as err:  # noqa: BLE001 - a template that fails on one item fails that item
                if isinstance(err, MemoryError):
                    raise
                self._reject(it, err, kinds, messages)
                continue
            good.append(it)
            encs.append(enc)
        return good, encs

    def _process_items(self, kept: list[dict], encs: list[_Encoded], kinds: Counter, messages: dict[str, list[str]]):
        """(kept, encs, processor output) after one processor call for the batch; when it raises, the items the
        processor rejects alone are dropped and counted and the others processed again."""
        if not kept:
            return kept, encs, None
        try:
            out = self._process([it["images"] for it in kept], [e.text for e in encs])
        except Exception as err:  # noqa: BLE001 - narrowed down item by item below
            if isinstance(err, MemoryError):
                raise
            batch_error = err
        else:
            self._rejected_in_a_row = 0
            return kept, encs, out
        good = []
        for it, enc in zip(kept, encs):
            try:
                self._process([it["images"]], [enc.text])
            except Exception as err:  # noqa: BLE001
                if isinstance(err, MemoryError):
                    raise
                self._reject(it, err, kinds, messages)
            else:
                good.append((it, enc))
        if len(good) == len(kept):
            raise batch_error  # every item passes alone: the batch itself is the problem
        if not good:
            return [], [], None
        kept, encs = [it for it, _ in good], [enc for _, enc in good]
        return self._process_items(kept, encs, kinds, messages)

    def _skip_report(self, kinds: Counter, messages: dict[str, list[str]]) -> dict:
        if self.dataset is None:
            return {}
        for kind, message in self.dataset.take_load_skips():
            self._note(kinds, messages, kind, message)
        return {"skipped_kinds": dict(kinds), "skipped_messages": messages}

    def _finish(self, kept: list[dict], encs: list[_Encoded], out, skipped: int) -> dict:
        input_ids, attention_mask = out["input_ids"], out["attention_mask"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        prompt_end = torch.empty(len(kept), dtype=torch.long)
        for row, enc in enumerate(encs):
            plain_mask = self._plain_labels(enc)
            plain = [(t, m) for t, m in zip(enc.ids, plain_mask) if t != self.image_token_id]
            row_ids, row_mask = input_ids[row].tolist(), attention_mask[row].tolist()
            cols = [c for c, (t, m) in enumerate(zip(row_ids, row_mask)) if m and t != self.image_token_id]
            if [row_ids[c] for c in cols] != [t for t, _ in plain]:
                raise ValueError("processor tokenization differs from the tokenizer's beyond image-token "
                                 f"expansion for item {kept[row].get('id')!r}; cannot place labels")
            for c, (tok, is_answer) in zip(cols, plain):
                if is_answer:
                    labels[row, c] = tok
            answer_cols = (labels[row] != IGNORE_INDEX).nonzero().flatten()
            if len(answer_cols) == 0 or answer_cols[0].item() == 0:
                raise ValueError(f"item {kept[row].get('id')!r}: no prompt token before the answer")
            prompt_end[row] = answer_cols[0] - 1
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": out["pixel_values"],
            "image_sizes": torch.tensor([list(s) for it in kept for s in it["image_sizes"]],
                                        dtype=torch.long).view(-1, 2),
            "labels": labels,
            "prompt_end": prompt_end,
            "skipped": skipped,
            "ids": [it.get("id") for it in kept],  # record ids, for messages about this batch
        }
        # Family-specific extras (e.g. Qwen's image_grid_thw, mm_token_type_ids) pass through untouched.
        for key, value in out.items():
            batch.setdefault(key, value)
        return batch
