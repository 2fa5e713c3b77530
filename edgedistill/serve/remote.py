"""A remote OpenAI-compatible endpoint (vLLM, llama-server, OpenAI...) behind the `Backend` interface.

This is how a larger "LLM" is reached for fallback: the server lists it as a second model and
forwards requests for it, streaming. Each request runs on its own thread; failures before the
first token (connection errors, 429, 5xx) are retried with backoff, failures after it are not
(the client already has part of the answer), and a stream that ends without its final chunk is reported
as cut (a Failed event), never passed off as a complete answer. Reasoning the remote sends in a `reasoning` /
`reasoning_content` field is re-wrapped in <think> tags, so the service splits it like ours.

`timeout` bounds the wait for the first token, retries included, and any silence between two chunks.
Every way a request can go wrong ends in exactly one `Failed` event: a stream that stops before the
remote said it was finished (no finish_reason, no `[DONE]`) is a failure, never a short answer.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Callable

import httpx

from ..errors import ServeError
from .backend import Prompt
from .engine import QueueFull
from .events import Delta, Event, Failed, Finished, SamplingParams

RETRYABLE = {408, 429, 500, 502, 503, 504}


class _RemoteJob:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class RemoteBackend:
    prefills = False  # the assistant-prefix (think mode) cannot be sent; its own template decides
    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, retries: int = 2, backoff_s: float = 0.5, max_concurrent: int = 16,
                 name: str | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ServeError(f"--llm {base_url!r} is not an http(s) URL; pass the endpoint's base URL, "
                             "e.g. http://127.0.0.1:8080/v1")
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), headers=headers)
        self.model = model or self._first_model()
        self.name = name or self.model
        self.retries, self.backoff_s, self.max_concurrent, self.timeout = retries, backoff_s, max_concurrent, timeout
        self._active = 0
        self._lock = threading.Lock()

    def _first_model(self) -> str:
        try:
            r = self._http.get(f"{self.base_url}/models")
            r.raise_for_status()
            return r.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise ServeError(f"could not list the models at {self.base_url}/models ({e}); check the URL and key, "
                             "or name the model with --llm-model (then the server starts even while that endpoint "
                             "is down, and routed requests fall back to the small model until it is back).") from None

    def start(self, prompt: Prompt, params: SamplingParams, emit: Callable[[Event], None]) -> _RemoteJob:
        with self._lock:
            if self._active >= self.max_concurrent:
                raise QueueFull(f"{self._active} requests are already in flight to {self.base_url}")
            self._active += 1
        job = _RemoteJob()
        threading.Thread(target=self._run, args=(job, prompt, params, emit), daemon=True).start()
        return job

    def _run(self, job: _RemoteJob, prompt: Prompt, params: SamplingParams, emit: Callable[[Event], None]) -> None:
        chat = prompt.messages is not None
        body = {"model": self.model, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "seed": params.seed, "stream": True, "stream_options": {"include_usage": True},
                **({"stop": list(params.stop)} if params.stop else {}),
                **({"messages": [dict(m) for m in prompt.messages]} if chat else {"prompt": prompt.text})}
        url = f"{self.base_url}/{'chat/completions' if chat else 'completions'}"
        deadline = time.monotonic() + self.timeout
        sent = [0]  # pieces already emitted: after the first one, nothing is retried

        def counted(ev: Event) -> None:
            sent[0] += isinstance(ev, Delta)
            emit(ev)
        try:
            for attempt in range(self.retries + 1):
                left = deadline - time.monotonic()
                try:
                    outcome = self._stream(job, url, body, chat, counted, max(left, 0.01))
                except httpx.TimeoutException:
                    outcome = f"!the remote model at {self.base_url} did not answer within {self.timeout:g} s"
                except httpx.TransportError as e:
                    outcome = f"the remote model at {self.base_url} is unreachable ({type(e).__name__})"
                    if sent[0]:  # part of the answer is out: retrying would repeat it
                        outcome = f"!the stream from the remote model at {self.base_url} was cut mid-answer " \
                                  f"({type(e).__name__})"
                except ValueError as e:  # a chunk that is not JSON
                    outcome = f"!the remote model at {self.base_url} sent a malformed stream ({e})"
                if outcome is None:
                    return
                pause = self.backoff_s * 2 ** attempt
                if attempt == self.retries or outcome.startswith("!") or time.monotonic() + pause >= deadline:
                    emit(Failed(outcome.lstrip("!"), 502))
                    return
                time.sleep(pause)
        except Exception as e:  # never die silently: the client would wait forever
            emit(Failed(f"the remote model request failed: {type(e).__name__}: {e}", 502))
        finally:
            with self._lock:
                self._active -= 1

    def _stream(self, job: _RemoteJob, url: str, body: dict, chat: bool, emit: Callable[[Event], None],
                first_token_s: float) -> str | None:
        """None when done (or cancelled); an error message to retry; one starting with '!' not to retry."""
        timeout = httpx.Timeout(min(self.timeout, first_token_s), connect=min(first_token_s, 10.0))
        with self._http.stream("POST", url, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                try:
                    detail = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    detail = r.text[:200]
                msg = f"the remote model answered HTTP {r.status_code}: {detail}"
                return msg if r.status_code in RETRYABLE else "!" + msg
            finish, usage, pieces, thinking, thought, complete = "stop", None, 0, False, 0, False
            for line in r.iter_lines():
                if job.cancelled:
                    return None  # leaving the block closes the connection, which stops the remote generating
                if line.strip() == "data: [DONE]":
                    complete = True
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if not isinstance(chunk, dict):
                    raise ValueError(f"a chunk is {type(chunk).__name__}, not an object")
                if "error" in chunk:
                    detail = chunk["error"].get("message") if isinstance(chunk["error"], dict) else chunk["error"]
                    return f"!the remote model failed mid-answer: {detail}"
                usage = chunk.get("usage") or usage
                for c in chunk.get("choices") or []:
                    d = c.get("delta") or {}
                    reasoning = d.get("reasoning") or d.get("reasoning_content") or ""
                    text = (d.get("content") or "") if chat else (c.get("text") or "")
                    out = ""
                    if reasoning:
                        out += ("" if thinking else "<think>") + reasoning
                        thinking = True
                        thought += 1
                    if text:
                        out += ("</think>" if thinking else "") + text
                        thinking = False
                    if out:
                        pieces += 1
                        emit(Delta(out, 1))  # `emit` counts what went out (see _run)
                    finish = "length" if c.get("finish_reason") == "length" else finish
                    complete = complete or bool(c.get("finish_reason"))
            if not complete:
                msg = (f"the stream from the remote model at {self.base_url} was cut before its end (no finish_reason, "
                       f"no [DONE]) after {pieces} pieces")
                return "!" + msg if pieces else msg  # nothing went out yet: a retry repeats nothing
            if thinking:
                emit(Delta("</think>", 0))
            usage = usage or {}
            emit(Finished(finish, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", pieces)),
                          thinking_tokens=thought))
            return None

    def load(self) -> dict[str, int]:
        return {"queue_depth": 0, "active": self._active, "slots": self.max_concurrent}

    def close(self) -> None:
        self._http.close()
