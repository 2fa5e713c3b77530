"""Run an exported ONNX causal LM with onnxruntime on the CPU: logits and a generation loop.

Two graphs are understood (see `onnx.py`): `logits` (input_ids -> logits) and
`kv_cache` (input_ids + past_key_values.* -> logits + present.*). With a cache,
generation feeds one token per step; without, it recomputes the whole sequence.
Kept apart from `onnx.py` so that serving and evaluation load only
onnxruntime and numpy, never torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import ExportError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) cut to the top_p nucleus (and top_k)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


def sample_next(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / s.temperature
    order = np.argsort(-z)
    if s.top_k > 0:
        order = order[: s.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if s.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), s.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


class OnnxModel:
    """An onnxruntime session over a `logits` or `kv_cache` graph: `.logits(tokens)`, `.decode(prompt)` (a
    sequence extended step by step), `.generate(...)`."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"ONNX model {self.path} does not exist. "
                              "Run the export stage first, or pass the path of the .onnx file.")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own pybind types (Fail, InvalidProtobuf, ...)
            reason = " ".join(str(e).split())
            raise ExportError(f"onnxruntime refused {self.path}: {reason}. Expected a complete ONNX model "
                              "(with its .data file next to it, if any); re-run the export stage.") from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.past_inputs = [i for i in inputs if i.name.startswith("past_key_values.")]
        rest = [i for i in inputs if not i.name.startswith("past_key_values.")]
        if len(rest) != 1 or rest[0].type != "tensor(int64)" or not outputs:
            found = [(i.name, i.type) for i in inputs]
            raise ExportError(f"{self.path} has inputs {found}; expected int64 input_ids [batch, seq] (and "
                              "past_key_values.* for a KV-cache graph). Export it with "
                              "edgedistill.export.onnx.export_onnx.")
        self.input_name = rest[0].name
        self.output_name = outputs[0].name
        self.present_names = [o.name for o in outputs[1:]]
        if len(self.present_names) != len(self.past_inputs):
            raise ExportError(f"{self.path} has {len(self.past_inputs)} past inputs but {len(self.present_names)} "
                              "present outputs; it is not a KV-cache graph this runner understands.")
        vocab = outputs[0].shape[-1] if outputs[0].shape else None
        self.n_vocab: int | None = vocab if isinstance(vocab, int) else None
        if self.past_inputs:
            shape = self.past_inputs[0].shape  # [batch, kv_heads, past, head_dim]
            self._kv_heads, self._head_dim = int(shape[1]), int(shape[3])
            self._kv_dtype = np.float16 if self.past_inputs[0].type == "tensor(float16)" else np.float32

    @property
    def has_cache(self) -> bool:
        return bool(self.past_inputs)

    def _check_ids(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise ExportError(f"tokens of shape {ids.shape}; expected a non-empty 1-D sequence or a 2-D "
                              "[batch, seq] array of token ids.")
        if self.n_vocab is not None and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise ExportError(f"token ids must lie in [0, {self.n_vocab}); got min {ids.min()} max "
                              f"{ids.max()}. Encode with the tokenizer that was exported with this model.")
        return ids

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self._kv_heads, 0, self._head_dim), self._kv_dtype) for _ in self.past_inputs]

    def step(self, ids: np.ndarray, cache: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: logits [B, T, V] for `ids` [B, T] after `cache`, and the extended cache."""
        feed: dict[str, Any] = {self.input_name: np.ascontiguousarray(ids)}
        if self.has_cache:
            cache = cache if cache is not None else self.empty_cache(ids.shape[0])
            feed.update({i.name: c for i, c in zip(self.past_inputs, cache)})
        try:
            out: Any = self.session.run(None, feed)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnxruntime failed on input of shape {ids.shape} with {self.path}: "
                              f"{' '.join(str(e).split())}. Check the sequence fits the model's context.") from e
        if self.n_vocab is None:
            self.n_vocab = int(out[0].shape[-1])
        return out[0], list(out[1:])

    def logits(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits for every position: [T, V] for a 1-D token list, [B, T, V] for a 2-D batch."""
        ids = self._check_ids(tokens)
        out, _ = self.step(ids[None] if ids.ndim == 1 else ids)
        return out[0] if ids.ndim == 1 else out

    def decode(self, prompt: Sequence[int]) -> "Decoding":
        """One sequence to extend step by step: the prompt is run now; `.logits` predict the next token."""
        ids = self._check_ids(prompt)
        if ids.ndim != 1:
            raise ExportError("decode and generate take one prompt (a 1-D token list).")
        return Decoding(self, ids.tolist())

    def generate(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Yield up to `max_new_tokens` tokens after `prompt`, stopping after a token in `stop_ids`."""
        d = self.decode(prompt)
        rng = np.random.default_rng(sampling.seed)
        for _ in range(max_new_tokens):
            tok = sample_next(d.logits, sampling, rng)
            yield tok
            if tok in stop_ids:
                return
            d.feed([tok])

    def decode_tokens_per_s(self, n_tokens: int = 64, prompt: Sequence[int] | None = None) -> float:
        """Greedy decode speed after a short prompt (prefill excluded): 1 / the median step time."""
        prompt = list(prompt or range(1, 33))
        gen = self.generate(prompt, n_tokens + 1)
        next(gen)  # prefill and the first token
        steps = []
        t0 = time.perf_counter()
        for _ in gen:
            t1 = time.perf_counter()
            steps.append(t1 - t0)
            t0 = t1
        return 1.0 / float(np.median(steps))


class Decoding:
    """A sequence being generated: `logits` [V] for its next token, `feed(tokens)` to append any number of
    tokens (a sampled one, or several the caller writes itself) in one model call. With a KV-cache graph
    only the new tokens are computed; with a `logits` graph the whole sequence is run again."""

    def __init__(self, model: OnnxModel, prompt: list[int]):
        self.model, self.tokens = model, list(prompt)
        out, self._cache = model.step(np.array([self.tokens], np.int64))
        self.logits: np.ndarray = out[0, -1]

    def feed(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)
        if self.model.has_cache:
            out, self._cache = self.model.step(np.array([list(tokens)], np.int64), self._cache)
        else:
            out, _ = self.model.step(np.array([self.tokens], np.int64))
        self.logits = out[0, -1]
