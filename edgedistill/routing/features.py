"""Cheap prompt features for the difficulty classifier: a regex pass over the text, well under a millisecond.

The list of names is saved in router.json; a policy whose names differ from this
module's is refused on load instead of silently mis-reading its weights.
"""
from __future__ import annotations

import math
import re

import numpy as np

_WORDS = {
    "ops": {"plus", "minus", "times", "each", "total", "sum", "more", "fewer", "less", "left", "remain", "remains",
            "gives", "buys", "sells", "per", "twice", "half", "product", "difference", "divided", "average",
            "spends", "earns", "loses", "adds", "removes", "shares", "equally", "altogether", "multiplied"},
    "units": {"second", "seconds", "minute", "minutes", "hour", "hours", "day", "days", "week", "weeks", "km", "m",
              "cm", "mm", "meters", "metres", "kilometers", "grams", "kg", "g", "liters", "litres", "ml", "convert",
              "am", "pm", "o'clock", "clock", "later", "earlier", "after", "before", "starts", "ends"},
    "lists": {"list", "sort", "sorted", "largest", "smallest", "count", "reverse", "order", "ascending",
              "descending", "median", "maximum", "minimum", "position", "appear", "appears", "distinct", "unique"},
    "logic": {"if", "then", "true", "false", "not", "all", "some", "none", "taller", "shorter", "older", "younger",
              "faster", "slower", "who", "which", "either", "neither", "both", "implies"},
}
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z']+")

FEATURE_NAMES = ["log_chars", "log_words", "numbers", "max_digits", "digits", "ops", "units", "lists", "logic",
                 "sentences", "commas", "number_density"]


def prompt_features(text: str) -> np.ndarray:
    lower = text.lower()
    numbers = _NUMBER.findall(lower)
    words = _WORD.findall(lower)
    counts = {k: 0 for k in _WORDS}
    for w in words:
        for k, vocab in _WORDS.items():
            if w in vocab:
                counts[k] += 1
    digits = sum(len(n.replace(".", "")) for n in numbers)
    return np.array([
        math.log1p(len(text)), math.log1p(len(words)), len(numbers), max((len(n) for n in numbers), default=0), digits,
        counts["ops"], counts["units"], counts["lists"], counts["logic"],
        lower.count(".") + lower.count("?") + lower.count("!"), lower.count(","),
        len(numbers) / max(1, len(words)),
    ], dtype=np.float64)
