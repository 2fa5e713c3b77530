"""Token ids → `Delta` events for backends that sample token by token themselves (onnxruntime, torch).

Text is decoded incrementally; a tail that could still grow into a stop string, or an unfinished
UTF-8 character, is held back until it is decided, so a stop string never reaches the client.
"""
from __future__ import annotations

from typing import Callable

from .backend import Prompt
from .engine import ContextLengthExceeded
from .events import Delta, Event


def render_ids(tok, prompt: Prompt, n_ctx: int) -> list[int]:
    """A prompt's token ids through a transformers tokenizer (chat template + any assistant prefix), refused
    with a 400-class error when it does not leave room in the `n_ctx`-token context."""
    if prompt.messages is not None:
        ids = tok.apply_chat_template([dict(m) for m in prompt.messages], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        ids += tok(prompt.prefix, add_special_tokens=False)["input_ids"] if prompt.prefix else []
    else:
        ids = list(tok(prompt.text or "", add_special_tokens=True)["input_ids"])
    if len(ids) >= n_ctx:
        raise ContextLengthExceeded(f"the prompt has {len(ids)} tokens; the context window is {n_ctx}. "
                                    "Shorten the messages.")
    return ids


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop sequence."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


class TextStream:
    """Feed it tokens with `push`; it emits the text that is safe to send. `push` returns True when a stop
    string ended the text (the stop string itself is not sent); `flush` sends what was held back. `insert`
    adds tokens the backend wrote itself (the stop-thinking sentence): sent at once, never searched for stops.
    `text` is everything decoded so far, held-back tail included."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...], emit: Callable[[Event], None]):
        self.decode, self.stops, self.emit = decode, stops, emit
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.scan = 0  # stop strings are looked for from here (after any inserted text)

    def push(self, tok: int) -> bool:
        self.tokens.append(tok)
        text = self.text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s, self.scan) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.emit(Delta(text[self.sent:cut] if cut > self.sent else "", 1))
            self.sent = cut
            return True
        ready = len(text) - held_back(text, self.stops)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            ready = min(ready, len(text) - 1)
        self.emit(Delta(text[self.sent:ready] if ready > self.sent else "", 1))
        self.sent = max(self.sent, ready)
        return False

    def flush(self) -> None:
        text = self.text = self.decode(self.tokens)
        if len(text) > self.sent:
            self.emit(Delta(text[self.sent:], 0))
            self.sent = len(text)

    def insert(self, tokens: list[int]) -> None:
        """Tokens written into the sequence by the backend: their text goes out now with whatever was held back
        (as the llama.cpp engine sends it), counted as `len(tokens)` completion tokens."""
        self.tokens.extend(tokens)
        text = self.text = self.decode(self.tokens)
        self.emit(Delta(text[self.sent:], len(tokens)))
        self.sent = self.scan = len(text)
