"""An OpenAI-compatible HTTP server over one `Backend`.

Layout: `schemas.py` validates requests and shapes responses; `ChatService` (service.py) holds
the policy and turns backend events into completions and server-sent events; this module only
wires routes, the request middleware (request ids, body limit, metrics, access log) and the
error handlers. Every failure leaves as an OpenAI error object, so `openai` clients raise their
usual typed exceptions.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Awaitable

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ServeError
from .backend import Backend, LlamaCppBackend, pick_gguf
from .schemas import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ErrorResponse, Health,
                      ModelCard, ModelList, Readiness)
from .route import route_headers
from .service import ApiError, ChatService

log = logging.getLogger(__name__)
access_log = logging.getLogger("edgedistill.serve.access")

MAX_BODY_BYTES = 1 << 20
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---------------------------------------------------------------- dependencies and routes
def get_service(request: Request) -> ChatService:
    return request.app.state.service


def require_api_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    expected: str | None = request.app.state.api_key
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(401, "missing or incorrect API key; send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


Service = Annotated[ChatService, Depends(get_service)]
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429)}

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)


@v1.get("/models")
def list_models(service: Service) -> ModelList:
    return service.models()


@v1.get("/models/{model_id}")
def retrieve_model(model_id: str, service: Service) -> ModelCard:
    return service.model(model_id)


@v1.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(req: ChatCompletionRequest, service: Service, request: Request, response: Response) -> Any:
    run = service.start_chat(req)
    if req.stream:
        return StreamingResponse(service.stream_chat(run, include_usage=req.include_usage),
                                 media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **route_headers(run.route, final=False)})
    answer = await _unless_disconnected(request, service.chat_completion(run))
    response.headers.update(route_headers(answer.edgedistill))
    return answer


@v1.post("/completions", response_model=Completion)
async def completions(req: CompletionRequest, service: Service, request: Request) -> Any:
    gen = service.start_completion(req)
    if req.stream:
        return StreamingResponse(service.stream(gen, include_usage=req.include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    return await _unless_disconnected(request, service.completion(gen))


async def _unless_disconnected(request: Request, answer: Awaitable[Any], poll_s: float = 0.5) -> Any:
    """Await `answer`, but give its slot back if the client hangs up first (nobody would read the result)."""
    task = asyncio.ensure_future(answer)
    while not task.done():
        await asyncio.wait({task}, timeout=poll_s)
        if not task.done() and await request.is_disconnected():
            # The generation's cleanup (its slot given back) has run before we answer. Cancel again if a
            # cancellation was swallowed on the way (asyncio primitives have done that).
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=poll_s)
            raise ApiError(499, "the client closed the connection", code="client_closed_request")
    return task.result()


probes = APIRouter()


@probes.get("/health")
def get_health() -> Health:
    """Alive: the process answers."""
    return Health()


@probes.get("/ready", responses={503: {"model": Readiness}})
def get_ready(service: Service) -> Any:
    """Ready: the model is loaded and the engine takes requests."""
    ready = Readiness(status="ready", model=service.model_id)
    return ready if getattr(service.backend, "ready", True) else JSONResponse(
        ready.model_copy(update={"status": "loading"}).model_dump(), status_code=503)


@probes.get("/metrics", response_class=PlainTextResponse)
def get_metrics(service: Service) -> PlainTextResponse:
    return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")


# ---------------------------------------------------------------- request middleware
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContext:
    """Pure ASGI middleware (it must not buffer streams): an X-Request-Id on every response, the body size
    limit, per-route request counts and latency, and one structured access-log line (no headers, so no keys)."""

    def __init__(self, app: Any, *, service: ChatService, max_body_bytes: int, log_prompts: bool = False):
        self.app, self.service, self.max_body_bytes = app, service, max_body_bytes
        self.log_prompts = log_prompts  # request bodies (prompts) in the access log only when asked

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        status = [500]
        logged_body: list[bytes | None] = [None]

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self._record(scope, status[0], started, request_id, logged_body[0])

        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(send_with_id)
        # The body is read here, bounded, whatever the framing (a chunked body has no Content-Length to check),
        # then handed on in one piece; later receive() calls go to the server (disconnect detection).
        chunks, size = [], 0
        while scope.get("method") in ("POST", "PUT", "PATCH"):
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return await self._too_large(send_with_id)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = [False]

        async def replay_receive() -> dict:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        logged_body[0] = body if self.log_prompts else None
        await self.app(scope, replay_receive, send_with_id)

    async def _too_large(self, send: Any) -> None:
        body = ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                        code="request_too_large").body.model_dump_json().encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope: dict, status: int, started: float, request_id: str, body: bytes | None) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        elapsed = time.perf_counter() - started
        self.service.metrics.requests.inc(route, str(status))
        self.service.metrics.latency.observe(elapsed, route)
        line = {"request_id": request_id, "method": scope.get("method"), "path": scope.get("path"),
                "route": route, "status": status, "duration_s": round(elapsed, 4)}
        if body:
            line["body"] = body.decode("utf-8", "replace")
        access_log.info(json.dumps(line))


# ---------------------------------------------------------------- errors as OpenAI error objects
def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    body = ApiError(status, message, param=param, code=code, type=type).body
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and (part in UNION_TAGS or "[" in part):
            continue  # pydantic names the union member it tried ('str', 'list[str]'): not a field
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.status, headers=exc.headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return _error(400, f"the request body is not valid JSON ({detail})".replace(" ()", ""), code="invalid_json")
    if first["type"] == "missing" and tuple(first["loc"]) == ("body",):
        return _error(400, "the request body is missing; send a JSON object", code="invalid_request")
    param = _param(tuple(first["loc"]))
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if first["type"] == "missing":
        message = f"'{param}' is required"
    else:
        message = f"invalid {repr(param) if param else 'request body'}: {first['msg'].removeprefix('Value error, ')}"
    return _error(400, message + more, param=param, code="invalid_value")


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("chat request failed")
    return _error(500, f"the server failed to handle the request: {type(exc).__name__}: {exc}",
                  type="server_error")


# ---------------------------------------------------------------- assembly
def create_app(target: Path, *, api_key: str | None = None, max_tokens_cap: int = 1024,
               backend: Backend | None = None, slots: int | None = None, ctx_per_slot: int | None = None,
               n_threads: int | None = None, max_queue: int = 64, max_body_bytes: int = MAX_BODY_BYTES,
               ui: bool = False, llm: str | None = None, llm_api_key: str | None = None,
               llm_model: str | None = None, policy: Any = None, small_timeout_s: float = 120.0, large_timeout_s: float = 120.0,
               stall_timeout_s: float | None = 600.0, cors_origins: list[str] | None = None,
               log_prompts: bool = False, backend_kind: str | None = None, device: str | None = None,
               workers: int = 1) -> FastAPI:
    """The app serving `target` (a build folder or a .gguf file); pass `backend` to serve something else.

    `slots` requests generate at once (continuous batching), each with up to `ctx_per_slot` tokens of
    context; `max_queue` more wait, and beyond that requests get a 429 with Retry-After. `ui` mounts the
    Gradio chat page at /ui. `llm` adds a second, larger model: an OpenAI-compatible base URL (with
    `llm_api_key`; `llm_model` names its model, else the first of its /models, read at start) or another
    build folder / GGUF: chat requests for the default model are then routed,
    escalating to it when the small model is unsure or fails (route.py). The routing `policy` is the
    build's router.json when there is one, else `RoutingPolicy.default()`; each model gets
    `small_timeout_s` / `large_timeout_s` to answer before that counts as a failure. `backend_kind`
    (llamacpp | onnx | transformers), `device` (a profile: its file, threads, context and slots) and
    `workers` (instances) go to `serve.select.plan_serving`; with `device`, `slots` / `ctx_per_slot` /
    `n_threads` of None take the profile's values.
    A generation that sends nothing for `stall_timeout_s` ends in a 504 error. CORS is off unless `cors_origins`
    names the origins (no wildcard) that browsers may call from; request bodies (prompts) reach the access log
    only with `log_prompts`."""
    origins = _cors_origins(cors_origins)
    target = Path(target)
    policy = policy if policy is not None else _routing_policy(target)  # a bad router.json fails before loading
    if backend is None:
        from .select import open_backend, plan_serving
        plan = plan_serving(target, backend=backend_kind, device=device, slots=slots, ctx=ctx_per_slot,
                            threads=n_threads, workers=workers)
        log.info("serving %s", plan.describe())
        backend = open_backend(plan, max_queue=max_queue)
    fallback = _fallback_backend(llm, llm_api_key, n_threads=n_threads, timeout=large_timeout_s,
                                 model=llm_model) if llm else None
    service = ChatService(backend, max_tokens_cap=max_tokens_cap, fallback=fallback,
                          policy=policy, stall_timeout_s=stall_timeout_s,
                          small_timeout_s=small_timeout_s, large_timeout_s=large_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for b in service.backends.values():
            b.close()

    app = FastAPI(title="edgedistill", summary=f"OpenAI-compatible API for {backend.name}", lifespan=lifespan)
    app.state.service = service
    app.state.api_key = api_key
    app.include_router(probes)
    app.include_router(v1)
    if origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"])
    app.add_middleware(RequestContext, service=service, max_body_bytes=max_body_bytes, log_prompts=log_prompts)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
    if ui:
        from .demo import mount_demo
        mount_demo(app, api_key=api_key, model=backend.name)
    return app


def _cors_origins(origins: list[str] | None) -> list[str]:
    out = []
    for o in origins or []:
        if o == "*" or not re.fullmatch(r"https?://[^/\s*]+", o.rstrip("/")):
            raise ServeError(f"--cors-origin {o!r} is not an origin; name each one explicitly, like "
                             "https://app.example.com (scheme and host, no path, no wildcard).")
        out.append(o.rstrip("/"))
    return out


def _routing_policy(target: Path) -> Any:
    """The build's router.json (a bad one is an error naming the field), else the uncalibrated default."""
    from ..routing.policy import ROUTER_FILE, RoutingPolicy

    path = target / ROUTER_FILE if target.is_dir() else target.parent / ROUTER_FILE
    if path.is_file():
        return RoutingPolicy.load(path)
    log.info("no %s next to %s: routing with the uncalibrated default policy", ROUTER_FILE, target)
    return RoutingPolicy.default()


