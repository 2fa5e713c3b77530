"""Answer suite problems with an exported GGUF through llama.cpp: greedy, one sequence at a time, prefix reused.

This is the runtime `edgedistill serve` uses, so the log-probs the confidence map is
calibrated on are the ones it will see when serving. In "on" mode the thinking is cut
at `think_budget` tokens Qwen3-style: the stop-thinking text below and `</think>` are
inserted and the model answers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..data.tasks import NO_THINK_PREFIX, THINK_PREFIX, Mode, Problem, render_prompt, score

STOP_THINKING = "\n\nI have to give the answer now.\n</think>\n\n"


@dataclass
class Answer:
    text: str                 # the assistant's text, mode prefix included
    correct: bool
    tokens: int               # generated tokens (thinking + answer; the mode prefix is not generated)
    think_tokens: int
    logprobs: list[float] = field(default_factory=list)  # of every generated token
    seconds: float = 0.0
    budget_hit: bool = False


def answer(model, tokenizer, problem: Problem, mode: Mode, *, think_budget: int, answer_tokens: int) -> Answer:
    """`model`: an `edgedistill.export.llamacpp.LlamaCppModel`."""
    t0 = time.perf_counter()
    prompt_text = render_prompt(tokenizer, problem.question, mode)
    stops = {i for i in (tokenizer.eos_token_id, model.eos_id) if i is not None and i >= 0}
    prompt = model.tokenize(prompt_text)
    think: list[int] = []
    lps: list[float] = []
    budget_hit = False
    if mode == "on":
        think, lps, why = model.generate_greedy(prompt, think_budget, stops, stop_text="</think>")
        if why == "stop":  # ended without closing its thinking: no answer
            text = model.detokenize(think)
            return Answer(THINK_PREFIX + text, False, len(think), len(think), lps, time.perf_counter() - t0)
        prompt = prompt + think
        if why == "length":
            budget_hit = True
            prompt = prompt + model.tokenize(STOP_THINKING)
    out, out_lps, _ = model.generate_greedy(prompt, answer_tokens, stops)
    head = THINK_PREFIX if mode == "on" else NO_THINK_PREFIX
    text = head + model.detokenize(think) + (STOP_THINKING if budget_hit else "") + model.detokenize(out)
    return Answer(text, score(text, problem.answer), len(think) + len(out), len(think), lps + out_lps,
                  time.perf_counter() - t0, budget_hit)
