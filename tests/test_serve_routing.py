"""SLM-default / LLM-fallback end to end: two tiny real GGUF models (no mocked model) behind the real uvicorn server,
driven by the official `openai` client. Escalation is forced by the policy's threshold (0: never, above 1: always);
the large model is a local GGUF, or a second server that goes down (a closed port) or is too slow."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from conftest import make_tiny_llama
from edgedistill.artifacts import file_record
from edgedistill.routing.policy import ROUTER_FILE, RoutingPolicy
from edgedistill.serve.app import create_app
from live_server import serving
from test_serve import write_manifest

Q = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]
SLM, LLM = "slm-build", "llm-build"
NEVER, ALWAYS = 0.0, 1.01  # escalation thresholds: confidence is within [0, 1]


def gguf_build(root, model_dir, name):
    from edgedistill.export.gguf import write_gguf

    out = root / name
    gguf = out / "export" / f"{name}-f16.gguf"
    gguf.parent.mkdir(parents=True)
    write_gguf(model_dir, gguf, dtype="f16")
    write_manifest(out, [file_record(out, gguf)])
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    root = tmp_path_factory.mktemp("route")
    big = make_tiny_llama(root / "big-hf", tiny_tokenizer, hidden=96, layers=2, heads=4, kv_heads=2, ffn=192, seed=7)
    return gguf_build(root, tiny_model_dir, SLM), gguf_build(root, big, LLM)


def app(slm, llm, threshold, **kw):
    return create_app(slm, llm=str(llm), policy=RoutingPolicy(calibrated=True, escalation_threshold=threshold),
                      max_tokens_cap=32, slots=2, ctx_per_slot=256, n_threads=1, **kw)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


KW = dict(model=SLM, messages=Q, max_tokens=12, temperature=0)


def test_not_escalated_when_confident(builds):
    slm, llm = builds
    with serving(app(slm, llm / "export" / f"{LLM}-f16.gguf", NEVER)) as url:
        raw = client(url).chat.completions.with_raw_response.create(**KW)
        r = raw.parse()
        ed = r.model_extra["edgedistill"]
        assert r.model == SLM and not ed["escalated"] and ed["answered_by"] == SLM and ed["models"] == [SLM]
        assert 0.0 <= ed["confidence"] <= 1.0 and ed["threshold"] == NEVER and ">= threshold" in ed["reason"]
        assert ed["think_requested"] == "auto" and ed["think_mode"] == "off" and ed["p_hard"] is not None
        assert ed["latency_ms"]["small"] > 0 and ed["latency_ms"]["large"] is None and ed["latency_ms"]["policy"] < 50
        h = raw.headers
        assert h["x-edgedistill-escalated"] == "false" and h["x-edgedistill-answered-by"] == SLM
        assert float(h["x-edgedistill-confidence"]) == ed["confidence"] and "x-edgedistill-latency-small-ms" in h
        # Streamed: live (nothing to wait for), the same answer, the object on the last chunk.
        chunks = list(client(url).chat.completions.create(**KW, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        assert chunks[-1].model_extra["edgedistill"]["confidence"] == ed["confidence"]
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
        metrics = httpx.get(f"{url}/metrics").text
        assert "edgedistill_routed_requests_total 2" in metrics and "edgedistill_escalation_rate 0" in metrics
        assert "edgedistill_tokens_saved_vs_always_think_total 512" in metrics  # 2 x the 256-token guess


def test_escalated_when_unsure_streamed_and_not(builds):
    slm, llm = builds
    with serving(app(slm, llm, ALWAYS)) as url:
        oa = client(url)
        assert [m.id for m in oa.models.list().data] == [SLM, LLM]
        raw = oa.chat.completions.with_raw_response.create(**KW)
        r = raw.parse()
        ed = r.model_extra["edgedistill"]
        assert r.model == LLM and ed["escalated"] and ed["answered_by"] == LLM and ed["models"] == [SLM, LLM]
        assert ed["confidence"] < ed["threshold"] == ALWAYS and "escalated to the large model" in ed["reason"]
        assert ed["latency_ms"]["small"] > 0 and ed["latency_ms"]["large"] > 0
        assert raw.headers["x-edgedistill-escalated"] == "true" and raw.headers["x-edgedistill-models"] == f"{SLM},{LLM}"
        # The large model's own answer: the same as asking it directly.
        direct = oa.chat.completions.create(**{**KW, "model": LLM})
        assert direct.choices[0].message.content == r.choices[0].message.content
        assert "request named this model" in direct.model_extra["edgedistill"]["reason"]
        # Streamed: the small answer is held back (never shown), the large one streams.
        chunks = list(oa.chat.completions.create(**KW, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        assert {c.model for c in chunks[1:]} == {LLM}
        last = chunks[-1].model_extra["edgedistill"]
        assert last["escalated"] and last["answered_by"] == LLM and chunks[-1].usage is not None
        metrics = httpx.get(f"{url}/metrics").text
        assert 'edgedistill_escalations_total{reason="low_confidence"} 2' in metrics
        assert "edgedistill_routed_requests_total 2" in metrics and "edgedistill_escalation_rate 1" in metrics


def test_large_model_down_returns_the_small_answer_with_the_reason(builds):
    """The LLM is a second server that goes away: its port is closed when the request escalates."""
    slm, llm = builds
    with serving(create_app(llm, max_tokens_cap=32, slots=1, ctx_per_slot=256, n_threads=1)) as llm_url:
        routed = app(slm, f"{llm_url}/v1", ALWAYS, large_timeout_s=10)
        llm_backend = routed.state.service.fallback
        llm_backend.backoff_s = 0.05
    with serving(routed) as url:
        oa = client(url)
        started = time.monotonic()
        r = oa.chat.completions.create(**KW)
        assert time.monotonic() - started < 10
        ed = r.model_extra["edgedistill"]
        assert r.model == SLM and ed["answered_by"] == SLM and ed["models"] == [SLM, LLM]
        assert "large model failed" in ed["reason"] and "unreachable" in ed["reason"]
        assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content is not None
        chunks = list(oa.chat.completions.create(**KW, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        assert "large model failed" in chunks[-1].model_extra["edgedistill"]["reason"]
        assert 'edgedistill_fallbacks_total{failed="large"} 2' in httpx.get(f"{url}/metrics").text


def test_timeouts_fall_back_to_the_other_model_and_both_failing_is_an_error(builds):
    slm, llm = builds
    with serving(app(slm, llm, ALWAYS, large_timeout_s=0.001)) as url:  # the large model is too slow
        r = client(url).chat.completions.create(**KW)
        ed = r.model_extra["edgedistill"]
        assert ed["answered_by"] == SLM and "large model failed" in ed["reason"] and "within 0.001 s" in ed["reason"]
    with serving(app(slm, llm, NEVER, small_timeout_s=0.001)) as url:  # the small one is: escalated even so
        oa = client(url)
        for r in (oa.chat.completions.create(**KW), list(oa.chat.completions.create(**KW, stream=True))[-1]):
            ed = r.model_extra["edgedistill"]
            assert ed["answered_by"] == LLM and ed["escalated"] and "the small model failed" in ed["reason"]
        assert 'edgedistill_escalations_total{reason="small_failed"} 2' in httpx.get(f"{url}/metrics").text
    with serving(app(slm, llm, ALWAYS, small_timeout_s=0.001, large_timeout_s=0.001)) as url:
        with pytest.raises(openai.APIStatusError) as e:
            client(url).chat.completions.create(**KW)
        assert e.value.status_code == 502 and "both models failed" in e.value.message
        chunks = [line for line in httpx.post(f"{url}/v1/chat/completions", json={**KW, "stream": True},
                                              timeout=30).text.splitlines() if line.startswith("data:")]
        last = json.loads(chunks[-2][5:])
        assert chunks[-1] == "data: [DONE]" and "error" in last and last["edgedistill"]["answered_by"] == ""
        assert not any('"finish_reason":"stop"' in c or '"finish_reason":"length"' in c for c in chunks)


def test_router_json_in_the_build_folder_is_used_and_a_bad_one_is_refused(builds, tmp_path):
    slm, llm = builds
    RoutingPolicy(calibrated=True, escalation_threshold=ALWAYS).save(slm / ROUTER_FILE)
    try:
        with serving(create_app(slm, llm=str(llm), max_tokens_cap=32, slots=1, ctx_per_slot=256,
                                n_threads=1)) as url:
            assert client(url).chat.completions.create(**KW).model_extra["edgedistill"]["escalated"]
        (slm / ROUTER_FILE).write_text('{"escalation_threshold": "high"}')
        from edgedistill.errors import RoutingError
        with pytest.raises(RoutingError, match="escalation_threshold"):
            create_app(slm, max_tokens_cap=32, slots=1, ctx_per_slot=256, n_threads=1)
    finally:
        (slm / ROUTER_FILE).unlink()


def test_a_cut_large_model_stream_is_never_passed_off_as_complete(builds):
    """The large model is a remote whose stream stops before its end (no final chunk, no [DONE])."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    cutter = FastAPI()
    cutter.get("/health")(lambda: {"status": "ok"})
    cutter.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "cutter", "object": "model"}]})

    @cutter.post("/v1/chat/completions")
    def chat():
        part = {"choices": [{"index": 0, "delta": {"content": "The answer is"}, "finish_reason": None}]}
        return StreamingResponse(iter([f"data: {json.dumps(part)}\n\n"]), media_type="text/event-stream")

    slm, _ = builds
    with serving(cutter) as remote:
        with serving(app(slm, f"{remote}/v1", ALWAYS)) as url:
            oa = client(url)
            # Not streamed: the half answer is discarded and the small model's is returned, saying why.
            r = oa.chat.completions.create(**KW)
            ed = r.model_extra["edgedistill"]
            assert r.model == SLM and ed["answered_by"] == SLM and "cut" in ed["reason"]
            assert r.choices[0].message.content != "The answer is"
            # Streamed: the large model's first words went out, so the stream ends in an error, not a finish.
            lines = [ln for ln in httpx.post(f"{url}/v1/chat/completions", json={**KW, "stream": True},
                                             timeout=30).text.splitlines() if ln.startswith("data:")]
            events = [json.loads(ln[5:]) for ln in lines[:-1]]
            assert lines[-1] == "data: [DONE]" and "error" in events[-1] and "cut" in events[-1]["error"]["message"]
            assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")) \
                == "The answer is"
            assert not any(e["choices"][0]["finish_reason"] for e in events if e.get("choices"))
            assert events[-1]["edgedistill"]["escalated"] and "broke off" in events[-1]["edgedistill"]["reason"]


