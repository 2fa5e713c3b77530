"""An OpenAI-compatible HTTP server over one `Backend`.

Layout: the pydantic models validate requests and shape responses; `ChatService` holds the
policy (which model id, the max_tokens cap, what is not supported yet); the routes only wire
the two together. Every failure leaves as an OpenAI error object, so `openai` clients raise
their usual typed exceptions.
"""
from __future__ import annotations

import logging
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ServeError
from .backend import Backend, ContextLengthExceeded, LlamaCppBackend, pick_gguf

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
DEFAULT_TEMPERATURE = 1.0  # OpenAI's defaults, so clients that omit them get what they expect
DEFAULT_TOP_P = 1.0


# ---------------------------------------------------------------- request / response models
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request we honour; unknown fields are ignored."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer clients' name for max_tokens
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1)
    stream: bool | None = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(s == "" for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edgedistill"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ApiError(Exception):
    """A request the server answers with an OpenAI error object instead of a completion."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))


# ---------------------------------------------------------------- policy
class ChatService:
    """What the server agrees to do with a request, and how backend results become API objects."""

    def __init__(self, backend: Backend, *, max_tokens_cap: int):
        if max_tokens_cap < 1:
            raise ServeError(f"max_tokens_cap must be at least 1, got {max_tokens_cap}.")
        self.backend = backend
        self.max_tokens_cap = max_tokens_cap
        self.created = int(time.time())

    @property
    def model_id(self) -> str:
        return self.backend.name

    def models(self) -> ModelList:
        return ModelList(data=[self.model(self.model_id)])

    def model(self, model_id: str) -> ModelCard:
        self._check_model(model_id)
        return ModelCard(id=self.model_id, created=self.created)

    def complete(self, req: ChatCompletionRequest) -> ChatCompletion:
        if req.model is not None:
            self._check_model(req.model)
        if req.stream:
            raise ApiError(400, "streaming is not supported yet; send stream=false", param="stream",
                           code="unsupported_parameter")
        max_tokens = req.requested_max_tokens or self.max_tokens_cap
        if max_tokens > self.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {max_tokens}, but this server allows at most "
                                f"{self.max_tokens_cap}", param="max_tokens", code="invalid_value")
        try:
            result = self.backend.chat(
                [m.model_dump() for m in req.messages], max_tokens=max_tokens,
                temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
                top_p=DEFAULT_TOP_P if req.top_p is None else req.top_p,
                stop=req.stop or [], seed=req.seed)
        except ContextLengthExceeded as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_id,
            choices=[Choice(index=0, message=AssistantMessage(content=result.text),
                            finish_reason=result.finish_reason)],
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        total_tokens=result.prompt_tokens + result.completion_tokens),
        )

    def _check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise ApiError(404, f"the model '{model_id}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")


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
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 404)}

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)


@v1.get("/models")
def list_models(service: Service) -> ModelList:
    return service.models()


@v1.get("/models/{model_id}")
def retrieve_model(model_id: str, service: Service) -> ModelCard:
    return service.model(model_id)


@v1.post("/chat/completions")
def chat_completions(req: ChatCompletionRequest, service: Service) -> ChatCompletion:
    # A plain `def`: FastAPI runs it in a worker thread, so generation never blocks the event loop.
    return service.complete(req)


health = APIRouter()


@health.get("/health")
def get_health() -> Health:
    return Health()


# ---------------------------------------------------------------- errors as OpenAI error objects
def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    body = ApiError(status, message, param=param, code=code, type=type).body
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.status)


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
               backend: Backend | None = None, n_ctx: int = 2048, n_threads: int | None = None) -> FastAPI:
    """The app serving `target` (a build folder or a .gguf file); pass `backend` to serve something else."""
    target = Path(target)
    if backend is None:
        gguf = pick_gguf(target)
        name = target.resolve().name if target.is_dir() else gguf.stem
        backend = LlamaCppBackend(gguf, n_ctx=n_ctx, n_threads=n_threads, name=name)
    app = FastAPI(title="edgedistill", summary=f"OpenAI-compatible chat API for {backend.name}")
    app.state.service = ChatService(backend, max_tokens_cap=max_tokens_cap)
    app.state.api_key = api_key
    app.include_router(health)
    app.include_router(v1)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
    return app


def run_server(target: Path, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
               **kw: Any) -> None:
    """Serve `target` with uvicorn until interrupted; `kw` goes to `create_app`."""
    import uvicorn

    app = create_app(Path(target), **kw)
    if kw.get("api_key") is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
