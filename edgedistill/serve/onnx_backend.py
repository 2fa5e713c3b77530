"""A `Backend` over an ONNX export: the chat template and tokenizer from the model folder, the
onnxruntime generation loop (`export/ort.py`) for the tokens."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import ServeError
from .backend import ChatResult, ContextLengthExceeded


class OnnxBackend:
    """`OnnxBackend(onnx_path, tokenizer_dir)`: chat completions with an ONNX (KV-cache) graph on the CPU."""

    def __init__(self, onnx_path: str | Path, tokenizer_dir: str | Path, *, n_ctx: int = 2048,
                 threads: int | None = None, name: str | None = None):
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
        self._lock = threading.Lock()

    def chat(self, messages: Sequence[Mapping[str, str]], *, max_tokens: int, temperature: float,
             top_p: float, stop: Sequence[str], seed: int | None) -> ChatResult:
        from ..export.ort import Sampling

        prompt = self._tok.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        prompt = list(prompt["input_ids"] if isinstance(prompt, Mapping) else prompt)
        if len(prompt) >= self.n_ctx:
            raise ContextLengthExceeded(f"the prompt has {len(prompt)} tokens; the context window is {self.n_ctx}. "
                                        "Shorten the messages.")
        budget = min(max_tokens, self.n_ctx - len(prompt))
        eos = [t for t in {self._tok.eos_token_id} if t is not None]
        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
        out: list[int] = []
        text, finish = "", "length"
        with self._lock:
            for tok in self._model.generate(prompt, budget, sampling, stop_ids=eos):
                if tok in eos:
                    finish = "stop"
                    break
                out.append(tok)
                text = self._tok.decode(out, skip_special_tokens=True)
                cut = min((text.find(s) for s in stop if s and s in text), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
        return ChatResult(text=text, finish_reason=finish, prompt_tokens=len(prompt), completion_tokens=len(out))