def test_escalation_uses_the_think_mode_router_json_names_for_the_large_model(builds):
    """router.json's escalate_think (the teacher's better mode on calibration) sets the large model's mode when
    the policy chose the mode; a mode the client asked for is kept."""
    slm, llm = builds
    policy = RoutingPolicy(calibrated=True, escalation_threshold=ALWAYS, escalate_think="on")
    application = create_app(slm, llm=str(llm), policy=policy, max_tokens_cap=32, slots=2, ctx_per_slot=256,
                             n_threads=1)
    with serving(application) as url:
        oa = client(url)
        r = oa.chat.completions.create(**KW)
        ed = r.model_extra["edgedistill"]
        assert ed["think_mode"] == "off" and ed["escalated"] and ed["escalation_think_mode"] == "on"
        # The large model thought: the same answer as asking it directly with thinking on.
        direct = oa.chat.completions.create(**{**KW, "model": LLM}, extra_body={"think": True})
        assert direct.model_extra["edgedistill"]["think_mode"] == "on"
        assert r.choices[0].message.model_dump() == direct.choices[0].message.model_dump()
        # Asked for explicitly: the client's mode stands for both models.
        r = oa.chat.completions.create(**KW, extra_body={"think": False})
        ed = r.model_extra["edgedistill"]
        assert ed["escalated"] and ed["escalation_think_mode"] is None and ed["think_mode"] == "off"
