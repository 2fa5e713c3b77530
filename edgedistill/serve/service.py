"""What the server agrees to do with a request, and how backend events become OpenAI objects.

`ChatService` checks the model id and the max_tokens cap, starts a generation on the backend,
and turns its events into a completion object or a stream of server-sent events. Chat requests go
through the routing policy (think or not, escalate or not: route.py). It also keeps the token /
latency metrics, since only it sees the first token.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any, AsyncIterator

from ..errors import ServeError
from .backend import Backend, ContextLengthExceeded, Prompt, QueueFull
from .events import Delta, Event, Failed, Finished, SamplingParams
from .metrics import Metrics
from .route import ChatRun, Router, plan_chat
from .schemas import (ChatCompletion, ChatCompletionRequest, Completion, CompletionChoice, CompletionRequest,
                      ErrorBody, ErrorResponse, ModelCard, ModelList, SamplingRequest, Usage)

DEFAULT_TEMPERATURE = 1.0  # OpenAI's defaults, so clients that omit them get what they expect
DEFAULT_TOP_P = 1.0
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
RETRY_AFTER_S = 1


class ApiError(Exception):
    """A request the server answers with an OpenAI error object instead of a completion."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))


class Generation:
    """One backend generation seen from the event loop: an async iterator of events; closing it cancels.
    Past `timeout_s` it ends with a Failed event (504) and the backend is told to stop."""

    def __init__(self, backend: Backend, prompt: Prompt, params: SamplingParams, *, timeout_s: float | None = None,
                 stall_timeout_s: float | None = None):
        self.model = backend.name
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s  # a backend silent this long has failed (a bug, not a slow model)
        self.queue: asyncio.Queue[tuple[float, Event]] = asyncio.Queue()  # (when the backend sent it, event)
        loop = asyncio.get_running_loop()
        self.started = time.perf_counter()
        self.first_token_at: float | None = None

        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (time.perf_counter(), ev))
            except RuntimeError:  # the loop is gone (server shutting down): stop generating
                handle.cancel()

        try:
            handle = backend.start(prompt, params, emit)
        except QueueFull as e:
            raise ApiError(429, f"the server is at capacity ({e}); retry shortly", code="rate_limit_exceeded",
                           type="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ContextLengthExceeded as e:
            raise ApiError(400, str(e), param="messages" if prompt.messages else "prompt",
                           code="context_length_exceeded") from None
        except ServeError as e:
            raise ApiError(400, str(e)) from None
        self.handle = handle

    async def events(self) -> AsyncIterator[Event]:
        """Deltas that queued up while the consumer was busy are merged, so a slow client costs one write
        per wake-up rather than one per token. Events the backend sent after the deadline count as late
        even when the loop reads them before its timer fires."""
        deadline = None if self.timeout_s is None else self.started + self.timeout_s
        late = Failed(f"{self.model} gave no complete answer within {self.timeout_s or 0:g} s", 504)
        try:
            while True:
                left = None if deadline is None else deadline - time.perf_counter()
                waits = [w for w in (left, self.stall_timeout_s) if w is not None]
                try:
                    if left is not None and left <= 0:
                        raise asyncio.TimeoutError
                    # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns the item when the queue hands
                    # one over just as the task is cancelled, swallowing the cancellation, so a client that hung up
                    # kept its slot busy until the whole generation ended.
                    async with asyncio.timeout(min(waits) if waits else None):
                        at, ev = await self.queue.get()
                except TimeoutError:
                    if deadline is None or time.perf_counter() < deadline:  # silence, not the deadline
                        yield Failed(f"the model '{self.model}' sent nothing within {self.stall_timeout_s:g} s; "
                                     "the generation was abandoned", 504)
                    else:
                        yield late
                    return
                while isinstance(ev, Delta) and not self.queue.empty():
                    at, nxt = self.queue.get_nowait()
                    if not isinstance(nxt, Delta):
                        yield self._seen(ev)
                        ev = nxt
                        break
                    ev = Delta(ev.text + nxt.text, ev.tokens + nxt.tokens)
                if deadline is not None and at > deadline:
                    yield late
                    return
                yield self._seen(ev)
                if not isinstance(ev, Delta):
                    return
        finally:
            self.handle.cancel()  # no-op when finished; frees the slot when the client went away

    def _seen(self, ev: Event) -> Event:
        if isinstance(ev, Delta) and ev.tokens and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        return ev


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class ChatService:
    """Serves `backend` (the default model) and optionally `fallback` (a larger model, listed second)."""

    def __init__(self, backend: Backend, *, max_tokens_cap: int, fallback: Backend | None = None,
                 policy: Any = None, small_timeout_s: float = 120.0, large_timeout_s: float = 120.0,
                 stall_timeout_s: float | None = 600.0):
        from ..routing.policy import RoutingPolicy

        if max_tokens_cap < 1:
            raise ServeError(f"max_tokens_cap must be at least 1, got {max_tokens_cap}.")
        if fallback is not None and fallback.name == backend.name:
            raise ServeError(f"the fallback model is also called '{backend.name}'; give it another name.")
        self.backend, self.fallback = backend, fallback
        self.backends = {b.name: b for b in (backend, fallback) if b is not None}
        self.max_tokens_cap = max_tokens_cap
        self.policy = policy if policy is not None else RoutingPolicy.default()
        self.small_timeout_s, self.large_timeout_s = small_timeout_s, large_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.router = Router(self)
        self.created = int(time.time())
        self.metrics = Metrics(queue_depth=lambda: backend.load().get("queue_depth", 0))

    @property
    def model_id(self) -> str:
        return self.backend.name

    def models(self) -> ModelList:
        return ModelList(data=[self.model(name) for name in self.backends])

    def model(self, model_id: str) -> ModelCard:
        self._backend_for(model_id)
        return ModelCard(id=model_id, created=self.created)

    # ------------------------------------------------------------ starting
    def start_chat(self, req: ChatCompletionRequest) -> ChatRun:
        return plan_chat(self, req)

    async def chat_completion(self, run: ChatRun) -> ChatCompletion:
        return await self.router.answer(run)

    def stream_chat(self, run: ChatRun, *, include_usage: bool) -> AsyncIterator[str]:
        return self.router.stream(run, include_usage=include_usage)

    def start_completion(self, req: CompletionRequest) -> Generation:
        backend = self._backend_for(req.model)
        params = self._params(req, default_max=min(DEFAULT_COMPLETION_TOKENS, self.max_tokens_cap))
        return Generation(backend, Prompt(text=req.text), params, stall_timeout_s=self.stall_timeout_s)

    def _params(self, req: SamplingRequest, *, default_max: int) -> SamplingParams:
        max_tokens = req.requested_max_tokens or default_max
        if max_tokens > self.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {max_tokens}, but this server allows at most "
                                f"{self.max_tokens_cap}", param="max_tokens", code="invalid_value")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p,
            # Unseeded requests draw a fresh seed, so one seeded request never makes later ones predictable.
            seed=random.getrandbits(32) if req.seed is None else req.seed & 0xFFFFFFFF,
            stop=tuple(req.stop or ()))

    def _backend_for(self, model_id: str | None) -> Backend:
        if model_id is None:
            return self.backend
        if model_id not in self.backends:
            served = ", ".join(f"'{n}'" for n in self.backends)
            raise ApiError(404, f"the model '{model_id}' does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        return self.backends[model_id]

    # ------------------------------------------------------------ finishing
    async def collect(self, gen: Generation, route: str) -> tuple[str, Finished]:
        parts: list[str] = []
        async for ev in gen.events():
            if isinstance(ev, Delta):
                parts.append(ev.text)
            elif isinstance(ev, Failed):
                raise ApiError(ev.status, ev.message, type="server_error")
            else:
                self._account(gen, ev, route)
                return "".join(parts), ev
        raise ApiError(500, "the generation ended without a result", type="server_error")

    async def completion(self, gen: Generation) -> Completion:
        text, fin = await self.collect(gen, "/v1/completions")
        return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=gen.model,
                          choices=[CompletionChoice(text=text, finish_reason=fin.finish_reason)], usage=_usage(fin))

    async def stream(self, gen: Generation, *, include_usage: bool) -> AsyncIterator[str]:
        """A text completion as server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": gen.model}

        def chunk(text: str = "", finish: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

        self.metrics.active_streams += 1
        try:
            async for ev in gen.events():
                if isinstance(ev, Delta):
                    if ev.text:
                        yield chunk(ev.text)
                elif isinstance(ev, Failed):
                    yield _sse(ErrorResponse(error=ErrorBody(message=ev.message, type="server_error")).model_dump())
                    break
                else:
                    self._account(gen, ev, "/v1/completions")
                    yield chunk(finish=ev.finish_reason)
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(ev).model_dump()})
            yield "data: [DONE]\n\n"
        finally:
            self.metrics.active_streams -= 1

    def _account(self, gen: Generation, fin: Finished, route: str) -> None:
        m = self.metrics
        m.prompt_tokens.inc(by=fin.prompt_tokens)
        m.completion_tokens.inc(by=fin.completion_tokens)
        if gen.first_token_at is not None:
            m.ttft.observe(gen.first_token_at - gen.started, route)


def _usage(fin: Finished) -> Usage:
    return Usage(prompt_tokens=fin.prompt_tokens, completion_tokens=fin.completion_tokens,
                 total_tokens=fin.prompt_tokens + fin.completion_tokens)
