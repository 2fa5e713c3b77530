"""What the server generates with: a `Backend` protocol, its llama.cpp implementation, and GGUF lookup.

The HTTP layer (`app.py`) only ever talks to a `Backend`, so other runtimes (ONNX, a
batched engine, a fake in tests) slot in without touching the routes.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Protocol, Sequence

from ..artifacts import MANIFEST
from ..errors import ServeError

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class ContextLengthExceeded(ServeError):
    """The prompt alone does not fit the backend's context window (a client error, not a server fault)."""


class Backend(Protocol):
    """A chat model. `name` is the model id the server advertises."""

    name: str

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int, temperature: float,
             top_p: float, stop: Sequence[str], seed: int | None) -> ChatResult: ...


class LlamaCppBackend:
    """One GGUF loaded into llama.cpp; calls are serialised by a lock (llama.cpp contexts are not thread-safe)."""

    def __init__(self, gguf_path: str | Path, n_ctx: int = 2048, n_threads: int | None = None,
                 *, name: str | None = None):
        try:
            from llama_cpp import Llama
        except ImportError as e:  # pragma: no cover - the install pins it
            raise ServeError(f"llama-cpp-python is not importable ({e}). Run `make setup`.") from None
        path = Path(gguf_path)
        if not path.is_file():
            raise ServeError(f"GGUF file {path} does not exist. Run `edgedistill build` first.")
        try:
            self._llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        except (ValueError, RuntimeError):
            raise ServeError(f"llama.cpp could not load {path}: {_load_failure_reason(path)}. "
                             "Re-run the export stage, or pass a GGUF that llama.cpp accepts.") from None
        # llama-cpp-python builds a handler from `tokenizer.chat_template` itself; without one it
        # would fall back to Llama-2 [INST] formatting, which our students were never trained on.
        self.chat_template_source = "gguf" if "tokenizer.chat_template" in self._llm.metadata else "chatml"
        if self.chat_template_source == "chatml":
            self._llm.chat_format = "chatml"
        self.name = name or path.stem
        self.gguf_path = path
        self.n_ctx = n_ctx
        self._lock = threading.Lock()

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int, temperature: float,
             top_p: float, stop: Sequence[str], seed: int | None) -> ChatResult:
        # Unseeded, llama-cpp-python derives the seed from the previous call's, so one seeded request would
        # make every later "random" one predictable; draw a fresh seed instead.
        seed = random.getrandbits(32) if seed is None else seed & 0xFFFFFFFF
        with self._lock:
            try:
                out = self._llm.create_chat_completion(
                    messages=[dict(m) for m in messages], max_tokens=max_tokens, temperature=temperature,
                    top_p=top_p, stop=list(stop) or None, seed=seed, stream=False)
            except ValueError as e:
                if "exceed context window" in str(e):
                    raise ContextLengthExceeded(
                        f"the prompt is longer than the model's context window of {self.n_ctx} tokens; "
                        "shorten the messages") from None
                raise
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return ChatResult(
            text=choice["message"].get("content") or "",
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )


def _load_failure_reason(path: Path) -> str:
    """llama.cpp says why a load failed only in its log, which verbose=False discards: load once more to read it."""
    from llama_cpp import Llama

    log = io.StringIO()
    with contextlib.redirect_stderr(log):  # llama-cpp-python prints llama.cpp's log lines to sys.stderr
        try:
            Llama(model_path=str(path), n_ctx=16, verbose=True).close()
        except (ValueError, RuntimeError):
            pass
    errors = [line.strip() for line in log.getvalue().splitlines() if "error" in line.lower()]
    return errors[0] if errors else "llama.cpp logged no reason"


# ---------------------------------------------------------------- finding the GGUF to serve
def pick_gguf(target: str | Path) -> Path:
    """The GGUF to serve from a build folder (q8_0 preferred, else any GGUF the export stage wrote),
    or `target` itself when it is a `.gguf` file."""
    target = Path(target)
    if target.is_file():
        if target.suffix.lower() != ".gguf":
            raise ServeError(f"{target} is not a .gguf file. Pass a build folder (out/<name>/) or a GGUF file.")
        return target.resolve()
    if not target.is_dir():
        raise ServeError(f"{target} does not exist. Run `edgedistill build --out {target}` first, "
                         "or pass an existing .gguf file.")
    root = target.resolve()
    outputs = _export_outputs(root)
    ggufs = [o for o in outputs if str(o.get("path", "")).lower().endswith(".gguf")]
    if not ggufs:
        raise ServeError(f"the build folder {target} has no GGUF export in its {MANIFEST}. "
                         f"Run `edgedistill build --out {target}` (with GGUF export enabled) first.")
    ggufs.sort(key=lambda o: "q8_0" not in Path(o["path"]).name.lower())  # stable: manifest order otherwise
    chosen = ggufs[0]
    path = (root / chosen["path"]).resolve()
    if Path(chosen["path"]).is_absolute() or not path.is_relative_to(root):
        raise ServeError(f"{MANIFEST} in {target} lists {chosen['path']!r}, which lies outside the build folder. "
                         "Refusing to serve it; rebuild the folder with `edgedistill build`.")
    if not path.is_file():
        raise ServeError(f"{chosen['path']} is listed in {target / MANIFEST} but missing on disk. "
                         f"Run `edgedistill build --out {target}` again.")
    if "bytes" in chosen and path.stat().st_size != chosen["bytes"]:
        raise ServeError(f"{path} has {path.stat().st_size} bytes but the manifest says {chosen['bytes']}; "
                         f"the file was altered. Run `edgedistill build --out {target}` again.")
    return path


def _export_outputs(root: Path) -> list[dict]:
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise ServeError(f"{root} has no {MANIFEST}, so it is not a build folder. "
                         f"Run `edgedistill build --out {root}` first, or pass a .gguf file.")
    try:
        data = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServeError(f"{manifest} is not valid JSON ({e}). Rebuild with `edgedistill build`.") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    export = stages.get("export") if isinstance(stages, dict) else None
    outputs = export.get("outputs") if isinstance(export, dict) else None
    if not isinstance(outputs, list):
        raise ServeError(f"{manifest} records no finished export stage. "
                         f"Run `edgedistill build --out {root}` first.")
    return [o for o in outputs if isinstance(o, dict) and isinstance(o.get("path"), str)]
