"""The HTTP layer with a scripted backend (timing under the test's control): streaming, reasoning,
disconnects, 429, overlap, request ids, metrics, the body limit; the remote fallback backend; the
Gradio page through gradio_client. All over a real uvicorn server and the official `openai` client."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from edgedistill.errors import ServeError
from edgedistill.serve.app import create_app
from edgedistill.serve.backend import Prompt, generate
from edgedistill.serve.engine import ContextLengthExceeded, Job, QueueFull
from edgedistill.serve.events import Delta, Finished, SamplingParams
from live_server import serving


class ScriptBackend:
    """A fake model: replies with `reply` (a list of token texts; default: the user's words), one token per
    `delay` seconds on its own thread, at most `slots` at once (QueueFull beyond)."""

    def __init__(self, reply: list[str] | None = None, *, delay: float = 0.0, slots: int = 8, name: str = "echo"):
        self.reply, self.delay, self.slots, self.name = reply, delay, slots, name
        self.active = self.cancelled = 0
        self.seen: list[SamplingParams] = []
        self.lock = threading.Lock()

    def start(self, prompt, params, emit):
        self.seen.append(params)
        text = prompt.messages[-1]["content"] if prompt.messages else prompt.text
        if text == "too long":
            raise ContextLengthExceeded("the prompt is longer than the context window")
        with self.lock:
            if self.active >= self.slots:
                raise QueueFull("all 1 slots are busy")
            self.active += 1
        tokens = self.reply if self.reply is not None else [w + " " for w in text.split()]
        job = Job([], params, emit)

        def run():
            try:
                for t in tokens[:params.max_tokens]:
                    if job.cancelled:
                        self.cancelled += 1
                        return
                    emit(Delta(t, 1))
                    time.sleep(self.delay)
                n = min(len(tokens), params.max_tokens)
                emit(Finished("length" if len(tokens) > params.max_tokens else "stop", 3, n))
            finally:
                with self.lock:
                    self.active -= 1
        threading.Thread(target=run, daemon=True).start()
        return job

    def load(self):
        return {"queue_depth": 0, "active": self.active, "slots": self.slots}

    def close(self):
        pass


HI = [{"role": "user", "content": "hi there"}]


def test_api_key_is_required_when_set(tmp_path):
    http = TestClient(create_app(tmp_path, api_key="s3cret", backend=ScriptBackend()))
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    assert http.get("/health").status_code == 200  # liveness probes need no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = http.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi "


def test_max_tokens_defaults_to_cap_and_stop_string_becomes_list(tmp_path):
    backend = ScriptBackend()
    http = TestClient(create_app(tmp_path, max_tokens_cap=7, backend=backend))
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stop": "END"})
    assert r.status_code == 200
    p = backend.seen[-1]
    assert (p.max_tokens, p.temperature, p.top_p, p.stop) == (7, 1.0, 1.0, ("END",))
    r = http.post("/v1/completions", json={"prompt": "x", "seed": 5})
    assert r.status_code == 200 and backend.seen[-1].max_tokens == 7 and backend.seen[-1].seed == 5
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "too long"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


THOUGHT = ["<thi", "nk>Two and", " two</th", "ink>\n\nIt is", " 4."]


def test_reasoning_is_a_separate_field(tmp_path):
    with serving(create_app(tmp_path, backend=ScriptBackend(THOUGHT))) as url:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        msg = oa.chat.completions.create(model="echo", messages=HI).choices[0].message
        assert msg.content == "It is 4."
        assert msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"] == "Two and two"
        content, reasoning = "", ""
        for chunk in oa.chat.completions.create(model="echo", messages=HI, stream=True):
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
                reasoning += (chunk.choices[0].delta.model_extra or {}).get("reasoning") or ""
        assert (content, reasoning) == ("It is 4.", "Two and two")


def test_client_disconnect_frees_the_slot(tmp_path):
    backend = ScriptBackend(["tok "] * 10_000, delay=0.01, slots=1)
    with serving(create_app(tmp_path, backend=backend, max_tokens_cap=10_000)) as url:
        body = {"messages": HI, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            while "tok" not in next(lines):
                pass
            assert backend.active == 1
        deadline = time.monotonic() + 10
        while backend.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.active == 0 and backend.cancelled == 1
        backend.reply = ["ok"]
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": HI}).json()["choices"][0]["message"][
            "content"] == "ok"


def test_client_hanging_up_on_a_non_streamed_request_frees_the_slot(tmp_path):
    """The client hangs up only once its generation is running (a client that leaves before the server has
    read its request never starts one: uvicorn reports the disconnect first, which is right, but is not what
    this test is about; a fixed client timeout raced with that on a loaded machine)."""
    import socket
    from urllib.parse import urlsplit

    backend = ScriptBackend(["tok "] * 10_000, delay=0.01, slots=1)
    with serving(create_app(tmp_path, backend=backend, max_tokens_cap=10_000)) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        body = json.dumps({"messages": HI}).encode()
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 30
            while not backend.active and time.monotonic() < deadline:
                time.sleep(0.01)
            assert backend.active == 1, "the generation never started"
        deadline = time.monotonic() + 10  # 10,000 tokens would take 100 s: only the hang-up ends it this soon
        while backend.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.active == 0 and backend.cancelled == 1


def test_full_queue_is_a_429_with_retry_after(tmp_path):
    backend = ScriptBackend(["tok "] * 10_000, delay=0.01, slots=1)
    with serving(create_app(tmp_path, backend=backend, max_tokens_cap=10_000)) as url:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": HI, "stream": True}, timeout=30) as r:
            lines = r.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)
            with pytest.raises(openai.RateLimitError) as e:
                oa.chat.completions.create(model="echo", messages=HI)
            assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
            assert e.value.response.json()["error"]["code"] == "rate_limit_exceeded"


def test_concurrent_streams_overlap_over_http(tmp_path):
    """Four streams at once all get tokens before any of them finishes: nothing serialises them."""
    backend = ScriptBackend(["tok "] * 30, delay=0.02, slots=4)
    with serving(create_app(tmp_path, backend=backend)) as url:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        first, last = [0.0] * 4, [0.0] * 4

        def run(i):
            for chunk in oa.chat.completions.create(model="echo", messages=HI, stream=True):
                if chunk.choices and chunk.choices[0].delta.content and not first[i]:
                    first[i] = time.monotonic()
            last[i] = time.monotonic()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(first) and max(first) < min(last)


def test_request_id_metrics_ready_and_body_limit(tmp_path):
    with serving(create_app(tmp_path, backend=ScriptBackend(), max_body_bytes=2000)) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HI}, headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        assert len(httpx.get(f"{url}/health").headers["x-request-id"]) == 32
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        list(oa.chat.completions.create(model="echo", messages=HI, stream=True))
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 5000}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert httpx.get(f"{url}/ready").json() == {"status": "ready", "model": "echo"}
        text = httpx.get(f"{url}/metrics").text
        for line in ('edgedistill_requests_total{route="/v1/chat/completions",status="200"} 2',
                     'edgedistill_requests_total{route="unmatched",status="413"} 1',
                     "edgedistill_completion_tokens_total 4", "edgedistill_prompt_tokens_total 6",
                     'edgedistill_time_to_first_token_seconds_count{route="/v1/chat/completions"} 2',
                     'edgedistill_request_duration_seconds_count{route="/ready"} 1',
                     "edgedistill_queue_depth 0", "edgedistill_active_streams 0"):
            assert line in text, line


# ---------------------------------------------------------------- the Gradio page
def test_gradio_page_answers_through_the_api(tmp_path):
    from gradio_client import Client

    from edgedistill.serve.demo import _text

    backend = ScriptBackend(THOUGHT)
    with serving(create_app(tmp_path, backend=backend, ui=True)) as url:
        client = Client(f"{url}/ui/", verbose=False)
        history, box, card = client.predict("what is 2+2?", [], 0.0, 32, "auto", 0, api_name="/chat")
        assert box == ""
        roles = [(m["role"], (m.get("metadata") or {}).get("title")) for m in history]
        assert roles == [("user", None), ("assistant", "Thinking"), ("assistant", None), ("assistant", "Route")]
        text = [_text(m["content"]) for m in history]
        assert text[1] == "Two and two" and text[2] == "It is 4."
        assert "echo" in text[3] and "3 in / 5 out" in text[3] and "**think** off (auto)" in text[3]
        assert "**escalated** no" in text[3] and "**confidence** n/a" in text[3] and card == text[3]
        assert backend.seen[-1].max_tokens == 32 and backend.seen[-1].temperature == 0.0
        # Thinking off from the page is strict: no thought bubble; a budget with "on" reaches the backend.
        off, _, card = client.predict("what is 2+2?", [], 0.0, 32, "off", 0, api_name="/chat")
        assert [(m.get("metadata") or {}).get("title") for m in off] == [None, None, "Route"]
        assert "**think** off (off)" in card
        client.predict("what is 2+2?", [], 0.0, 32, "on", 64, api_name="/chat")
        assert backend.seen[-1].think_budget == 64
    with serving(create_app(tmp_path, backend=ScriptBackend(), ui=True)) as url:  # a second turn sees the first
        history, _, _ = Client(f"{url}/ui/", verbose=False).predict("and 3+3?", history, 0.0, 32, "auto", 0,
                                                                    api_name="/chat")
    assert _text(history[-2]["content"]) == "and 3+3? "


# ---------------------------------------------------------------- a remote OpenAI-compatible model as fallback
def test_remote_llm_is_served_as_a_second_model(tmp_path):
    """`llm=URL` lists the remote model next to ours and forwards to it, streaming, reasoning included."""
    with serving(create_app(tmp_path / "r", backend=ScriptBackend(THOUGHT, name="big-llm"), api_key="k2")) as remote:
        app = create_app(tmp_path, backend=ScriptBackend(), llm=f"{remote}/v1", llm_api_key="k2")
        with serving(app) as url:
            oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            assert [m.id for m in oa.models.list().data] == ["echo", "big-llm"]
            r = oa.chat.completions.create(model="big-llm", messages=HI, max_tokens=9)
            assert (r.model, r.choices[0].message.content) == ("big-llm", "It is 4.")
            assert r.choices[0].message.model_extra["reasoning"] == "Two and two"
            assert r.usage.completion_tokens == 5
            streamed = oa.chat.completions.create(model="big-llm", messages=HI, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "It is 4."
            assert oa.completions.create(model="big-llm", prompt="x").choices[0].text == "<think>Two and two</think>\n\nIt is 4."
            assert oa.chat.completions.create(model="echo", messages=HI).choices[0].message.content == "hi there "


def test_remote_llm_retries_before_the_first_token_and_reports_failure(tmp_path):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from edgedistill.serve.remote import RemoteBackend

    calls = []
    fake = FastAPI()
    fake.get("/health")(lambda: {"status": "ok"})

    @fake.post("/v1/chat/completions")
    def chat():
        calls.append(1)
        if len(calls) % 2:  # every other call is refused
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        chunks = [{"choices": [{"index": 0, "delta": {"content": "pong"}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}]
        return StreamingResponse(iter([f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]))

    with serving(fake) as url:
        remote = RemoteBackend(f"{url}/v1", model="m", retries=1, backoff_s=0.01)
        text, fin = generate(remote, Prompt(messages=tuple(HI)), SamplingParams(max_tokens=4))
        assert (text, fin.completion_tokens, len(calls)) == ("pong", 1, 2)
        remote.retries = 0
        with pytest.raises(ServeError, match="HTTP 503: overloaded"):
            generate(remote, Prompt(messages=tuple(HI)), SamplingParams(max_tokens=4))
    unreachable = RemoteBackend("http://127.0.0.1:9/v1", model="m", retries=1, backoff_s=0.01, timeout=2)
    with pytest.raises(ServeError, match="unreachable"):
        generate(unreachable, Prompt(messages=tuple(HI)), SamplingParams(max_tokens=4))


def test_cancelling_a_consumer_as_an_event_arrives_still_frees_the_slot():
    """The race behind a client whose slot stayed busy after it hung up: the consumer is cancelled in the same
    loop turn as the backend's next event is handed over. (Python 3.11's asyncio.wait_for returned the event
    and swallowed the cancellation there; the generation then ran to its end.)"""
    import asyncio

    from edgedistill.serve.service import Generation

    class Handle:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    class Silent:  # the test feeds the queue itself, at the moment it chooses
        name = "silent"

        def __init__(self):
            self.handle = Handle()

        def start(self, prompt, params, emit):
            return self.handle

    async def scenario(settle_turns: int) -> tuple[bool, bool]:
        backend = Silent()
        gen = Generation(backend, Prompt(text="x"), SamplingParams(max_tokens=8), stall_timeout_s=30)

        async def consume():
            async for _ in gen.events():
                pass
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.01)  # the consumer is waiting for an event
        gen.queue.put_nowait((time.perf_counter(), Delta("tok", 1)))
        for _ in range(settle_turns):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:
            task.cancel()  # leave no task behind for the next scenario
            await asyncio.wait({task})
        return bool(done), backend.handle.cancelled

    for turns in range(4):  # the hand-over takes a turn or two: cancel at each point of it
        done, freed = asyncio.run(scenario(turns))
        assert done and freed, f"cancelled {turns} loop turn(s) after the event arrived: the consumer kept running"
