"""The OpenAI-compatible server: a real uvicorn server (in a thread) serving a GGUF written from the
tiny model, driven by the official `openai` client; plus GGUF lookup and auth checks."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from edgedistill.artifacts import MANIFEST, atomic_write_json, file_record
from edgedistill.errors import ServeError
from edgedistill.serve.app import create_app
from edgedistill.serve.backend import LlamaCppBackend, Prompt, generate, pick_gguf
from edgedistill.serve.engine import ContextLengthExceeded, Job, QueueFull
from edgedistill.serve.events import Delta, Finished, SamplingParams

MODEL_ID = "tiny-build"
MAX_TOKENS_CAP = 64
USER = [{"role": "user", "content": "def add(a, b):"}]


def write_manifest(out: Path, outputs: list[dict]) -> None:
    atomic_write_json(out / MANIFEST, {"stages": {"export": {"status": "done", "outputs": outputs}}})


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A build folder shaped like `edgedistill build` leaves it: export/*.gguf plus manifest.json."""
    from edgedistill.export.gguf import write_gguf

    out = tmp_path_factory.mktemp("builds") / MODEL_ID
    gguf = out / "export" / "student-f16.gguf"
    gguf.parent.mkdir(parents=True)
    write_gguf(tiny_model_dir, gguf, dtype="f16")
    write_manifest(out, [file_record(out, gguf)])
    return out


@pytest.fixture(scope="module")
def base_url(build_dir):
    with serving(create_app(build_dir, max_tokens_cap=MAX_TOKENS_CAP, slots=4, ctx_per_slot=256, n_threads=1)) as url:
        yield url


@contextlib.contextmanager
def serving(app):
    """Run `app` under a real uvicorn server on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves on this very socket (no race)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()
    assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)


# ---------------------------------------------------------------- the happy path
def test_health(base_url):
    r = httpx.get(f"{base_url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_chat_completion(client):
    resp = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=8, temperature=0, seed=1)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.model == MODEL_ID
    [choice] = resp.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.completion_tokens <= 8


def test_greedy_is_deterministic_and_length_limited(client):
    kw = dict(model=MODEL_ID, messages=USER, max_tokens=5, temperature=0, stop=["\n\n\n\n"])
    a, b = (client.chat.completions.create(**kw) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    if a.choices[0].finish_reason == "length":
        assert a.usage.completion_tokens == 5


def test_model_may_be_omitted(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL_ID


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


def test_gguf_chat_template_is_used(build_dir, tiny_tokenizer):
    """The template comes from the GGUF's metadata, so the prompt is the ChatML the student saw."""
    backend = LlamaCppBackend(pick_gguf(build_dir), slots=1, ctx_per_slot=256, n_threads=1)
    try:
        assert backend.chat_template_source == "gguf"
        _, fin = generate(backend, Prompt(messages=tuple(USER)), GREEDY)
    finally:
        backend.close()
    prompt = tiny_tokenizer.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    expected = len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert fin.prompt_tokens in (expected, expected + 1)  # +1: a BOS, if the GGUF asks for one


def test_chatml_is_the_fallback_without_a_gguf_template(build_dir, tmp_path):
    """Without `tokenizer.chat_template`, llama-cpp-python would pick Llama-2 [INST]; we want ChatML."""
    bare = tmp_path / "no-template.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force", "--remove-metadata",
                    "tokenizer.chat_template", str(pick_gguf(build_dir)), str(bare)], check=True, capture_output=True)
    backend = LlamaCppBackend(bare, slots=1, ctx_per_slot=256, n_threads=1)
    try:
        assert backend.chat_template_source == "chatml"
        rendered = backend.engine.model.detokenize(backend.render(Prompt(messages=tuple(USER))), special=True)
        assert rendered.decode().endswith("<|im_start|>user\ndef add(a, b):<|im_end|>\n<|im_start|>assistant\n")
        text, fin = generate(backend, Prompt(messages=tuple(USER)), GREEDY)
    finally:
        backend.close()
    assert isinstance(text, str) and fin.prompt_tokens > 0


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    kw = dict(model=MODEL_ID, messages=USER, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completions(client):
    resp = client.completions.create(model=MODEL_ID, prompt="def add(a, b):", max_tokens=6, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 6 and resp.usage.prompt_tokens > 0
    streamed = client.completions.create(model=MODEL_ID, prompt="def add(a, b):", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == resp.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt="x", echo=True)


def test_stop_sequence_ends_the_text_before_it(client):
    kw = dict(model=MODEL_ID, messages=USER, max_tokens=24, temperature=1.0, seed=3)  # seeded: varied yet repeatable
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    if len(full) < 6 or not stop.strip():
        pytest.skip(f"the tiny model's greedy text {full!r} is too short to cut")
    resp = client.chat.completions.create(**kw, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].message.content == full[:full.index(stop)]
    streamed = client.chat.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.index(stop)]


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model=MODEL_ID, messages=USER, max_tokens=16, temperature=1.0, top_p=0.95)
    a, b = (client.chat.completions.create(**kw, seed=7).choices[0].message.content for _ in range(2))
    assert a == b


