"""What the server generates with: a `Backend` protocol, its llama.cpp implementation, and GGUF lookup.

The HTTP layer (`app.py`) only ever talks to a `Backend`, so other runtimes (a remote
OpenAI-compatible endpoint, a fake in tests) slot in without touching the routes.
"""
from __future__ import annotations

import contextlib
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ..artifacts import MANIFEST
from ..errors import ServeError
from .engine import BatchEngine, ContextLengthExceeded, QueueFull  # noqa: F401  (re-exported)
from .events import Delta, Event, Failed, Finished, SamplingParams


class Handle(Protocol):
    def cancel(self) -> None: ...


@dataclass(frozen=True)
class Prompt:
    """Either chat `messages` (the backend applies its chat template) or raw `text` to continue. `prefix` is
    the start of the assistant's answer, written after the template's generation prompt (e.g. "<think>\n")."""
    messages: tuple[Mapping[str, str], ...] | None = None
    text: str | None = None
    prefix: str = ""


class Backend(Protocol):
    """A text generator. `start` returns at once (raising QueueFull or ContextLengthExceeded for requests
    it cannot take) and reports progress through `emit`, which may be called from any thread."""

    name: str

    def start(self, prompt: Prompt, params: SamplingParams, emit: Callable[[Event], None]) -> Handle: ...

    def load(self) -> dict[str, int]:
        """{'queue_depth': waiting requests, 'active': requests generating, 'slots': capacity}."""
        ...

    def close(self) -> None: ...


class LlamaCppBackend:
    """One GGUF in llama.cpp, served by continuous batching (`BatchEngine`) across `slots` sequences."""
    prefills = True  # Prompt.prefix is written after the chat template's generation prompt

    def __init__(self, gguf_path: str | Path, *, slots: int = 8, ctx_per_slot: int = 2048,
                 n_threads: int | None = None, max_queue: int = 64, name: str | None = None):
        path = Path(gguf_path)
        if not path.is_file():
            raise ServeError(f"GGUF file {path} does not exist. Run `edgedistill build` first.")
        try:
            self.engine = BatchEngine(path, slots=slots, ctx_per_slot=ctx_per_slot, n_threads=n_threads,
                                      max_queue=max_queue)
        except (ValueError, RuntimeError):
            raise ServeError(f"llama.cpp could not load {path}: {_load_failure_reason(path)}. "
                             "Re-run the export stage, or pass a GGUF that llama.cpp accepts.") from None
        model = self.engine.model
        meta = model.metadata()

        def text_of(tok: int) -> str:
            return model.token_get_text(tok) if tok != -1 else ""
        template = meta.get("tokenizer.chat_template")
        # Without a template in the GGUF, ChatML: what our students are trained on (llama-cpp-python would
        # fall back to Llama-2 [INST] formatting instead).
        self.chat_template_source = "gguf" if template else "chatml"
        self._format = Jinja2ChatFormatter(template or CHATML, eos_token=text_of(model.token_eos()),
                                           bos_token=text_of(model.token_bos()))
        self.name = name or path.stem
        self.gguf_path = path
        self.n_ctx = ctx_per_slot

    def render(self, prompt: Prompt) -> list[int]:
        if prompt.messages is not None:
            out = self._format(messages=[dict(m) for m in prompt.messages])
            # The template may write BOS itself; otherwise the tokenizer adds it if the model asks for one.
            return self.engine.tokenize(out.prompt + prompt.prefix, add_bos=not out.added_special)
        return self.engine.tokenize(prompt.text or "", add_bos=True)

    def start(self, prompt: Prompt, params: SamplingParams, emit: Callable[[Event], None]) -> Handle:
        return self.engine.submit(self.render(prompt), params, emit)

    def load(self) -> dict[str, int]:
        return {"queue_depth": self.engine.queue_depth, "active": self.engine.active, "slots": self.engine.slots}

    def close(self) -> None:
        self.engine.close()


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def generate(backend: Backend, prompt: Prompt, params: SamplingParams, timeout: float = 300.0) -> tuple[str, Finished]:
    """Run one generation to the end on the calling thread (for scripts and tests)."""
    done = threading.Event()
    parts: list[str] = []
    result: list[Event] = []

    def emit(ev: Event) -> None:
        if isinstance(ev, Delta):
            parts.append(ev.text)
        else:
            result.append(ev)
            done.set()

    handle = backend.start(prompt, params, emit)
    if not done.wait(timeout):
        handle.cancel()
        raise ServeError(f"generation did not finish within {timeout:.0f} s")
    if isinstance(result[0], Failed):
        raise ServeError(result[0].message)
    return "".join(parts), result[0]


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
