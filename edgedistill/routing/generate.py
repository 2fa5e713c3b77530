"""Answer suite problems with an exported GGUF through llama.cpp, greedy.

`answer_many` / `answer_groups` go through the serving engine (`edgedistill.serve.engine.BatchEngine`, continuous
batching: many sequences per decode, a freed slot's KV cache reused for the shared chat-template
prefix), i.e. the code path and the log-probs `edgedistill serve` has, so the confidence map is
calibrated on what serving will see. `answer` is the one-sequence reference (LlamaCppModel).
In "on" mode the thinking is cut at `think_budget` tokens Qwen3-style: the stop-thinking text
below and `</think>` are inserted and the model answers.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

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


def answer_many(engine, tokenizer, problems: Sequence[Problem], mode: Mode, *, think_budget: int, answer_tokens: int,
                on_done: Callable[[], None] = lambda: None) -> list[Answer]:
    """Greedy answers to all `problems` in one mode, batched by `engine` (a `BatchEngine`), in input order."""
    return answer_groups(engine, tokenizer, [(problems, mode)], think_budget=think_budget,
                         answer_tokens=answer_tokens, on_done=on_done)[0]


def answer_groups(engine, tokenizer, groups: Sequence[tuple[Sequence[Problem], Mode]], *, think_budget: int,
                  answer_tokens: int, on_done: Callable[[], None] = lambda: None) -> list[list[Answer]]:
    """Greedy answers to several (problems, mode) groups at once, batched by `engine`; one list per group,
    in input order.

    All groups share the engine's queue, thinking groups first: long sequences start early and the short
    direct answers fill the slots they free, so the batch stays full instead of draining after each group.
    A thinking sequence may write `think_budget` thinking tokens (then the engine inserts the stop-thinking
    sentence); it samples at most `think_budget + answer_tokens` tokens in all. `Answer.tokens` counts
    sampled tokens only (the inserted sentence is not generated); `seconds` runs from the sequence getting a
    slot to its end, so it is the latency under batching, not alone.
    """
    from ..serve.events import Delta, Failed, Finished, SamplingParams

    # As a served request: one max_tokens, the inserted stop-thinking tokens counted in it (so at most
    # think_budget + answer_tokens tokens are sampled).
    inserted = len(engine.tokenize(STOP_THINKING, add_bos=False))

    def params(mode: Mode) -> SamplingParams:
        return SamplingParams(max_tokens=(think_budget + inserted if mode == "on" else 0) + answer_tokens,
                              temperature=0.0, logprobs=True, think_open=mode == "on",
                              think_budget=think_budget if mode == "on" else None)
    results: list[list[Answer | None]] = [[None] * len(problems) for problems, _ in groups]
    errors: list[str] = []
    done = threading.Condition()
    remaining = [sum(len(problems) for problems, _ in groups)]

    def collector(g: int, i: int, p: Problem, mode: Mode):
        parts: list[str] = []
        head = THINK_PREFIX if mode == "on" else NO_THINK_PREFIX

        def emit(ev) -> None:
            if isinstance(ev, Delta):
                parts.append(ev.text)
                return
            if isinstance(ev, Finished):
                text = head + "".join(parts)
                if mode == "on" and "</think>" not in text:
                    ok = False  # never closed its thinking (ended or ran out): no answer
                else:
                    ok = score(text, p.answer)
                results[g][i] = Answer(text, ok, len(ev.token_logprobs), ev.thinking_tokens, list(ev.token_logprobs),
                                       time.perf_counter(), ev.budget_hit)  # end time; made a duration below
            elif isinstance(ev, Failed):
                errors.append(f"problem {p.id}: {ev.message}")
            with done:
                remaining[0] -= 1
                done.notify_all()
            on_done()
        return emit

    jobs: dict[tuple[int, int], object] = {}
    for g in sorted(range(len(groups)), key=lambda g: groups[g][1] != "on"):  # thinking groups first
        problems, mode = groups[g]
        for i, p in enumerate(problems):
            prompt = engine.tokenize(render_prompt(tokenizer, p.question, mode), add_bos=False)
            jobs[g, i] = engine.submit(prompt, params(mode), collector(g, i, p, mode))
    with done:
        while remaining[0]:
            done.wait(timeout=1.0)
    if errors:
        from ..errors import RoutingError
        raise RoutingError(f"{len(errors)} suite generations failed, first: {errors[0]}")
    for (g, i), job in jobs.items():
        a = results[g][i]
        a.seconds = max(0.0, a.seconds - (job.admitted_at or a.seconds))
    return results  # type: ignore[return-value]