def _fallback_backend(llm: str, api_key: str | None, *, n_threads: int | None, timeout: float = 120.0,
                      model: str | None = None) -> Backend:
    if llm.startswith(("http://", "https://")):
        from .remote import RemoteBackend
        return RemoteBackend(llm, model=model, api_key=api_key, timeout=timeout)
    if model is not None:
        raise ServeError(f"--llm-model names a model at a remote URL; --llm {llm!r} is a local build or GGUF "
                         "(its name comes from the file). Drop --llm-model.")
    gguf = pick_gguf(Path(llm))
    name = Path(llm).resolve().name if Path(llm).is_dir() else f"llm-{gguf.stem}"  # like the default model's
    return LlamaCppBackend(gguf, slots=2, n_threads=n_threads, name=name)


def run_server(target: Path, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
               **kw: Any) -> None:
    """Serve `target` with uvicorn until interrupted; `kw` goes to `create_app`."""
    import uvicorn

    app = create_app(Path(target), **kw)
    _log_to_stderr(log_level)
    if kw.get("api_key") is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    if kw.get("ui"):
        log.warning("chat page: http://%s:%d/ui", host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _log_to_stderr(level: str) -> None:
    """Our loggers (access log, errors) print next to uvicorn's; neither ever sees a request's headers."""
    logger = logging.getLogger("edgedistill")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else logging.INFO)
