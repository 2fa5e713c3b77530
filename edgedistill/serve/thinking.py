"""Thinking switches: every dialect clients send, normalised to one request-level setting.

Accepted (chat completions only):

| field                                      | values                            | means                          |
|--------------------------------------------|-----------------------------------|--------------------------------|
| `reasoning_effort` (OpenAI)                | none / minimal / low / medium / high | off / on with budget 64, 256, 1024, 4096 |
| `chat_template_kwargs.enable_thinking` (vLLM, Qwen3) | true / false            | on / off                       |
| `think` (Ollama)                           | true / false / low / medium / high | on / off / on with that budget |
| `thinking` (Anthropic)                     | {type: enabled / disabled / auto, budget_tokens: N} | on / off / policy decides; N caps thinking |
| `/think`, `/no_think` in a user or system message (Qwen3) | —                  | on / off; the tag is removed from the prompt |

Precedence: the request fields are hard switches and must agree with each other (on vs off, or two
different effort levels, is a 400 naming both fields); an explicit `budget_tokens` sets the budget
over a level's. The in-message tags are soft switches (Qwen3's rule): they decide only when no request
field does, and the latest tag wins. With no switch at all the mode is "auto": the routing policy
decides per prompt.

Modes reach the model as the start of its answer (Qwen3-style): "on" opens `<think>\\n`, "off" writes
an empty `<think>\\n\\n</think>\\n\\n` block. An explicit "off" is strict: think text the model writes
anyway is dropped, never shown in `content` nor `reasoning`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from ..data.tasks import NO_THINK_PREFIX, THINK_PREFIX
# Written into the model's thoughts when its budget is spent, so it moves on to the answer (as Qwen3's servers
# do): the very text the build's routing stage inserts when it calibrates, so served and measured runs agree.
from ..routing.generate import STOP_THINKING  # noqa: F401  (re-exported)

Mode = Literal["on", "off", "auto"]
OPEN, CLOSE = "<think>", "</think>"
PREFILL = {"on": THINK_PREFIX, "off": NO_THINK_PREFIX}

EFFORT_BUDGETS: dict[str, int | None] = {"minimal": 64, "low": 256, "medium": 1024, "high": 4096}
TAG = re.compile(r"(?<!\S)/(no_think|think)(?!\S)")


@dataclass(frozen=True)
class ThinkSetting:
    """What the request asked for: a mode, a budget of thinking tokens (None: unlimited), and which field said so."""
    mode: Mode
    budget: int | None = None
    source: str = "default"

    @property
    def explicit(self) -> bool:
        return self.mode != "auto"


class SwitchConflict(ValueError):
    """Two thinking switches in one request disagree; `param` names the first of them."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _from_fields(req: Any) -> list[tuple[str, Mode, int | None, bool]]:
    """(field, mode, budget, budget given explicitly) for every thinking field the request set."""
    out: list[tuple[str, Mode, int | None, bool]] = []
    effort = getattr(req, "reasoning_effort", None)
    if effort is not None:
        out.append(("reasoning_effort", "off", None, False) if effort == "none"
                   else ("reasoning_effort", "on", EFFORT_BUDGETS[effort], False))
    kwargs = getattr(req, "chat_template_kwargs", None)
    enable = getattr(kwargs, "enable_thinking", None) if kwargs is not None else None
    if enable is not None:
        out.append(("chat_template_kwargs.enable_thinking", "on" if enable else "off", None, False))
    think = getattr(req, "think", None)
    if isinstance(think, bool):
        out.append(("think", "on" if think else "off", None, False))
    elif think is not None:
        out.append(("think", "on", EFFORT_BUDGETS[think], False))
    thinking = getattr(req, "thinking", None)
    if thinking is not None:
        mode: Mode = {"enabled": "on", "disabled": "off", "auto": "auto"}[thinking.type]
        out.append(("thinking", mode, thinking.budget_tokens, thinking.budget_tokens is not None))
    return out


def _from_tags(messages: Sequence[Mapping[str, str]]) -> tuple[Mode | None, list[dict[str, str]]]:
    """The latest /think or /no_think in a user or system message, and the messages with every tag removed."""
    mode: Mode | None = None
    cleaned = []
    for m in messages:
        m = dict(m)
        if m["role"] in ("user", "system"):
            tags = TAG.findall(m["content"])
            if tags:
                mode = "off" if tags[-1] == "no_think" else "on"
                m["content"] = re.sub(r"[ \t]{2,}", " ", TAG.sub("", m["content"])).strip()
        cleaned.append(m)
    return mode, cleaned


