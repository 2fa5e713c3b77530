"""A GGUF file run by llama.cpp (llama-cpp-python): tokenization and full-sequence logits.

Evaluation uses this to measure what the exported file actually computes, so it
tokenizes the way transformers does (special tokens in the text are matched)
and returns logits for every position.
"""
from __future__ import annotations

import contextlib
import ctypes
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ExportError

KV_TYPES = {"f16": 1, "f32": 0}  # ggml_type ids for the KV cache


@contextlib.contextmanager
def _captured_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's warning/error log lines while the block runs (they explain load failures)."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []
    last = [0]

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != 5:  # 5 continues the previous message
            last[0] = level
        if last[0] in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


class LlamaCppModel:
    """`LlamaCppModel(path)`: `.tokenize(text)`, `.logits(tokens)` [len, vocab] float32, `.n_vocab`, `.close()`.

    kv_type="f32" keeps the attention cache in full precision (for bit-level comparisons with torch);
    the default "f16" is what llama.cpp serves with.
    """

    def __init__(self, path: str | Path, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512, kv_type: str = "f16"):
        import llama_cpp

        path = Path(path)
        if not path.is_file():
            raise ExportError(f"GGUF file {path} does not exist; run the export stage first.")
        if kv_type not in KV_TYPES:
            raise ExportError(f"kv_type '{kv_type}' unknown; expected one of {sorted(KV_TYPES)}.")
        self.path, self.n_ctx = path, n_ctx
        with _captured_llama_log() as log:
            try:
                self._llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_ubatch=min(n_batch, n_ctx),
                    n_threads=n_threads, n_threads_batch=n_threads, logits_all=True, verbose=False,
                    type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type], n_gpu_layers=0)
            except (ValueError, RuntimeError, OSError) as e:
                reason = "".join(log).strip() or str(e)
                raise ExportError(f"llama.cpp refused {path}: {reason}. The file is not a GGUF this llama.cpp "
                                  f"build can load; re-export it.") from None
        self.n_vocab: int = self._llm.n_vocab()
        self.eos_id: int = self._llm.token_eos()

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Like `hf_tokenizer.encode(text, add_special_tokens=add_special)`: special tokens in text are matched."""
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def detokenize(self, tokens: list[int]) -> str:
        return self._llm.detokenize(tokens, special=True).decode("utf-8", "replace")

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), n_vocab] for every position of one sequence (fresh context each call)."""
        if not tokens:
            return np.zeros((0, self.n_vocab), np.float32)
        if len(tokens) > self.n_ctx:
            raise ExportError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}; open the model with a "
                              f"larger n_ctx or evaluate shorter windows.")
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise ExportError(f"token ids {bad[:5]} are outside the vocabulary of {self.n_vocab}.")
        self._llm.reset()
        self._llm.eval(tokens)  # decodes in n_batch chunks, keeping every position's logits
        return np.array(self._llm.scores[: len(tokens)], dtype=np.float32, copy=True)

    def generate_greedy(self, prompt: list[int], max_tokens: int, stop_ids: set[int],
                        stop_text: str | None = None) -> tuple[list[int], list[float], str]:
        """Greedy tokens after `prompt`, their log-probs, and why it ended ("stop", "stop_text" or "length").

        The longest prefix shared with what is already in the KV cache is not computed again.
        """
        llm = self._llm
        if not prompt or len(prompt) + max_tokens > self.n_ctx:
            raise ExportError(f"prompt of {len(prompt)} tokens + {max_tokens} new ones does not fit the context of "
                              f"{self.n_ctx}; open the model with a larger n_ctx.")
        cached = llm.input_ids[: llm.n_tokens]
        k = 0
        while k < min(len(cached), len(prompt) - 1) and cached[k] == prompt[k]:
            k += 1
        llm.n_tokens = k
        llm.eval(prompt[k:])
        out: list[int] = []
        lps: list[float] = []
        for _ in range(max_tokens):
            row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            tok = int(row.argmax())
            if tok in stop_ids:
                return out, lps, "stop"
            m = row[tok]
            lps.append(float(-np.log(np.exp(row - m).sum())))  # log-softmax at the argmax
            out.append(tok)
            if stop_text and stop_text in self.detokenize(out[-8:]):
                return out, lps, "stop_text"
            llm.eval([tok])
        return out, lps, "length"

    def decode_tokens_per_s(self, n_tokens: int = 64, prompt: list[int] | None = None) -> float:
        """Greedy single-token decode speed after a short prompt (prefill excluded): 1 / the median step time,
        so a step the OS preempted on a shared machine does not count."""
        prompt = prompt or list(range(1, 33))
        self._llm.reset()
        self._llm.eval(prompt)
        tok = int(np.argmax(self._llm.scores[len(prompt) - 1]))
        steps = []
        for _ in range(n_tokens):
            t0 = time.perf_counter()
            self._llm.eval([tok])
            tok = int(np.argmax(self._llm.scores[self._llm.n_tokens - 1]))
            steps.append(time.perf_counter() - t0)
        return 1.0 / float(np.median(steps))

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