def test_engine_runs_sequences_together_and_cancel_frees_the_slot(build_dir):
    """Four jobs in one context all produce tokens before any finishes; a cancelled one frees its slot."""
    backend = LlamaCppBackend(pick_gguf(build_dir), slots=4, ctx_per_slot=256, n_threads=1)
    engine = backend.engine
    try:
        prompt = backend.render(Prompt(messages=tuple(USER)))
        log, done = [], threading.Semaphore(0)

        def emitter(i):
            def emit(ev):
                log.append((i, type(ev).__name__))
                if not isinstance(ev, Delta):
                    done.release()
            return emit
        params = SamplingParams(max_tokens=40, temperature=0.0, stop=("\x00",))
        jobs = [engine.submit(prompt, params, emitter(i)) for i in range(4)]
        for _ in jobs:
            assert done.acquire(timeout=60)
        first_finish = next(k for k, (_, kind) in enumerate(log) if kind == "Finished")
        assert {i for i, kind in log[:first_finish] if kind == "Delta"} == {0, 1, 2, 3}

        seen = []
        job = engine.submit(prompt, SamplingParams(max_tokens=200, temperature=0.0),
                            lambda ev: (seen.append(ev), job.cancel()))
        deadline = time.monotonic() + 30
        while (engine.active or not seen) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active == 0 and len(seen) <= 2 and not any(isinstance(e, Finished) for e in seen)
        assert engine._free_ids and len(engine._free_ids) == 4

        # A freed slot keeps its cache: the same prompt again is served from it, with the same greedy text.
        before = engine.reused_tokens
        a = generate(backend, Prompt(messages=tuple(USER)), SamplingParams(max_tokens=12, temperature=0.0))
        b = generate(backend, Prompt(messages=tuple(USER)), SamplingParams(max_tokens=12, temperature=0.0))
        assert engine.reused_tokens - before >= 2 * (len(prompt) - 1) and a == b
    finally:
        backend.close()


