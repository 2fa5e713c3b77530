"""Faults in the larger `--llm` model and in the small model's own backend.

A real local model server (fault_server.py) is down, slow past the timeout, answers 500 or 429, stalls, or
cuts its SSE stream halfway; RemoteBackend and the server's `--llm` path must end every request within the
configured timeout with either the complete answer or one clean OpenAI error, never a hang and never a
truncated answer passed off as complete (finish_reason "stop"). The small model stays available throughout.
"""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from edgedistill.errors import ServeError
from edgedistill.serve.app import create_app
from edgedistill.serve.backend import Prompt, generate
from edgedistill.serve.engine import Job
from edgedistill.serve.events import Delta, SamplingParams
from edgedistill.serve.remote import RemoteBackend
from fault_server import FAULTS, FaultyModelServer, closed_port
from live_server import serving

TIMEOUT = 2.0  # the configured --llm timeout in these tests
SLACK = 4.0  # scheduling slack on a loaded 2-core machine
HI = [{"role": "user", "content": "hi"}]
EXPECT = {"http500": "HTTP 500: internal failure", "http429": "HTTP 429: slow down", "slow": "did not answer within",
          "stall": "did not answer within", "cut": "was cut mid-answer", "cut_clean": "was cut before its end",
          "garbage": "malformed stream", "error": "failed mid-answer: the model crashed", "down": "unreachable"}


@pytest.fixture(scope="module")
def faulty():
    server = FaultyModelServer(slow_s=5.0)  # past TIMEOUT, short enough for uvicorn's shutdown
    with serving(server.app) as url:
        yield server, url


@pytest.fixture(scope="module")
def gguf(tmp_path_factory, tiny_model_dir):
    from edgedistill.export.gguf import write_gguf
    out = tmp_path_factory.mktemp("faults") / "small.gguf"
    write_gguf(tiny_model_dir, out, dtype="f16")
    return out


def remote_url(faulty, mode: str) -> str:
    server, url = faulty
    server.mode = "ok" if mode == "down" else mode
    return f"http://127.0.0.1:{closed_port()}/v1" if mode == "down" else f"{url}/v1"


@pytest.mark.parametrize("mode", ["ok", *FAULTS, "down"])
def test_remote_backend_ends_every_fault_cleanly_within_the_timeout(faulty, mode):
    remote = RemoteBackend(remote_url(faulty, mode), model="big-llm", timeout=TIMEOUT, retries=1, backoff_s=0.05)
    t0 = time.monotonic()
    try:
        if mode == "ok":
            text, fin = generate(remote, Prompt(messages=tuple(HI)), SamplingParams(max_tokens=8), timeout=30)
            assert (text, fin.finish_reason, fin.completion_tokens) == ("pong", "stop", 2)
        else:
            with pytest.raises(ServeError, match=EXPECT[mode]):
                generate(remote, Prompt(messages=tuple(HI)), SamplingParams(max_tokens=8), timeout=30)
    finally:
        remote.close()
    assert time.monotonic() - t0 < TIMEOUT + SLACK


def test_retryable_faults_are_retried_before_the_first_token_only(faulty):
    server, url = faulty
    remote = RemoteBackend(f"{url}/v1", model="big-llm", timeout=TIMEOUT, retries=2, backoff_s=0.01)
    for mode, calls in (("http500", 3), ("http429", 3), ("cut", 1), ("cut_clean", 1), ("slow", 1)):
        server.mode, before = mode, server.calls
        with pytest.raises(ServeError):
            generate(remote, Prompt(messages=tuple(HI)), SamplingParams(max_tokens=8), timeout=30)
        assert server.calls - before == calls, mode  # a started answer is never re-asked (it would repeat)
    remote.close()


@pytest.fixture(scope="module")
def served(faulty, gguf):
    """Our server: the tiny GGUF as the small model, the faulty server as --llm."""
    server, url = faulty
    server.mode = "ok"
    app = create_app(gguf, llm=f"{url}/v1", large_timeout_s=TIMEOUT, max_tokens_cap=16, slots=2, ctx_per_slot=256,
                     n_threads=1)
    with serving(app) as ours:
        yield server, openai.OpenAI(base_url=f"{ours}/v1", api_key="x", max_retries=0, timeout=60)


def small_model_still_answers(oa: openai.OpenAI) -> None:
    r = oa.chat.completions.create(model="small", messages=HI, max_tokens=4, temperature=0)
    assert r.model == "small" and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("mode", FAULTS)
def test_llm_fault_is_a_clean_error_over_http_and_the_small_model_keeps_serving(served, mode):
    server, oa = served
    server.mode = mode
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        oa.chat.completions.create(model="big-llm", messages=HI, max_tokens=8)
    assert e.value.status_code in (500, 502, 504) and e.value.response.json()["error"]["type"] == "server_error"
    assert EXPECT[mode] in e.value.response.json()["error"]["message"]
    # Streamed: whatever arrived before the fault, the stream ends in an error, never in finish_reason "stop".
    finishes, text = [], ""
    with pytest.raises(openai.APIError, match=EXPECT[mode]):
        for chunk in oa.chat.completions.create(model="big-llm", messages=HI, max_tokens=8, stream=True):
            for c in chunk.choices:
                text += c.delta.content or ""
                finishes.append(c.finish_reason)
    assert not any(finishes) and text in ("", "po")
    assert time.monotonic() - t0 < 2 * (TIMEOUT + SLACK) + 2 * 0.5 * 3  # two requests, retries' backoff included
    small_model_still_answers(oa)
    server.mode = "ok"
    assert oa.chat.completions.create(model="big-llm", messages=HI).choices[0].message.content == "pong"


