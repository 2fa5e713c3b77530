"""Turning documents into fixed-length token windows (packed, deterministic)."""
from __future__ import annotations

import random

from ..errors import DataError


def token_stream(tokenizer, docs: list[str], max_tokens: int | None = None) -> list[int]:
    """Concatenate tokenised documents, separated by EOS (or BOS when there is no EOS)."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def windows(stream: list[int], seq_len: int, n: int | None = None, *, what: str = "text") -> list[list[int]]:
    """Non-overlapping windows of `seq_len` tokens, in order; at most `n`."""
    count = len(stream) // seq_len
    if count == 0:
        raise DataError(f"{what}: {len(stream)} tokens is shorter than one window of {seq_len}; add text or lower seq_len.")
    if n is not None:
        count = min(count, n)
    return [stream[i * seq_len:(i + 1) * seq_len] for i in range(count)]


class WindowSampler:
    """Random batches of windows, reshuffled each epoch, reproducible from a seed."""

    def __init__(self, stream: list[int], seq_len: int, batch_size: int, seed: int = 0):
        self.windows = windows(stream, seq_len, what="training data")
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next_batch(self) -> list[list[int]]:
        batch = []
        while len(batch) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.windows)))
                self.rng.shuffle(self.order)
            batch.append(self.windows[self.order.pop()])
        return batch
