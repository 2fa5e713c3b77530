"""A `Backend` over a Hugging Face model folder in PyTorch (transformers), for models or hosts without
llama.cpp / onnxruntime files, and as the reference the exported runtimes are compared against.

One worker thread generates for a batch of up to `slots` requests at once: the prompts are
left-padded into one prefill, then every step decodes one token for each sequence still running,
with one KV cache (`DynamicCache`) for the batch. Sequences that finish (or whose client hung up)
leave the batch at once; requests that arrive meanwhile wait for the next batch. Each request
samples with its own seeded generator, so its text does not depend on what it was batched with.

Thinking follows the llama.cpp engine's contract (`engine.py`): each sequence follows its <think> block
and, when the block's budget is spent, the stop-thinking tokens are fed into that row one per step in
place of a sampled token (the row's logits for those steps are not sampled, its generator not drawn
from), while the other rows of the batch go on sampling.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ServeError
from .backend import Prompt
from .detok import TextStream, render_ids
from .engine import QueueFull
from .events import Event, Failed, Finished, SamplingParams
from .thinking import STOP_THINKING, ThinkTracker


@dataclass(eq=False)
class _Request:
    ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class TransformersBackend:
    """`TransformersBackend(model_dir)`: batched KV-cache generation with transformers on the CPU (or `device`)."""
    prefills = True  # Prompt.prefix is written after the chat template's generation prompt

    def __init__(self, model_dir: str | Path, *, slots: int = 8, n_ctx: int = 2048, n_threads: int | None = None,
                 max_queue: int = 64, name: str | None = None, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ServeError(f"{model_dir} has no config.json; the transformers backend needs a Hugging Face model "
                             "folder (a build's student/ or compressed/model/).")
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir))
            self._model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device).eval()
        except (OSError, ValueError) as e:
            raise ServeError(f"transformers could not load {model_dir}: {e}. Pass a model folder with config.json, "
                             "weights and tokenizer files.") from None
        if not getattr(self._tok, "chat_template", None):
            raise ServeError(f"the tokenizer in {model_dir} has no chat template; cannot format messages.")
        self._torch, self._device = torch, device
        eos = self._model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self._eos = {t for t in [*eos, self._tok.eos_token_id] if t is not None}
        self._stop_thinking = self._tok(STOP_THINKING, add_special_tokens=False)["input_ids"]
        self._pad = next(t for t in (self._tok.pad_token_id, self._tok.eos_token_id, 0) if t is not None)
        self.name = name or model_dir.name
        self.model_dir = model_dir
        self.n_ctx, self.slots, self.max_queue = n_ctx, slots, max_queue
        self._waiting: queue.Queue[_Request | None] = queue.Queue()
        self._active = 0
        self._running: list[_Request] = []
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="transformers-backend", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------ the Backend protocol
    def render(self, prompt: Prompt) -> list[int]:
        return render_ids(self._tok, prompt, self.n_ctx)

    def start(self, prompt: Prompt, params: SamplingParams, emit: Callable[[Event], None]) -> _Request:
        ids = self.render(prompt)
        if not ids:
            ids = [self._pad]
        if self._waiting.qsize() >= self.max_queue:
            raise QueueFull(f"{self._waiting.qsize()} requests are waiting; retry shortly.")
        req = _Request(ids, params, emit)
        self._waiting.put(req)
        return req

    def load(self) -> dict[str, int]:
        return {"queue_depth": self._waiting.qsize(), "active": self._active, "slots": self.slots}

    def close(self) -> None:
        self._closed = True
        for r in list(self._running):  # the running batch stops at its next step
            r.cancel()
        self._waiting.put(None)
        self._worker.join(timeout=30)

    # ------------------------------------------------------------ the generation loop
    def _loop(self) -> None:
        while not self._closed:
            first = self._waiting.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.slots:
                try:
                    nxt = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._closed = True
                    break
                batch.append(nxt)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if not batch:
                continue
            self._active, self._running = len(batch), batch
            try:
                with self._torch.inference_mode():
                    self._generate(batch)
            except Exception as e:  # the clients get a clean error, never a hang
                for r in batch:
                    r.emit(Failed(f"transformers generation failed: {type(e).__name__}: {e}"))
            finally:
                self._active, self._running = 0, []

    def _generate(self, batch: list[_Request]) -> None:
        torch = self._torch
        from transformers import DynamicCache

        width = max(len(r.ids) for r in batch)
        ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding: every prompt ends at the same column
            ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            mask[i, width - len(r.ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        live = [_Sequence(r, self._tok, self._device, self._stop_thinking) for r in batch]
        cache = DynamicCache()
        dev = self._device
        ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
        while live:
            out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=True)
            logits = out.logits[:, -1, :].float()
            cache = out.past_key_values
            keep, next_ids = [], []
            for row, seq in enumerate(live):
                if seq.forced:  # a token the backend writes itself: fed instead of sampled
                    if not seq.req.cancelled.is_set():
                        keep.append(row)
                        next_ids.append(seq.forced.pop(0))
                    continue
                tok = seq.sample(logits[row])
                if seq.advance(tok, self._eos, self.n_ctx):
                    keep.append(row)
                    next_ids.append(tok)
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, device=dev)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                live = [live[i] for i in keep]
            ids = torch.tensor(next_ids, device=dev)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1


class _Sequence:
    """One request inside a running batch: its sampler, its text stream and when it is done."""

    def __init__(self, req: _Request, tok: Any, device: str, stop_thinking: list[int]):
        import torch

        self.req, self.params = req, req.params
        self.stream = TextStream(lambda toks: tok.decode(toks, skip_special_tokens=True), req.params.stop, req.emit)
        self.generator = torch.Generator(device=device).manual_seed(req.params.seed)
        self.logprobs: list[float] = []
        self.last_logprob: float | None = None
        self.think = ThinkTracker(inside=req.params.think_open, budget=req.params.think_budget)
        self.stop_thinking = stop_thinking
        self.forced: list[int] = []  # inserted tokens still to feed, one per step

    def sample(self, logits: Any) -> int:
        tok = self._sample(logits)
        if self.params.logprobs:  # of the model's distribution, as the llama.cpp engine reports
            import torch
            self.last_logprob = float(torch.log_softmax(logits, dim=-1)[tok])
        return tok

    def _sample(self, logits: Any) -> int:
        import torch

        p = self.params
        if p.temperature <= 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = int(torch.searchsorted(torch.cumsum(sorted_p, 0), torch.tensor(p.top_p)).item()) + 1
            probs = torch.zeros_like(probs).scatter_(0, order[:keep], sorted_p[:keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def advance(self, tok: int, eos: set[int], n_ctx: int) -> bool:
        """Take the sampled token; False once the sequence is finished (and its Finished event sent)."""
        req, stream = self.req, self.stream
        if req.cancelled.is_set():
            return False
        if tok in eos:  # the end-of-sequence token is no completion token and gets no log-prob (as in the engine)
            stream.flush()
            self.finish("stop")
            return False
        if self.last_logprob is not None:
            self.logprobs.append(self.last_logprob)
        stopped = stream.push(tok)
        self.think.token(stream.text)
        if stopped:
            self.finish("stop")
            return False
        if len(stream.tokens) >= min(self.params.max_tokens, n_ctx - len(req.ids)):
            stream.flush()
            self.finish("length")
            return False
        if self.think.over_budget:
            if len(req.ids) + len(stream.tokens) + len(self.stop_thinking) >= n_ctx:
                stream.flush()
                self.finish("length")
                return False
            stream.insert(self.stop_thinking)
            self.think.closed_by_backend(len(stream.text))
            self.forced = list(self.stop_thinking)
        return True

    def finish(self, reason: str) -> None:
        self.req.emit(Finished(reason, len(self.req.ids), len(self.stream.tokens), self.think.thinking_tokens,
                               self.think.budget_hit, tuple(self.logprobs)))
