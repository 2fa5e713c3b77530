"""Token ids → `Delta` events for backends that sample token by token themselves (onnxruntime, torch).

Text is decoded incrementally; a tail that could still grow into a stop string, or an unfinished
UTF-8 character, is held back until it is decided, so a stop string never reaches the client.
"""
from __future__ import annotations

from typing import Callable

from .events import Delta, Event


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
    string ended the text (the stop string itself is not sent); `flush` sends what was held back."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...], emit: Callable[[Event], None]):
        self.decode, self.stops, self.emit = decode, stops, emit
        self.tokens: list[int] = []
        self.sent = 0

    def push(self, tok: int) -> bool:
        self.tokens.append(tok)
        text = self.decode(self.tokens)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
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
        text = self.decode(self.tokens)
        if len(text) > self.sent:
            self.emit(Delta(text[self.sent:], 0))
            self.sent = len(text)
