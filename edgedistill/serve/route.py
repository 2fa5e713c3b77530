"""A chat request through the routing policy: think or not, the small model first, the large one when unsure.

`plan_chat` resolves the thinking switches (serve/thinking.py), asks the policy when the request
left it open ("auto"), and starts the small model. `answer` and `stream` finish the request:

1. The small model answers; its confidence is the policy's calibrated P(correct) from the log-probs
   of the tokens it sampled (thinking included; inserted stop-thinking tokens excluded).
2. Below the policy's threshold (and with a large model configured: `--llm`) the request is escalated
   and the large model answers instead, with the same think mode and budget.
3. Failures: an error, a timeout (`small_timeout_s` / `large_timeout_s`) or a cut stream of the small
   model escalates; of the large model, returns the small model's answer, saying so. When both fail,
   the client gets an error (502 / an error event), never a half answer marked complete.

Streaming: without a large model the small model streams live. With one, the small model's answer
is held back until its confidence is known (content is never retracted); the stream sends `: keep-alive`
comments meanwhile, then either the held answer or the large model's, live. If the large model breaks
off after some of its content went out, the stream ends with an error event instead of a finish_reason.

Every response carries the explanation (`RouteExplanation`) as `edgedistill` in the body and as
`x-edgedistill-*` headers; a stream carries it on its last chunk (headers: only the think settings,
the rest is not known when they are sent).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from .backend import Backend, Prompt
from .events import Delta, Failed, Finished, SamplingParams
from .schemas import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, ErrorBody,
                      ErrorResponse, RouteExplanation, Usage)
from .thinking import PREFILL, SwitchConflict, ThinkSplitter, resolve

KEEPALIVE_S = 5.0
THINK_TOKENS_GUESS = 256  # tokens-saved estimate before any thinking request was seen and without a policy budget


@dataclass
class Leg:
    """One model's attempt at the answer."""
    backend: Backend
    think_open: bool
    text: str = ""
    fin: Finished | None = None
    error: str | None = None
    started: float = field(default_factory=time.perf_counter)
    ms: float | None = None
    content_sent: bool = False  # some of its content went out on a stream

    @property
    def ok(self) -> bool:
        return self.fin is not None

    def end(self) -> None:
        self.ms = round((time.perf_counter() - self.started) * 1000, 1)


@dataclass
class ChatRun:
    """One planned chat request: its prompt and settings, the explanation so far, the small model's leg."""
    req: ChatCompletionRequest
    prompt: Prompt
    params: SamplingParams
    strict_off: bool
    route: RouteExplanation
    small: Leg
    gen: Any  # service.Generation of the first leg
    routed: bool  # the default model was asked for, so the policy may escalate
    policy_s: float = 0.0


def plan_chat(service: Any, req: ChatCompletionRequest) -> ChatRun:
    """Resolve thinking, pick the first model and start it (429 / 400 surface here, before any streaming)."""
    from .service import ApiError, Generation

    backend = service._backend_for(req.model)
    messages = [m.as_template_message() for m in req.messages]
    try:
        setting, messages = resolve(req, messages)
    except SwitchConflict as e:
        raise ApiError(400, str(e), param=e.param, code="invalid_value") from None
    params = service._params(req, default_max=service.max_tokens_cap)
    routed = backend is service.backend
    t0 = time.perf_counter()
    policy = service.policy
    route = RouteExplanation(think_requested=setting.mode, think_source=setting.source, think_mode="off",
                             threshold=policy.escalation_threshold if routed else None)
    if setting.explicit:
        mode, budget, prefix = setting.mode, setting.budget, PREFILL[setting.mode]
        route.think_reason = f"asked for by {setting.source}"
    else:
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        decision = policy.decide_think(last_user)
        mode, route.p_hard, route.think_reason = decision.mode, round(decision.p_hard, 4), decision.reason
        budget = min((b for b in (decision.budget, setting.budget) if b is not None), default=None)
        # An uncalibrated policy (no router.json) knows nothing about this model: leave its template alone.
        prefix = PREFILL[mode] if policy.calibrated else ""
    route.think_mode = mode
    route.think_budget = budget if mode == "on" else None
    prompt = Prompt(messages=tuple(messages), prefix=prefix)
    params = dataclasses.replace(params, logprobs=True, think_open=prefix == PREFILL["on"],
                                 think_budget=route.think_budget)
    policy_s = time.perf_counter() - t0
    small = Leg(backend, think_open=params.think_open and getattr(backend, "prefills", False))
    # A timeout only where another model can take over; otherwise the client waits for the answer it asked for.
    gen = Generation(backend, prompt, params,
                     timeout_s=service.small_timeout_s if routed and service.fallback is not None else None,
                     stall_timeout_s=service.stall_timeout_s)
    service.metrics.think.inc(mode, "request" if setting.explicit else "policy")
    return ChatRun(req, prompt, params, strict_off=setting.mode == "off", route=route, small=small, gen=gen,
                   routed=routed, policy_s=policy_s)


