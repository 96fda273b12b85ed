"""Batch LLaVA chat items into model inputs with answer-only labels.

Answer tokens are located through character spans of the rendered chat template, not by re-tokenizing text
fragments: subword tokenizers (SentencePiece, BPE) merge across fragment boundaries, so fragment token counts do
not add up, while character offsets of one tokenization of the full text are exact. The processor's image-token
expansion is then undone by alignment: removing image tokens from both the processor's ids and the plain
tokenization must leave identical sequences.
"""

from __future__ import annotations

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
    """

    def __init__(self, processor, max_length: int | None = None):
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
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"image token {image_token!r} is not in the tokenizer's vocabulary")

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

    def _process(self, images, texts):
        return self.processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")

    def _fit(self, item: dict, enc: _Encoded, n_expanded: int) -> _Encoded | None:
        """Drop trailing QA pairs until the expanded length fits `max_length`; None when even one pair does not."""
        extra = n_expanded - len(enc.ids)  # tokens the processor adds by expanding `<image>`
        messages = item["messages"]
        n_pairs = len(enc.turn_ends)
        while n_pairs > 0:
            cut = enc.turn_ends[n_pairs - 1]
            # Tokens of the prefix: those starting before the prefix ends (+ special tokens, offsets (0, 0)).
            n = sum(1 for s, e in enc.offsets if s < cut or (s == e == 0)) + extra
            if n <= self.max_length:
                break
            n_pairs -= 1
        if n_pairs == 0:
            return None
        if n_pairs == len(enc.turn_ends):
            return enc
        assistant_seen, keep = 0, len(messages)
        for k, msg in enumerate(messages):
            if msg["role"] == "assistant":
                assistant_seen += 1
                if assistant_seen == n_pairs:
                    keep = k + 1
                    break
        item["messages"] = messages[:keep]
        return self._encode(item["messages"])

    def __call__(self, items: list[dict | None]) -> dict:
        """Batch contract (B = kept items, L = padded length):

        input_ids (B, L) int64, attention_mask (B, L) int64, both LEFT padded; pixel_values as the processor
        returns them ((B, 3, H, W) float32 for LLaVA-1.5); image_sizes (B, 2) int64 original (height, width);
        labels (B, L) int64, -100 except answer tokens and the end-of-turn token after each answer;
        prompt_end (B,) int64, column of the last token before the first answer token; skipped: int, items
        dropped in this batch (None from the dataset, or too long). When every item is dropped the batch is only
        {"skipped": k}: the training loop must skip it.
        """
        kept = [dict(it) for it in items if it is not None]
        skipped = len(items) - len(kept)
        encs = [self._encode(it["messages"]) for it in kept]

        if kept and self.max_length is not None:
            out = self._process([it["image"] for it in kept], [e.text for e in encs])
            lengths = out["attention_mask"].sum(dim=1).tolist()
            fitted_items, fitted_encs, changed = [], [], False
            for it, enc, n in zip(kept, encs, lengths):
                new = enc if n <= self.max_length else self._fit(it, enc, n)
                changed |= new is not enc
                if new is None:
                    skipped += 1
                    continue
                fitted_items.append(it)
                fitted_encs.append(new)
            kept, encs = fitted_items, fitted_encs
            if not changed:
                return self._finish(kept, encs, out, skipped)

        if not kept:
            return {"skipped": skipped}
        out = self._process([it["image"] for it in kept], [e.text for e in encs])
        return self._finish(kept, encs, out, skipped)

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
            "image_sizes": torch.tensor([list(it["image_size"]) for it in kept], dtype=torch.long),
            "labels": labels,
            "prompt_end": prompt_end,
            "skipped": skipped,
        }
        # Family-specific extras (e.g. Qwen's image_grid_thw, mm_token_type_ids) pass through untouched.
        for key, value in out.items():
            batch.setdefault(key, value)
        return batch