def resolve(req: Any, messages: Sequence[Mapping[str, str]]) -> tuple[ThinkSetting, list[dict[str, str]]]:
    """The request's one thinking setting, and its messages with the in-message tags removed.

    Raises SwitchConflict when request fields contradict each other."""
    tag_mode, cleaned = _from_tags(messages)
    fields = _from_fields(req)
    order = [f for f, _, _, _ in fields]
    modes = {mode for _, mode, _, _ in fields if mode != "auto"}
    if len(modes) > 1:
        on = next(f for f, m, _, _ in fields if m == "on")
        off = next(f for f, m, _, _ in fields if m == "off")
        raise SwitchConflict(f"'{on}' turns thinking on but '{off}' turns it off; send one of them",
                             param=min(on, off, key=order.index))
    explicit = [(f, b) for f, _, b, given in fields if given]
    levels = {(f, b) for f, _, b, given in fields if not given and b is not None}
    if not explicit and len({b for _, b in levels}) > 1:
        (f1, b1), (f2, b2) = sorted(levels, key=lambda x: order.index(x[0]))[:2]
        raise SwitchConflict(f"'{f1}' asks for a thinking budget of {b1} tokens but '{f2}' for {b2}; "
                             "send one of them, or an explicit thinking.budget_tokens", param=f1)
    budget = explicit[0][1] if explicit else next((b for _, b in levels), None)
    if fields:
        mode = modes.pop() if modes else "auto"
        return ThinkSetting(mode, None if mode == "off" else budget, "+".join(f for f, _, _, _ in fields)), cleaned
    if tag_mode is not None:
        return ThinkSetting(tag_mode, None, "/think" if tag_mode == "on" else "/no_think"), cleaned
    return ThinkSetting("auto", None, "default"), cleaned


class ThinkSplitter:
    """Separates <think>…</think> text from the answer as it streams (tags may arrive split across deltas).

    Starts `inside` the think block when the prompt opened it. Stray tags are dropped: an opening tag
    inside the block (a remote model re-sending it) and a closing tag outside it."""

    def __init__(self, *, inside: bool = False) -> None:
        self.inside = inside
        self.buf = ""
        self.strip_leading = False  # the blank line models put after </think> is not part of the answer

    def feed(self, text: str) -> tuple[str, str]:
        """-> (reasoning, content) that is now certain."""
        self.buf += text
        out = {True: "", False: ""}
        while True:
            hits = [(i, tag) for tag in (OPEN, CLOSE) if (i := self.buf.find(tag)) >= 0]
            if not hits:
                break
            i, tag = min(hits)
            self._put(out, self.buf[:i])
            self.buf = self.buf[i + len(tag):]
            if (tag == OPEN) != self.inside:  # a real boundary; otherwise a stray tag, dropped
                self.inside = not self.inside
                self.strip_leading = not self.inside
        hold = max((k for tag in (OPEN, CLOSE) for k in range(min(len(tag) - 1, len(self.buf)), 0, -1)
                    if self.buf.endswith(tag[:k])), default=0)
        self._put(out, self.buf[:len(self.buf) - hold])
        self.buf = self.buf[len(self.buf) - hold:]
        return out[True], out[False]

    def flush(self) -> tuple[str, str]:
        out = {True: "", False: ""}
        self._put(out, self.buf)
        self.buf = ""
        return out[True], out[False]

    def _put(self, out: dict[bool, str], text: str) -> None:
        if not self.inside and self.strip_leading:
            text = text.lstrip()
            self.strip_leading = not text
        out[self.inside] += text


def split(text: str, *, inside: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a whole generation."""
    s = ThinkSplitter(inside=inside)
    r1, c1 = s.feed(text)
    r2, c2 = s.flush()
    return r1 + r2, c1 + c2


class ThinkTracker:
    """Where one generation stands with its <think> block, followed on its text as it grows (tags may span
    several tokens), for every backend that samples token by token (llama.cpp engine, onnxruntime, torch).

    A token counts as a thinking token when the block was open before or after it (so the tokens that write
    `<think>` and `</think>` count). Once `over_budget`, the backend feeds the stop-thinking tokens into the
    sequence and calls `closed_by_backend`."""

    def __init__(self, *, inside: bool = False, budget: int | None = None) -> None:
        self.inside, self.budget = inside, budget
        self.scan = 0  # where in the text to look for the next tag
        self.thinking_tokens = 0
        self.budget_hit = False

    def token(self, text: str) -> None:
        """Account for one generated token; `text` is the whole generated text so far, that token included."""
        was = self.inside
        while True:
            tag = CLOSE if self.inside else OPEN
            i = text.find(tag, self.scan)
            if i < 0:
                self.scan = max(self.scan, len(text) - len(tag) + 1)
                break
            self.inside, self.scan = not self.inside, i + len(tag)
        self.thinking_tokens += was or self.inside

    @property
    def over_budget(self) -> bool:
        return self.inside and self.budget is not None and self.thinking_tokens >= self.budget

    def closed_by_backend(self, text_len: int) -> None:
        """The backend wrote STOP_THINKING (which ends in `</think>`); the text is now `text_len` long."""
        self.inside, self.budget_hit, self.scan = False, True, text_len
