"""A `Backend` over an ONNX export: the chat template and tokenizer from the model folder, the
onnxruntime generation loop (`export/ort.py`) for the tokens.

onnxruntime has no batched-sequence scheduler of ours yet, so requests run one at a time on a
worker thread, in arrival order; `start` returns at once like every backend's. Thinking, its budget
and the token log-probs follow the same contract as the llama.cpp engine (`engine.py`).
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
from .events import Event, Failed, Finished, SamplingParams
from .thinking import STOP_THINKING, ThinkTracker


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
        self._eos = {t for t in [self._tok.eos_token_id] if t is not None}
        self._stop_thinking = self._tok(STOP_THINKING, add_special_tokens=False)["input_ids"]
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
        with self._lock:
            self._waiting -= 1
            self._active += 1
        try:
            self._generate(ids, params, emit, handle)
        except Exception as e:  # the client gets a clean error, never a hang
            emit(Failed(f"onnxruntime generation failed: {e}"))
        finally:
            with self._lock:
                self._active -= 1

    def _generate(self, ids: list[int], params: SamplingParams, emit: Callable[[Event], None],
                  handle: _Cancel) -> None:
        """Sample token by token like the llama.cpp engine: follow the think block, and when its budget is spent
        feed the stop-thinking tokens in the same model call as the sampled token."""
        import numpy as np

        from ..export.ort import Sampling, sample_next

        sampling = Sampling(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
        rng = np.random.default_rng(sampling.seed)
        stream = TextStream(lambda toks: self._tok.decode(toks, skip_special_tokens=True), params.stop, emit)
        think = ThinkTracker(inside=params.think_open, budget=params.think_budget)
        limit = min(params.max_tokens, self.n_ctx - len(ids))
        logprobs: list[float] = []
        seq = self._model.decode(ids)
        while True:
            if handle.event.is_set():
                return
            logits = seq.logits
            tok = sample_next(logits, sampling, rng)
            if tok in self._eos:
                stream.flush()
                return emit(self._finished("stop", ids, stream, think, logprobs))
            if params.logprobs:  # of the model's own (temperature 1) distribution, as the other backends report
                m = logits.max()  # fp32 exponentials, a float64 sum: 0.1 ms over a 49k vocabulary (0.45 ms in fp64)
                logprobs.append(float(logits[tok] - m) - float(np.log(np.exp(logits - m).sum(dtype=np.float64))))
            stopped = stream.push(tok)
            think.token(stream.text)
            if stopped:  # the text held back in case it began a stop string is not sent
                return emit(self._finished("stop", ids, stream, think, logprobs))
            if len(stream.tokens) >= limit:
                stream.flush()
                return emit(self._finished("length", ids, stream, think, logprobs))
            fed = [tok]
            if think.over_budget:
                if len(ids) + len(stream.tokens) + len(self._stop_thinking) >= self.n_ctx:
                    stream.flush()
                    return emit(self._finished("length", ids, stream, think, logprobs))
                stream.insert(self._stop_thinking)
                think.closed_by_backend(len(stream.text))
                fed += self._stop_thinking
            seq.feed(fed)

    @staticmethod
    def _finished(reason: str, ids: list[int], stream: TextStream, think: ThinkTracker,
                  logprobs: list[float]) -> Finished:
        return Finished(reason, len(ids), len(stream.tokens), think.thinking_tokens, think.budget_hit,
                        tuple(logprobs))

    def load(self) -> dict[str, int]:
        return {"queue_depth": self._waiting, "active": self._active, "slots": 1}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