class Router:
    """Finishes planned chat requests for a `ChatService` (its backends, policy, timeouts and metrics)."""

    def __init__(self, service: Any):
        self.service = service
        self.think_tokens_seen: list[int] = [0, 0]  # (sum, count) of thinking tokens on thinking requests

    @property
    def can_escalate(self) -> bool:
        return self.service.fallback is not None

    # ------------------------------------------------------------ legs
    async def _collect(self, leg: Leg, gen: Any) -> None:
        async for ev in gen.events():
            if isinstance(ev, Delta):
                leg.text += ev.text
            elif isinstance(ev, Failed):
                leg.error = ev.message
            else:
                leg.fin = ev
                self.service._account(gen, ev, "/v1/chat/completions")
        leg.end()

    def _start_large(self, run: ChatRun) -> tuple[Leg, Any]:
        from .service import ApiError, Generation

        backend = self.service.fallback
        prompt, params = run.prompt, run.params
        policy = self.service.policy
        mode = policy.escalate_think
        # A mode the policy chose (not the client) is the policy's to change for the large model: router.json
        # says which mode made the teacher more accurate on calibration.
        # A remote endpoint takes no assistant prefix (its own template decides), so there is nothing to set.
        if run.route.think_requested == "auto" and policy.calibrated and mode is not None and \
                getattr(backend, "prefills", False):
            prompt = dataclasses.replace(prompt, prefix=PREFILL[mode])
            params = dataclasses.replace(params, think_open=mode == "on",
                                         think_budget=policy.think.budget if mode == "on" else None)
            run.route.escalation_think_mode = mode
        leg = Leg(backend, think_open=params.think_open and getattr(backend, "prefills", False))
        try:
            return leg, Generation(backend, prompt, params, timeout_s=self.service.large_timeout_s,
                                   stall_timeout_s=self.service.stall_timeout_s)
        except ApiError as e:
            leg.error = e.body.error.message
            leg.end()
            return leg, None

    def _decide(self, run: ChatRun) -> bool:
        """After the small model: escalate or not (fills in the explanation)."""
        t0 = time.perf_counter()
        r, small, policy = run.route, run.small, self.service.policy
        escalate = False
        if not run.routed:
            r.reason = "the request named this model, so it was not routed"
        elif small.ok:
            lps = small.fin.token_logprobs
            if lps:
                r.confidence = round(policy.confidence(lps), 4)
            if r.confidence is None:
                r.reason = "this backend reports no log-probs, so no confidence: the small model's answer stands"
            elif policy.should_escalate(r.confidence):
                escalate = self.can_escalate
                r.reason = (f"confidence {r.confidence:.2f} < threshold {r.threshold:.2f}: " +
                            ("escalated to the large model" if escalate else "no large model configured (--llm)"))
            else:
                r.reason = f"confidence {r.confidence:.2f} >= threshold {r.threshold:.2f}: the small model's answer stands"
        else:
            escalate = self.can_escalate
            r.reason = f"the small model failed ({small.error})" + (": escalated" if escalate else "")
            if escalate:
                self.service.metrics.fallbacks.inc("small")
        if run.routed:
            self.service.metrics.routed.inc()
        if escalate:
            self.service.metrics.escalations.inc("low_confidence" if small.ok else "small_failed")
        run.policy_s += time.perf_counter() - t0
        return escalate

    def _finish(self, run: ChatRun, legs: list[Leg], answer: Leg) -> None:
        """Bookkeeping once the answer is known: the rest of the explanation and the metrics."""
        t0 = time.perf_counter()
        r, m = run.route, self.service.metrics
        fins = [leg.fin for leg in legs if leg.fin is not None]
        r.thinking_tokens = sum(f.thinking_tokens for f in fins)
        r.budget_hit = any(f.budget_hit for f in fins)
        r.escalated = len(legs) > 1
        r.answered_by = answer.backend.name if answer.ok else ""
        r.models = [leg.backend.name for leg in legs]
        r.latency_ms.small = run.small.ms
        r.latency_ms.large = legs[1].ms if len(legs) > 1 else None
        m.thinking_tokens.inc(by=r.thinking_tokens)
        m.budget_hits.inc(by=sum(f.budget_hit for f in fins))
        seen = self.think_tokens_seen
        if r.think_mode == "on" and fins:
            seen[0] += fins[0].thinking_tokens
            seen[1] += 1
        elif r.think_requested == "auto":
            guess = seen[0] / seen[1] if seen[1] else (self.service.policy.to_dict().get("think_budget")
                                                        or THINK_TOKENS_GUESS)
            m.tokens_saved.inc(by=guess)
        run.policy_s += time.perf_counter() - t0
        r.latency_ms.policy = round(run.policy_s * 1000, 3)
        m.policy_latency.observe(run.policy_s)

    def _split(self, run: ChatRun, leg: Leg) -> tuple[str | None, str]:
        s = ThinkSplitter(inside=leg.think_open)
        r1, c1 = s.feed(leg.text)
        r2, c2 = s.flush()
        reasoning = "" if run.strict_off else r1 + r2
        return reasoning or None, c1 + c2

    # ------------------------------------------------------------ one JSON answer
    async def answer(self, run: ChatRun) -> ChatCompletion:
        from .service import ApiError

        await self._collect(run.small, run.gen)
        legs, answer = [run.small], run.small
        if self._decide(run):
            large, gen = self._start_large(run)
            if gen is not None:
                await self._collect(large, gen)
            legs.append(large)
            if large.ok:
                answer = large
            elif run.small.ok:
                self.service.metrics.fallbacks.inc("large")
                run.route.reason += f"; the large model failed ({large.error}), so the small model's answer is returned"
            else:
                raise ApiError(502, f"both models failed: the small one ({run.small.error}), the large one "
                                    f"({large.error})", type="server_error", code="upstream_failed")
        if not answer.ok:
            raise ApiError(504 if "within" in (answer.error or "") else 500, answer.error or "no answer",
                           type="server_error")
        self._finish(run, legs, answer)
        reasoning, content = self._split(run, answer)
        fin = answer.fin
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=answer.backend.name,
            choices=[ChatChoice(message=AssistantMessage(content=content, reasoning=reasoning,
                                                         reasoning_content=reasoning),
                                finish_reason=fin.finish_reason)],
            usage=Usage(prompt_tokens=fin.prompt_tokens, completion_tokens=fin.completion_tokens,
                        total_tokens=fin.prompt_tokens + fin.completion_tokens),
            edgedistill=run.route)

    # ------------------------------------------------------------ a stream of server-sent events
    async def stream(self, run: ChatRun, *, include_usage: bool) -> AsyncIterator[str]:
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": run.small.backend.name}

        def chunk(delta: dict, finish: str | None = None, model: str | None = None) -> str:
            return _sse({**head, "model": model or head["model"],
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        def pieces(leg: Leg, splitter: ThinkSplitter, text: str, final: bool = False) -> str | None:
            reasoning, content = splitter.flush() if final else splitter.feed(text)
            delta: dict[str, str] = {}
            if reasoning and not run.strict_off:
                delta.update(reasoning=reasoning, reasoning_content=reasoning)
            if content:
                delta["content"] = content
                leg.content_sent = True
            return chunk(delta, model=leg.backend.name) if delta else None

        async def live(leg: Leg, gen: Any) -> AsyncIterator[str]:
            splitter = ThinkSplitter(inside=leg.think_open)
            async with contextlib.aclosing(gen.events()) as events:
                async for ev in events:
                    if isinstance(ev, Delta):
                        leg.text += ev.text
                        if out := pieces(leg, splitter, ev.text):
                            yield out
                    elif isinstance(ev, Failed):
                        leg.error = ev.message
                    else:
                        leg.fin = ev
                        self.service._account(gen, ev, "/v1/chat/completions")
                        if out := pieces(leg, splitter, "", final=True):
                            yield out
            leg.end()

        def replay(leg: Leg) -> list[str]:
            splitter = ThinkSplitter(inside=leg.think_open)
            return [out for out in (pieces(leg, splitter, leg.text), pieces(leg, splitter, "", final=True)) if out]

        self.service.metrics.active_streams += 1
        task = None
        try:
            yield chunk({"role": "assistant", "content": ""})
            legs, answer = [run.small], run.small
            if not (run.routed and self.can_escalate):
                async with contextlib.aclosing(live(run.small, run.gen)) as pieces_out:
                    async for out in pieces_out:
                        yield out
                self._decide(run)
            else:
                task = asyncio.ensure_future(self._collect(run.small, run.gen))
                while not task.done():
                    await asyncio.wait({task}, timeout=KEEPALIVE_S)
                    if not task.done():
                        yield ": keep-alive\n\n"
                if self._decide(run):
                    large, gen = self._start_large(run)
                    legs.append(large)
                    if gen is not None:
                        async with contextlib.aclosing(live(large, gen)) as pieces_out:
                            async for out in pieces_out:
                                yield out
                    if large.ok:
                        answer = large
                    elif run.small.ok and not large.content_sent:
                        self.service.metrics.fallbacks.inc("large")
                        run.route.reason += (f"; the large model failed ({large.error}), "
                                             "so the small model's answer is returned")
                    else:
                        answer = large
                if answer is run.small and run.small.ok:
                    for out in replay(run.small):
                        yield out
            if not answer.ok:
                if run.small.ok and answer is not run.small:
                    run.route.reason += f"; the large model broke off mid-answer ({answer.error})"
                self._finish(run, legs, answer)
                yield _sse({**ErrorResponse(error=ErrorBody(message=answer.error or "no answer",
                                                           type="server_error")).model_dump(),
                            "edgedistill": run.route.model_dump()})
            else:
                self._finish(run, legs, answer)
                fin = answer.fin
                usage = Usage(prompt_tokens=fin.prompt_tokens, completion_tokens=fin.completion_tokens,
                              total_tokens=fin.prompt_tokens + fin.completion_tokens)
                last = {"edgedistill": run.route.model_dump()}
                finish = {**head, "model": answer.backend.name,
                          "choices": [{"index": 0, "delta": {}, "finish_reason": fin.finish_reason}]}
                if include_usage:
                    yield _sse(finish)
                    yield _sse({**head, "model": answer.backend.name, "choices": [], "usage": usage.model_dump(),
                                **last})
                else:
                    yield _sse({**finish, **last})
            yield "data: [DONE]\n\n"
        finally:
            if task is not None and not task.done():
                task.cancel()
            self.service.metrics.active_streams -= 1


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def route_headers(route: RouteExplanation, *, final: bool = True) -> dict[str, str]:
    """The explanation as `x-edgedistill-*` headers (ASCII; the stream's first response knows only the think part)."""
    d = route.model_dump()
    keys = ["think_requested", "think_source", "think_mode", "think_budget"]
    if final:
        keys += ["think_reason", "p_hard", "thinking_tokens", "budget_hit", "confidence", "threshold", "escalated",
                 "escalation_think_mode", "reason", "answered_by", "models"]
    out = {}
    for k in keys:
        v = d[k]
        if v is None:
            continue
        v = ",".join(v) if isinstance(v, list) else (str(v).lower() if isinstance(v, bool) else str(v))
        out[f"x-edgedistill-{k.replace('_', '-')}"] = v.encode("ascii", "replace").decode()
    if final:
        for k, v in d["latency_ms"].items():
            if v is not None:
                out[f"x-edgedistill-latency-{k}-ms"] = str(v)
    return out
