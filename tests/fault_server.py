"""A real local "model server" speaking the OpenAI streaming API, with faults on demand.

`FaultyModelServer.mode` picks what the next requests get:
  ok          a complete stream: "po", "ng", finish_reason "stop", usage, [DONE]
  http500     HTTP 500 with an OpenAI error object          http429   HTTP 429 (rate limited)
  slow        headers only after `slow_s` seconds           stall     one chunk, then silence for `slow_s`
  cut         one chunk, then the connection is dropped (no terminating chunk)
  cut_clean   one chunk, then the body ends cleanly, without finish_reason or [DONE]
  garbage     one chunk, then a line that is not JSON       error     one chunk, then an SSE error event
A closed port (`closed_port()`) stands for a server that is down. The app runs under a real uvicorn
(live_server.serving) on a loopback port.
"""
from __future__ import annotations

import asyncio
import json
import socket

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODES = ("ok", "http500", "http429", "slow", "stall", "cut", "cut_clean", "garbage", "error")
FAULTS = MODES[1:]


def _chunk(delta: dict, finish: str | None = None, chat: bool = True) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish} if chat else \
        {"index": 0, "text": delta.get("content", ""), "finish_reason": finish}
    return f"data: {json.dumps({'choices': [choice]})}\n\n"


class FaultyModelServer:
    def __init__(self, model: str = "big-llm", slow_s: float = 30.0):
        self.mode, self.model, self.slow_s = "ok", model, slow_s
        self.calls = 0
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": self.model, "object": "model"}]})
        self.app.post("/v1/chat/completions")(self._handler(chat=True))
        self.app.post("/v1/completions")(self._handler(chat=False))

    def _handler(self, *, chat: bool):
        async def handle(request: Request):
            await request.json()
            self.calls += 1
            mode = self.mode
            if mode == "http500":
                return JSONResponse({"error": {"message": "internal failure", "type": "server_error"}}, 500)
            if mode == "http429":
                return JSONResponse({"error": {"message": "slow down", "type": "rate_limit_error"}}, 429)
            if mode == "slow":
                await asyncio.sleep(self.slow_s)

            async def body():
                yield _chunk({"role": "assistant", "content": "po"}, chat=chat)
                if mode == "stall":
                    await asyncio.sleep(self.slow_s)
                if mode == "cut":
                    raise ConnectionAbortedError("fault injected: drop the connection mid-stream")
                if mode == "cut_clean":
                    return
                if mode == "garbage":
                    yield "data: {not json\n\n"
                    return
                if mode == "error":
                    yield f"data: {json.dumps({'error': {'message': 'the model crashed'}})}\n\n"
                    return
                yield _chunk({"content": "ng"}, chat=chat)
                yield _chunk({}, "stop", chat=chat)
                yield f"data: {json.dumps({'choices': [], 'usage': {'prompt_tokens': 3, 'completion_tokens': 2}})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(body(), media_type="text/event-stream")
        return handle


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
