"""A `Backend` over an ONNX export: the chat template and tokenizer from the model folder, the
onnxruntime generation loop (`export/ort.py`) for the tokens.

onnxruntime has no batched-sequence scheduler of ours yet, so requests run one at a time on a
worker thread, in arrival order; `start` returns at once like every backend's.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..errors import ServeError
from .backend import Prompt
from .detok import TextStream, render_ids
from .engine import QueueFull
from .events import Delta, Event, Failed, Finished, SamplingParams


class _Cancel:
    def __init__(self) -> None:
        self.event = threading.Event()

    def cancel(self) -> None:
        self.event.set()


class OnnxBackend:
    """`OnnxBackend(onnx_path, tokenizer_dir)`: generation with an ONNX (KV-cache) graph on the CPU."""
    prefills = True

    def __init__(self, onnx_path: str | Path, tokenizer_dir: str | Path, *, n_ctx: int = 2048,
                 threads: int | None = None, name: str | None = None, max_queue: int = 64):
        from transformers import AutoTokenizer

        from ..errors import ExportError
        from ..export.ort import OnnxModel

        try:
            self._model = OnnxModel(onnx_path, threads=threads)
        except ExportError as e:
            raise ServeError(str(e)) from None
        try:
            self._tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        except (OSError, ValueError) as e:
            raise ServeError(f"no tokenizer in {tokenizer_dir} ({e}); pass the model folder the ONNX file was "
                             "exported from.") from None
        if not getattr(self._tok, "chat_template", None):
            raise ServeError(f"the tokenizer in {tokenizer_dir} has no chat template; cannot format messages.")
        self.name = name or Path(onnx_path).stem
        self.n_ctx = n_ctx
        self.max_queue = max_queue
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-backend")
        self._lock = threading.Lock()
        self._waiting = 0
        self._active = 0

    def render(self, prompt: Prompt) -> list[int]:
        return render_ids(self._tok, prompt, self.n_ctx)

    def start(self, prompt: Prompt, params: SamplingParams, emit: Callable[[Event], None]) -> _Cancel:
        ids = self.render(prompt)
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting; retry shortly.")
            self._waiting += 1
        handle = _Cancel()
        self._pool.submit(self._run, ids, params, emit, handle)
        return handle

    def _run(self, ids: list[int], params: SamplingParams, emit: Callable[[Event], None], handle: _Cancel) -> None:
        from ..export.ort import Sampling

        with self._lock:
            self._waiting -= 1
            self._active += 1
        try:
            eos = [t for t in {self._tok.eos_token_id} if t is not None]
            budget = min(params.max_tokens, self.n_ctx - len(ids))
            sampling = Sampling(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
            stream = TextStream(lambda toks: self._tok.decode(toks, skip_special_tokens=True), params.stop, emit)
            finish, by_stop_string = "length", False
            for tok in self._model.generate(ids, budget, sampling, stop_ids=eos):
                if handle.event.is_set():
                    return
                if tok in eos:
                    finish = "stop"
                    break
                if stream.push(tok):
                    finish, by_stop_string = "stop", True
                    break
            if not by_stop_string:  # the text held back in case it began a stop string is the answer's end
                stream.flush()
            emit(Finished(finish, len(ids), len(stream.tokens)))
        except Exception as e:  # the client gets a clean error, never a hang
            emit(Failed(f"onnxruntime generation failed: {e}"))
        finally:
            with self._lock:
                self._active -= 1

    def load(self) -> dict[str, int]:
        return {"queue_depth": self._waiting, "active": self._active, "slots": 1}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