def test_llm_down_at_request_time(faulty, gguf):
    """The remote goes away after startup: requests for it are a clean 502, the small model is unaffected."""
    server, url = faulty
    server.mode = "ok"
    app = create_app(gguf, llm=f"{url}/v1", large_timeout_s=TIMEOUT, max_tokens_cap=16, slots=2, ctx_per_slot=256,
                     n_threads=1)
    app.state.service.backends["big-llm"].base_url = f"http://127.0.0.1:{closed_port()}/v1"
    with serving(app) as ours:
        oa = openai.OpenAI(base_url=f"{ours}/v1", api_key="x", max_retries=0, timeout=60)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            oa.chat.completions.create(model="big-llm", messages=HI)
        assert e.value.status_code in (500, 502) and "unreachable" in e.value.message
        assert time.monotonic() - t0 < TIMEOUT + SLACK
        small_model_still_answers(oa)


def test_llm_down_at_start_needs_its_model_named_then_the_server_starts(faulty, gguf):
    """Without --llm-model the remote's /models must answer at start (a clear error says what to do); with it,
    the server starts while the remote is down, routed requests keep the small model's answer, and once the
    remote is back (same URL) it answers requests for it."""
    from edgedistill.routing.policy import RoutingPolicy
    server, url = faulty
    down = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(ServeError, match="--llm-model"):
        create_app(gguf, llm=down, max_tokens_cap=16, slots=2, ctx_per_slot=256, n_threads=1)
    with pytest.raises(ServeError, match="Drop --llm-model"):
        create_app(gguf, llm=str(gguf), llm_model="big", max_tokens_cap=16, slots=2, ctx_per_slot=256, n_threads=1)
    always = RoutingPolicy(calibrated=True, escalation_threshold=1.01)  # every routed request escalates
    app = create_app(gguf, llm=down, llm_model="big-llm", policy=always, large_timeout_s=TIMEOUT, max_tokens_cap=16,
                     slots=2, ctx_per_slot=256, n_threads=1)
    with serving(app) as ours:
        oa = openai.OpenAI(base_url=f"{ours}/v1", api_key="x", max_retries=0, timeout=60)
        routed = oa.chat.completions.create(model=oa.models.list().data[0].id, messages=HI)
        assert routed.choices[0].message.content  # the small model's answer, kept when the large one fails
        server.mode = "ok"
        app.state.service.backends["big-llm"].base_url = f"{url}/v1"  # the remote comes (back) up
        assert oa.chat.completions.create(model="big-llm", messages=HI).choices[0].message.content == "pong"


@pytest.mark.parametrize("mode", FAULTS)
def test_escalation_to_a_faulty_llm_keeps_the_small_models_answer(faulty, gguf, mode):
    """Routed requests (the default model asked for) that the policy always escalates: whatever the large model
    does, the small model's answer comes back complete, or (streamed, once large-model text went out) the stream
    ends in an error event; never the large model's half answer with finish_reason "stop"."""
    from edgedistill.routing.policy import RoutingPolicy

    server, url = faulty
    server.mode = mode
    always = RoutingPolicy(calibrated=True, escalation_threshold=1.01)
    app = create_app(gguf, llm=f"{url}/v1", policy=always, large_timeout_s=TIMEOUT, max_tokens_cap=16, slots=2,
                     ctx_per_slot=256, n_threads=1)
    with serving(app) as ours:
        oa = openai.OpenAI(base_url=f"{ours}/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model="small", messages=HI, max_tokens=6, temperature=0)
        t0 = time.monotonic()
        r = oa.chat.completions.create(**kw)
        ed = r.model_extra["edgedistill"]
        assert r.model == "small" and ed["escalated"] and ed["answered_by"] == "small", ed
        assert "the large model failed" in ed["reason"] and r.choices[0].finish_reason in ("stop", "length")
        assert time.monotonic() - t0 < TIMEOUT + SLACK + 2
        text, finishes = "", []
        try:
            for chunk in oa.chat.completions.create(**kw, stream=True):
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finishes.append(c.finish_reason)
        except openai.APIError:
            assert not any(finishes) and text in ("", "po")  # broke off: said so, not passed off as complete
        else:
            assert text == r.choices[0].message.content and finishes[-1] in ("stop", "length")
    server.mode = "ok"


# ---------------------------------------------------------------- the small model's own backend fails
class BrokenBackend:
    """`how`: 'start' raises at once; 'dies' sends one delta, then its thread dies without a word."""

    def __init__(self, how: str):
        self.how, self.name = how, "broken"

    def start(self, prompt, params, emit):
        if self.how == "start":
            raise RuntimeError("the model file vanished")
        job = Job([], params, emit)

        def run():
            emit(Delta("half an ans", 1))
            raise RuntimeError("fault injected: the generation thread dies")
        threading.Thread(target=run, daemon=True).start()
        return job

    def load(self):
        return {"queue_depth": 0, "active": 0, "slots": 1}

    def close(self):
        pass


def test_small_backend_that_raises_is_a_clean_500(tmp_path):
    with serving(create_app(tmp_path, backend=BrokenBackend("start"))) as url:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": HI}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "the model file vanished" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected death
def test_small_backend_that_goes_silent_ends_within_the_stall_timeout(tmp_path):
    with serving(create_app(tmp_path, backend=BrokenBackend("dies"), stall_timeout_s=1.0)) as url:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            oa.chat.completions.create(model="broken", messages=HI)
        assert e.value.status_code == 504 and "sent nothing within 1 s" in e.value.message
        finishes, text = [], ""
        with pytest.raises(openai.APIError, match="sent nothing"):
            for chunk in oa.chat.completions.create(model="broken", messages=HI, stream=True):
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finishes.append(c.finish_reason)
        assert text == "half an ans" and not any(finishes)
        assert time.monotonic() - t0 < 2 * 1.0 + SLACK
