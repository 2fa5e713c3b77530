"""Training batches for distillation: packed text, chat JSONL with prompt masking, prompt-only JSONL.

A batch says which positions are trained (`loss_mask`: the model's prediction at
position i of token i+1 counts) so the same loss serves packed text (every
position), chat (assistant tokens only) and generated completions.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .tokens import WindowSampler


@dataclass
class Batch:
    input_ids: torch.Tensor        # [B, T]
    attention_mask: torch.Tensor   # [B, T], 0 on padding
    loss_mask: torch.Tensor        # [B, T] bool: the prediction at i (of token i+1) is trained
    labels: torch.Tensor           # [B, T] next-token ids, −100 where none

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask, self.labels)))

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def next_token_labels(ids: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(train[:, :-1], ids[:, 1:], -100)
    return labels


class _Shuffled:
    """Items in a fresh seeded order each epoch: reproducible for a seed, resumable from a count."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


class TextBatches:
    """Packed windows of a token stream; every position is trained."""

    def __init__(self, stream: list[int], seq_len: int, batch_size: int, seed: int = 0):
        self.sampler = WindowSampler(stream, seq_len, batch_size, seed=seed)

    def next_batch(self) -> Batch:
        ids = torch.tensor(self.sampler.next_batch(), dtype=torch.long)
        ones = torch.ones_like(ids, dtype=torch.bool)
        return Batch(ids, torch.ones_like(ids), ones, next_token_labels(ids, ones))

    def prompts(self, n: int, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window prefixes as prompts for on-policy / sequence-level KD on plain text."""
        ids = torch.tensor([w[:prompt_len] for w in self.sampler.next_batch()[:n]], dtype=torch.long)
        return ids, torch.ones_like(ids)


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file '{path}' does not exist; give a JSONL file with one JSON object per line.")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object.") from None
    if not rows:
        raise DataError(f"{what} file '{path}' is empty; it needs at least one JSON line.")
    return rows


def chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation with the chat template, and which tokens the assistant wrote."""
    ids = _template(tokenizer, messages, add_generation_prompt=False)
    wrote = [False] * len(ids)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(_template(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_template(tokenizer, messages[:i + 1], add_generation_prompt=False))
        for j in range(start, min(end, len(ids))):
            wrote[j] = True
    return ids, wrote


def _template(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


class ChatBatches:
    """JSONL rows {"messages": [{"role", "content"}, ...]}; only assistant tokens are trained. Right-padded."""

    def __init__(self, path: str | Path, tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 context: int | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("the tokenizer has no chat template, so chat JSONL cannot be rendered; use text data.")
        self.items: list[tuple[list[int], list[bool]]] = []
        for i, row in enumerate(read_jsonl(path, "chat data"), 1):
            msgs = row.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{path}:{i}: expected a non-empty 'messages' list of {{'role', 'content'}} objects.")
            ids, wrote = chat_tokens(tokenizer, msgs)
            if context is not None and len(ids) > context:
                raise DataError(f"{path}:{i}: conversation of {len(ids)} tokens is longer than the model's context "
                                f"({context}); shorten or drop it.")
            if not any(wrote[1:seq_len]):
                continue  # nothing the assistant wrote survives truncation
            self.items.append((ids[:seq_len], wrote[:seq_len]))
        if not self.items:
            raise DataError(f"{path}: no conversation has an assistant turn within the first {seq_len} tokens.")
        self.batch_size, self.pad = batch_size, tokenizer.pad_token_id or 0
        self.order = _Shuffled(len(self.items), seed)

    def next_batch(self) -> Batch:
        rows = [self.items[i] for i in self.order.take(self.batch_size)]
        T = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        wrote = torch.zeros_like(ids, dtype=torch.bool)
        for b, (x, w) in enumerate(rows):
            ids[b, :len(x)] = torch.tensor(x)
            attn[b, :len(x)] = 1
            wrote[b, :len(w)] = torch.tensor(w)
        train = torch.zeros_like(wrote)
        train[:, :-1] = wrote[:, 1:]  # position i is trained when token i+1 is the assistant's
        return Batch(ids, attn, train, next_token_labels(ids, train))


class PromptBatches:
    """JSONL rows {"prompt": str} or {"messages": [...]} (rendered with a generation prompt). Left-padded."""

    def __init__(self, path: str | Path, tokenizer, batch_size: int, seed: int = 0, max_prompt_tokens: int = 512):
        self.items = []
        for i, row in enumerate(read_jsonl(path, "prompt data"), 1):
            if isinstance(row.get("messages"), list) and row["messages"]:
                ids = _template(tokenizer, row["messages"], add_generation_prompt=True)
            elif isinstance(row.get("prompt"), str) and row["prompt"]:
                ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            else:
                raise DataError(f"{path}:{i}: expected a 'prompt' string or a 'messages' list.")
            self.items.append(ids[-max_prompt_tokens:])
        self.batch_size, self.pad = batch_size, tokenizer.pad_token_id or 0
        self.order = _Shuffled(len(self.items), seed)

    def prompts(self, n: int, prompt_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.items[i] for i in self.order.take(n)]
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, x in enumerate(rows):
            ids[b, T - len(x):] = torch.tensor(x)
            attn[b, T - len(x):] = 1
        return ids, attn