# ---------------------------------------------------------------- bad requests
@pytest.mark.parametrize("kw, param", [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (dict(messages=USER, max_tokens=0), "max_tokens"),
    (dict(messages=USER, max_tokens=10**9), "max_tokens"),
    (dict(messages=USER, temperature=2.5), "temperature"),
    (dict(messages=USER, top_p=0), "top_p"),
    (dict(messages=USER, stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(messages=USER, n=2), "n"),
    (dict(messages=USER, seed="abc"), "seed"),
    (dict(messages=USER, max_tokens=-3), "max_tokens"),
    (dict(messages=USER, max_completion_tokens=0), "max_completion_tokens"),
    (dict(messages=USER, temperature="hot"), "temperature"),
    (dict(messages=USER, stop=[""]), "stop"),
    (dict(messages=[{"role": "user"}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content"),
    (dict(messages="hello"), "messages"),
    (dict(messages=USER, stream=True, stream_options="yes"), "stream_options"),
])
def test_bad_request_is_a_400_error_object(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, **kw)
    err = e.value.response.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert e.value.status_code == 400


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)
    assert e.value.response.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("content, headers", [
    (b'{"messages": [', {"content-type": "application/json"}),
    (b"not json at all", {"content-type": "application/json"}),
    (b"[1, 2]", {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
    (b"messages=hi", {"content-type": "text/plain"}),
])
def test_malformed_body_is_a_400_error_object(base_url, content, headers):
    r = httpx.post(f"{base_url}/v1/chat/completions", content=content, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


def test_prompt_longer_than_context_is_a_400(client):
    long = [{"role": "user", "content": "spam " * 5000}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=long, max_tokens=2)
    assert e.value.response.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_route_is_an_error_object(base_url):
    r = httpx.get(f"{base_url}/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_server_still_answers_after_bad_requests(client, base_url):
    for body in (b"{", b"[]", json.dumps({"messages": []}).encode()):
        assert httpx.post(f"{base_url}/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"}).status_code == 400
    resp = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=3, temperature=0)
    assert isinstance(resp.choices[0].message.content, str)
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}


# ---------------------------------------------------------------- policy with a fake backend
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
    backend = ScriptBackend(["tok "] * 10_000, delay=0.01, slots=1)
    with serving(create_app(tmp_path, backend=backend, max_tokens_cap=10_000)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json={"messages": HI}, timeout=0.5)
        deadline = time.monotonic() + 10
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


# ---------------------------------------------------------------- finding the GGUF
def fake_build(root: Path, names: list[str]) -> Path:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"GGUF" + n.encode())
    write_manifest(root, [file_record(root, root / n) for n in names])
    return root


def test_pick_gguf_prefers_q8_0(tmp_path):
    out = fake_build(tmp_path, ["export/student.onnx", "export/student-f16.gguf", "export/student-q8_0.gguf"])
    assert pick_gguf(out) == (out / "export/student-q8_0.gguf").resolve()


def test_pick_gguf_falls_back_to_any_gguf_and_accepts_a_file(tmp_path):
    out = fake_build(tmp_path, ["export/student.onnx", "export/student-q4_k.gguf"])
    assert pick_gguf(out) == (out / "export/student-q4_k.gguf").resolve()
    assert pick_gguf(out / "export/student-q4_k.gguf") == (out / "export/student-q4_k.gguf").resolve()


def broken_build(d: Path, case: str) -> Path:
    """A build folder (or path) broken in one way; returns what to hand to pick_gguf."""
    if case == "no folder":
        return d / "missing"
    if case == "bad json":
        (d / MANIFEST).write_text("{oops")
    elif case == "no export stage":
        atomic_write_json(d / MANIFEST, {"stages": {}})
    elif case == "no gguf":
        fake_build(d, ["export/student.onnx"])
    elif case in ("escapes", "absolute", "missing file"):
        path = {"escapes": "../outside.gguf", "absolute": "/etc/x.gguf", "missing file": "export/gone.gguf"}[case]
        (d.parent / "outside.gguf").write_bytes(b"x")
        write_manifest(d, [{"path": path, "bytes": 1}])
    elif case == "altered":
        (fake_build(d, ["export/s.gguf"]) / "export/s.gguf").write_bytes(b"x")
    elif case == "not gguf":
        (d / "notes.txt").write_text("hi")
        return d / "notes.txt"
    return d


@pytest.mark.parametrize("case, match", [
    ("no folder", "does not exist.*edgedistill build"),
    ("no manifest", "no manifest.json.*edgedistill build"),
    ("bad json", "not valid JSON"),
    ("no export stage", "no finished export stage.*edgedistill build"),
    ("no gguf", "no GGUF export.*edgedistill build"),
    ("escapes", "outside the build folder"),
    ("absolute", "outside the build folder"),
    ("missing file", "missing on disk"),
    ("altered", "was altered"),
    ("not gguf", "not a .gguf file"),
])
def test_pick_gguf_errors_are_clear(tmp_path, case, match):
    build = tmp_path / "build"
    build.mkdir()
    with pytest.raises(ServeError, match=match):
        pick_gguf(broken_build(build, case))


def test_create_app_on_an_empty_folder_fails_before_serving(tmp_path):
    with pytest.raises(ServeError, match="edgedistill build"):
        create_app(tmp_path)


# ---------------------------------------------------------------- the Gradio page
def test_gradio_page_answers_through_the_api(tmp_path):
    from gradio_client import Client

    from edgedistill.serve.demo import _text

    backend = ScriptBackend(THOUGHT)
    with serving(create_app(tmp_path, backend=backend, ui=True)) as url:
        client = Client(f"{url}/ui/", verbose=False)
        history, box = client.predict("what is 2+2?", [], 0.0, 32, api_name="/chat")
    assert box == ""
    roles = [(m["role"], (m.get("metadata") or {}).get("title")) for m in history]
    assert roles == [("user", None), ("assistant", "Thinking"), ("assistant", None), ("assistant", "Route")]
    text = [_text(m["content"]) for m in history]
    assert text[1] == "Two and two" and text[2] == "It is 4."
    assert "echo" in text[3] and "3 in / 5 out" in text[3]
    assert backend.seen[-1].max_tokens == 32 and backend.seen[-1].temperature == 0.0
    with serving(create_app(tmp_path, backend=ScriptBackend(), ui=True)) as url:  # a second turn sees the first
        history, _ = Client(f"{url}/ui/", verbose=False).predict("and 3+3?", history, 0.0, 32, api_name="/chat")
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
