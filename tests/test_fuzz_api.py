"""Fuzzing the server's own OpenAPI schema (schemathesis) and a hand-written malformed-request suite over a
real uvicorn serving a tiny real GGUF: never a 5xx, never a hang, and the server still answers afterwards.
bench/reliability.py runs the same fuzzer with more cases."""
from __future__ import annotations

import httpx
import openai
import pytest

from edgedistill.serve.app import create_app
from live_server import serving
from reliability_kit import fuzz_api

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
JSON = "application/json"
HI = '"messages":[{"role":"user","content":"hi"}]'


@pytest.fixture(scope="module")
def url(tiny_f16_gguf):
    with serving(create_app(tiny_f16_gguf, max_tokens_cap=8, slots=4, ctx_per_slot=256, n_threads=1)) as url:
        yield url


def still_serving(url: str) -> None:
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
    r = oa.chat.completions.create(model="tiny-f16", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_schema_fuzzing_finds_no_5xx_and_no_hang(url):
    report = fuzz_api(url, examples=50, timeout=20)
    assert report.requests >= 250, report
    assert report.responses_5xx == 0 and report.hangs == 0, "\n".join(report.failures[:10])
    assert not report.failures, "\n".join(report.failures[:10])
    assert report.by_status.get(200, 0) > 0 and report.by_status.get(400, 0) > 0  # both kinds got through
    still_serving(url)


MALFORMED = [  # (route, body, content-type, the error's param or None)
    (CHAT, '{%s,"temperature":NaN}' % HI, JSON, "temperature"),
    (CHAT, '{%s,"temperature":Infinity}' % HI, JSON, "temperature"),
    (CHAT, '{%s,"top_p":-Infinity}' % HI, JSON, "top_p"),
    (CHAT, '{%s,"seed":1e400}' % HI, JSON, "seed"),
    (CHAT, '{%s,"max_tokens":123456789012345678901234567890}' % HI, JSON, "max_tokens"),
    (CHAT, '{%s,"max_tokens":2.5}' % HI, JSON, "max_tokens"),
    (CHAT, '{%s,"max_tokens":true,"n":null}' % HI, JSON, None),
    (CHAT, '{"messages":[{"role":"user","content":"\\u0000\\ud800"}]}', JSON, "messages[0].content"),
    (CHAT, '{"messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}]}', JSON, "messages[0].content"),
    (CHAT, '{%s,"stop":["\\ud800"]}' % HI, JSON, "stop[0]"),
    (TEXT, '{"prompt":"\\ud83d"}', JSON, "prompt"),
    (TEXT, '{"prompt":["\\ud83d"]}', JSON, "prompt"),
    (TEXT, '{"prompt":[]}', JSON, "prompt"),
    (TEXT, '{"prompt":["a","b"]}', JSON, "prompt"),
    (TEXT, '{"prompt":"x","echo":true}', JSON, "echo"),
    (TEXT, '{"prompt":{"text":"x"}}', JSON, "prompt"),
    (CHAT, '{"messages":[null]}', JSON, "messages[0]"),
    (CHAT, '{"messages":{"role":"user","content":"hi"}}', JSON, "messages"),
    (CHAT, '{%s,"stream":"maybe"}' % HI, JSON, "stream"),
    (CHAT, '{%s,"stream_options":{"include_usage":"x"}}' % HI, JSON, "stream_options.include_usage"),
    (CHAT, b"\xff\xfe\x00{", JSON, None),
    (CHAT, "[" * 100_000, JSON, None),
    (CHAT, '{"a":' * 5000 + "1" + "}" * 5000, JSON, None),
    (CHAT, "null", JSON, None),
    (CHAT, '"just a string"', JSON, None),
    (CHAT, '{%s}' % HI, "multipart/form-data; boundary=x", None),
    (CHAT, '{%s}' % HI, "application/x-www-form-urlencoded", None),
    (CHAT, '{%s' % HI, JSON, None),
]


@pytest.mark.parametrize("route, body, content_type, param", MALFORMED)
def test_malformed_request_is_a_400_error_object(url, route, body, content_type, param):
    r = httpx.post(url + route, content=body.encode() if isinstance(body, str) else body,
                   headers={"content-type": content_type}, timeout=20)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param, err


@pytest.mark.parametrize("path, status", [
    ("/v1/models/%2e%2e%2f%2e%2e", 404), ("/v1/models/..%2F..%2Fetc%2Fpasswd", 404),
    ("/v1/models/" + "a" * 8000, 404), ("/v1/models/x%00y", 404), ("/v1/chat/completions", 405),
])
def test_odd_paths_are_error_objects(url, path, status):
    r = httpx.get(url + path, timeout=20)
    assert r.status_code == status and r.json()["error"]["message"]


def test_server_alive_after_the_malformed_suite(url):
    still_serving(url)
