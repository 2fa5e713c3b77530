"""Security defaults of `edgedistill serve`: loopback only, the Bearer key compared in constant time (and
required by the chat page too), body and max_tokens caps, no path traversal through model or file
parameters, CORS off unless origins are named, and neither keys nor prompts in the logs unless asked."""
from __future__ import annotations

import hmac
import json
import secrets

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from edgedistill.errors import ServeError
from edgedistill.serve import app as app_module
from edgedistill.serve.app import create_app
from live_server import serving
from reliability_kit import cli_server

KEY = "sk-edgedistill-TOPSECRET-7f3a9c"
PROMPT = "my private prompt 4815162342"


@pytest.fixture(scope="module")
def gguf(tiny_f16_gguf):
    return tiny_f16_gguf


def exercise(url: str, key: str | None) -> None:
    """Requests that carry the key and the prompt: good and bad key, streamed and not, an error."""
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key=key or "x", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": PROMPT}]
    oa.chat.completions.create(model="tiny-f16", messages=msgs, max_tokens=4)
    list(oa.chat.completions.create(model="tiny-f16", messages=msgs, max_tokens=4, stream=True))
    oa.completions.create(model="tiny-f16", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model="tiny-f16", messages=msgs, max_tokens=10**6)
    if key:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key=KEY[::-1], max_retries=0).models.list()


def test_cli_binds_loopback_and_logs_neither_keys_nor_prompts(gguf):
    with cli_server(gguf, "--no-ui", "--api-key", KEY, "--log-level", "debug", "--threads", "1") as server:
        exercise(server.url, KEY)
        log = server.output()
    assert "Uvicorn running on http://127.0.0.1:" in log
    assert '"route": "/v1/chat/completions", "status": 200' in log  # the access log is there...
    assert KEY not in log and KEY[::-1] not in log and PROMPT not in log  # ...without keys or prompts


def test_log_prompts_puts_bodies_but_never_keys_in_the_log(gguf):
    with cli_server(gguf, "--no-ui", "--api-key", KEY, "--log-prompts", "--threads", "1") as server:
        exercise(server.url, KEY)
        log = server.output()
    assert PROMPT in log and KEY not in log


def test_api_key_is_compared_in_constant_time(tmp_path, monkeypatch):
    assert secrets.compare_digest is hmac.compare_digest
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return hmac.compare_digest(a, b)
    monkeypatch.setattr(app_module.secrets, "compare_digest", spy)
    from test_serve_api import ScriptBackend
    http = TestClient(create_app(tmp_path, api_key=KEY, backend=ScriptBackend()))
    for auth, status in ((f"Bearer {KEY}", 200), ("Bearer nope", 401), (f"bearer {KEY}", 200), ("Basic x", 401),
                         (f"Bearer {KEY}x", 401), ("Bearer \u00e9t\u00e9".encode("latin-1"), 401)):
        assert http.get("/v1/models", headers={"Authorization": auth}).status_code == status, auth
    assert len(calls) == 5 and all(b == KEY.encode() for _, b in calls)  # 'Basic' fails before comparing


def test_the_chat_page_needs_the_key_too(tmp_path):
    from test_serve_api import ScriptBackend
    with serving(create_app(tmp_path, api_key=KEY, backend=ScriptBackend(), ui=True)) as url:
        config = httpx.get(f"{url}/ui/config", timeout=30)
        assert config.status_code in (401, 403) or config.json().get("auth_required") is True
        login = httpx.post(f"{url}/ui/login", data={"username": "me", "password": "wrong"}, timeout=30)
        assert login.status_code >= 400
        with httpx.Client(timeout=30) as c:
            assert c.post(f"{url}/ui/login", data={"username": "me", "password": KEY}).status_code == 200
            assert "auth_required" not in c.get(f"{url}/ui/config").json()


def test_chunked_body_over_the_limit_is_a_413(tmp_path):
    from test_serve_api import ScriptBackend
    with serving(create_app(tmp_path, backend=ScriptBackend(), max_body_bytes=2000)) as url:
        def chunks():  # no Content-Length: the limit must hold while reading
            yield b'{"messages":[{"role":"user","content":"'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}]}'
        r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert httpx.get(f"{url}/health").status_code == 200


@pytest.mark.parametrize("path", [
    "/ui/file=/etc/passwd", "/ui/gradio_api/file=/etc/passwd", "/ui/file=../../../../etc/passwd",
    "/ui/gradio_api/file=..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/ui/static/../../../../etc/passwd",
    "/ui/assets/..%2F..%2F..%2Fetc%2Fpasswd", "/ui/gradio_api/file=%2Fetc%2Fpasswd",
    "/v1/models/..%2F..%2F..%2Fetc%2Fpasswd", "/ui/gradio_api/file={model}",
])
def test_no_file_is_served_from_outside_through_any_path(ui_url, gguf, path):
    r = httpx.get(ui_url + path.format(model=gguf), timeout=30)
    assert r.status_code >= 400 and "root:" not in r.text and b"GGUF" not in r.content[:8]


@pytest.fixture(scope="module")
def ui_url(gguf):
    with serving(create_app(gguf, max_tokens_cap=4, slots=1, ctx_per_slot=128, n_threads=1, ui=True)) as url:
        yield url


def test_model_field_is_a_name_not_a_path(ui_url, gguf):
    for model in (str(gguf), "../" + gguf.name, "/etc/passwd", gguf.stem + "/../x", "~"):
        r = httpx.post(f"{ui_url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", model


def test_cors_is_off_by_default_and_on_only_for_named_origins(tmp_path):
    from test_serve_api import ScriptBackend
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    http = TestClient(create_app(tmp_path, backend=ScriptBackend()))
    r = http.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = http.post("/v1/chat/completions", headers={"Origin": "https://evil.example"},
                  json={"messages": [{"role": "user", "content": "x"}]})
    assert "access-control-allow-origin" not in r.headers
    http = TestClient(create_app(tmp_path, backend=ScriptBackend(), cors_origins=["https://app.example"]))
    assert "access-control-allow-origin" not in http.options("/v1/chat/completions", headers=preflight).headers
    ok = http.options("/v1/chat/completions", headers={**preflight, "Origin": "https://app.example"})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    for bad in ("*", "app.example", "https://app.example/path"):
        with pytest.raises(ServeError, match="cors-origin"):
            create_app(tmp_path, backend=ScriptBackend(), cors_origins=[bad])


def test_serve_default_host_is_loopback():
    from typer.main import get_command

    from edgedistill.cli import app
    serve = get_command(app).commands["serve"]
    assert {p.name: p.default for p in serve.params}["host"] == "127.0.0.1"
    assert json.dumps(create_app.__kwdefaults__.get("cors_origins")) == "null"
