"""The server over the real batched llama.cpp engine: a real uvicorn server serving a GGUF written from
the tiny model, driven by the official `openai` client; malformed requests; the engine itself; GGUF lookup."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from edgedistill.artifacts import MANIFEST, atomic_write_json, file_record
from edgedistill.errors import ServeError
from edgedistill.serve.app import create_app
from edgedistill.serve.backend import LlamaCppBackend, Prompt, generate, pick_gguf
from edgedistill.serve.events import Delta, Finished, SamplingParams
from live_server import serving

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


def test_engine_feeds_each_batch_in_sequence_id_order(build_dir):
    """With one KV stream per slot, llama.cpp splits a batch into micro-batches of consecutive sequence ids: a
    slot refilled while others run must still go into the batch in id order, or every step costs extra passes."""
    import llama_cpp

    backend = LlamaCppBackend(pick_gguf(build_dir), slots=4, ctx_per_slot=256, n_threads=1)
    engine = backend.engine
    batches = []

    class Recording:  # the real bindings, with each decode's sequence ids noted
        def __getattr__(self, name):
            return getattr(llama_cpp, name)

        def llama_decode(self, ctx, b):
            batches.append([b.seq_id[i][0] for i in range(b.n_tokens)])
            return llama_cpp.llama_decode(ctx, b)
    engine._ll = Recording()
    try:
        prompt = backend.render(Prompt(messages=tuple(USER)))
        done = threading.Semaphore(0)
        # The short first job frees slot 0 while the others run; the fifth and sixth jobs take freed slots.
        lengths = [3, 30, 30, 30, 8, 30]
        for n in lengths:
            engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0, stop=("\x00",)),
                          lambda ev: None if isinstance(ev, Delta) else done.release())
        for _ in lengths:
            assert done.acquire(timeout=60)
    finally:
        backend.close()
    assert any(len(set(ids)) == 4 and ids[0] == 0 for ids in batches[5:])  # a refilled slot 0 beside the others
    assert all(ids == sorted(ids) for ids in batches), [ids for ids in batches if ids != sorted(ids)][:3]


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
