"""Continuous batching over llama.cpp sequences: many requests share one context, one decode per step.

One engine thread owns the llama.cpp context. Each step it builds a single batch holding the next
token of every running sequence plus prompt chunks of newly admitted ones, calls `llama_decode`
once, and samples each sequence with its own sampler chain (temperature, top_p, seed). Requests
wait in a bounded FIFO queue (first come, first admitted); a slot (sequence id) is freed the step
after its request finishes or is cancelled. Results leave through each job's `emit` callback,
called on the engine thread.

Thinking: each sequence tracks whether it is inside a <think> block (from its prompt, then from its
text) and counts the tokens it writes there. When a budget of thinking tokens is spent, the engine
feeds a short stop-thinking sentence and `</think>` into that sequence itself (several tokens in one
decode, in the same batch as everyone else's next token) and lets the model answer from there.
"""
from __future__ import annotations

import codecs
import ctypes
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ServeError
from .events import Delta, Event, Failed, Finished, SamplingParams
from .thinking import STOP_THINKING, ThinkTracker

log = logging.getLogger(__name__)

# One KV stream per slot (not unified): every request gets a fixed, predictable context budget.
KV_UNIFIED = False


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class QueueFull(ServeError):
    """Every slot is busy and the waiting line is at its limit; the client should retry later."""


class ContextLengthExceeded(ServeError):
    """The prompt alone does not fit the backend's context window (a client error, not a server fault)."""


@dataclass(eq=False)
class Job:
    """One generation: prompt tokens in, events out through `emit`. `cancel()` may be called from any thread."""
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: bool = False
    admitted_at: float | None = None  # time.perf_counter() when it got a slot


    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Sequence:
    """A job while it holds a slot: its KV position, sampler and the text it has produced."""
    job: Job
    seq_id: int
    sampler: ctypes.c_void_p | None  # None: greedy
    fed: int = 0  # prompt tokens already in the KV cache
    n_past: int = 0
    next_token: int | None = None  # sampled, not yet fed back
    generated: list[int] = field(default_factory=list)  # sampled tokens that are (or are about to be) fed
    completion_tokens: int = 0
    text: str = ""
    sent: int = 0  # len(text) already emitted
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    think: ThinkTracker = field(default_factory=ThinkTracker)
    inserted: list[int] = field(default_factory=list)  # tokens to feed after next_token (the stop-thinking sentence)
    logprobs: list[float] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.job.prompt)


class BatchEngine:
    """A GGUF served by continuous batching: `slots` sequences of up to `ctx_per_slot` tokens each."""

    def __init__(self, gguf_path: str | Path, *, slots: int = 8, ctx_per_slot: int = 2048, n_batch: int = 512,
                 n_threads: int | None = None, max_queue: int = 64):
        import llama_cpp
        from llama_cpp import _internals, _logger

        _logger.set_verbose(False)  # llama.cpp's load log goes to stderr otherwise (errors still show)

        if not 1 <= slots <= n_batch or ctx_per_slot < 16 or max_queue < 0:
            raise ServeError(f"slots ({slots}) must be between 1 and n_batch ({n_batch}), ctx_per_slot "
                             f"({ctx_per_slot}) >= 16 and max_queue ({max_queue}) >= 0.")
        self._ll = llama_cpp
        path = Path(gguf_path)
        self.model = _internals.LlamaModel(path_model=str(path), params=llama_cpp.llama_model_default_params(),
                                           verbose=False)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = slots * ctx_per_slot
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = slots
        cp.kv_unified = KV_UNIFIED
        # llama.cpp's own default (4) oversubscribes small machines; like llama-cpp-python, take half the CPUs.
        cp.n_threads = cp.n_threads_batch = n_threads or max(1, (os.cpu_count() or 2) // 2)
        cp.no_perf = True
        self.ctx = _internals.LlamaContext(model=self.model, params=cp, verbose=False)
        self.vocab = self.model.vocab
        self.slots, self.ctx_per_slot, self.n_batch, self.max_queue = slots, ctx_per_slot, n_batch, max_queue
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}  # token -> its text bytes, filled as tokens appear
        self._eog: dict[int, bool] = {}
        self._stop_thinking = self.tokenize(STOP_THINKING, add_bos=False)
        self.n_vocab = self.model.n_vocab()
        self._pending: deque[Job] = deque()
        self._running: list[_Sequence] = []
        self._free_ids = list(range(slots))
        self._cached: list[list[int]] = [[] for _ in range(slots)]  # tokens in each free slot's KV cache
        self.reused_tokens = 0  # prompt tokens served from a slot's cache instead of computed
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public, any thread
    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def submit(self, prompt: Sequence[int], params: SamplingParams, emit: Callable[[Event], None]) -> Job:
        if len(prompt) == 0:
            raise ServeError("the prompt is empty after tokenization.")
        if len(prompt) >= self.ctx_per_slot:
            raise ContextLengthExceeded(f"the prompt has {len(prompt)} tokens but the context window is "
                                        f"{self.ctx_per_slot} tokens; shorten it")
        job = Job(list(prompt), params, emit)
        with self._cv:
            if self._stopping:
                raise ServeError("the engine is shut down.")
            if len(self._pending) >= self.max_queue and not self._free_ids_available():
                raise QueueFull(f"all {self.slots} slots are busy and {len(self._pending)} requests are waiting")
            self._pending.append(job)
            self._cv.notify()
        return job

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._running)

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)
        for job in list(self._pending):
            job.emit(Failed("the server is shutting down"))
        self._pending.clear()
        if self._batch is not None:
            self._ll.llama_batch_free(self._batch)
            self._batch = None
        self.ctx.close()
        self.model.close()

    # ------------------------------------------------------------ engine thread
    def _free_ids_available(self) -> bool:
        return len(self._free_ids) > len(self._pending)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._running and not self._pending:
                    self._cv.wait()
                if self._stopping:
                    break
                self._admit()
            try:
                self._step()
            except Exception as e:  # a decode failure ends the requests in flight, not the server
                log.exception("batched decode failed")
                for s in list(self._running):
                    self._release(s, Failed(f"generation failed: {e}"), keep_cache=False)
        for s in list(self._running):
            self._release(s, Failed("the server is shutting down"))

    def _admit(self) -> None:
        """Give waiting jobs free slots, each the slot whose cached tokens share the longest prefix with its
        prompt: a freed slot keeps its KV cache, so a shared system prompt or an earlier turn of the same
        chat is not computed again."""
        while self._free_ids and self._pending:
            job = self._pending.popleft()
            if job.cancelled:
                continue
            seq_id, reuse = max(((i, _common_prefix(self._cached[i], job.prompt)) for i in self._free_ids),
                                key=lambda x: x[1])
            reuse = min(reuse, len(job.prompt) - 1)  # the last prompt token is always fed: its logits are needed
            self._free_ids.remove(seq_id)
            job.admitted_at = time.perf_counter()
            self._ll.llama_memory_seq_rm(self.ctx.memory, seq_id, reuse, -1)
            self._cached[seq_id] = []
            self.reused_tokens += reuse
            self._running.append(_Sequence(job, seq_id, self._make_sampler(job.params), fed=reuse, n_past=reuse,
                                           think=ThinkTracker(inside=job.params.think_open,
                                                              budget=job.params.think_budget)))

    def _make_sampler(self, p: SamplingParams) -> ctypes.c_void_p | None:
        """A llama.cpp sampler chain, or None for greedy (argmax over the step's logits in numpy)."""
        if p.temperature <= 0:
            return None
        ll = self._ll
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if p.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(p.top_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(p.temperature))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(p.seed & 0xFFFFFFFF))
        return chain

    def _step(self) -> None:
        for s in [s for s in self._running if s.job.cancelled]:
            self._release(s, None)
        if not self._running:
            return
        b, n = self._batch, 0
        wants_logits: list[tuple[_Sequence, int]] = []

        def add(s: _Sequence, token: int, logits: bool) -> None:
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0], b.logits[n] = token, s.n_past, 1, s.seq_id, logits
            s.n_past += 1
            if logits:
                wants_logits.append((s, n))
            n += 1

        # What each sequence feeds this step: running sequences first (one token each, plus any inserted
        # stop-thinking tokens), then prompt chunks in admission order, so a long prompt never stalls the
        # streams already going.
        feed: dict[_Sequence, list[tuple[int, bool]]] = {}
        budget = self.n_batch
        for s in self._running:
            if not s.prefilling and s.next_token is not None and 1 + len(s.inserted) <= budget:
                tokens = [s.next_token] + s.inserted
                s.inserted, s.next_token = [], None
                feed[s] = [(t, k == len(tokens) - 1) for k, t in enumerate(tokens)]
                budget -= len(tokens)
        for s in self._running:
            if s.prefilling and budget > 0:
                chunk = s.job.prompt[s.fed:s.fed + budget]
                feed[s] = [(t, s.fed + k == len(s.job.prompt) - 1) for k, t in enumerate(chunk)]
                s.fed += len(chunk)
                budget -= len(chunk)
        # Into the batch in sequence-id order: with one KV stream per slot llama.cpp cuts a batch into
        # micro-batches of *consecutive* sequence ids (split_equal, sequential), one pass over the weights
        # each. In admission order every out-of-order id started a new pass: 16 decodes cost 77 ms instead
        # of 35 ms (SmolLM2 student, Q8_0, 2 cores).
        for s in sorted(feed, key=lambda s: s.seq_id):
            for token, logits in feed[s]:
                add(s, token, logits)
        b.n_tokens = n
        if n == 0:
            return
        rc = self._ll.llama_decode(self.ctx.ctx, b)
        if rc != 0:
            raise ServeError(f"llama_decode returned {rc}")
        # Few foreign calls per step: each one drops and retakes the GIL, and on a busy machine every retake
        # can wait a scheduler slice for the event loop thread. Greedy rows are argmaxed in one go.
        greedy = lse = logits = None
        need_lp = [s.job.params.logprobs for s, _ in wants_logits]
        if any(s.sampler is None for s, _ in wants_logits) or any(need_lp):
            logits = np.ctypeslib.as_array(self._ll.llama_get_logits(self.ctx.ctx), shape=(len(wants_logits), self.n_vocab))
            greedy = logits.argmax(axis=1)
            if any(need_lp):  # log-softmax normaliser of the raw (temperature 1) distribution, rows at once
                m = logits.max(axis=1, keepdims=True)
                lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
        for row, (s, i) in enumerate(wants_logits):
            token = int(greedy[row]) if s.sampler is None else self._ll.llama_sampler_sample(s.sampler, self.ctx.ctx, i)
            self._advance(s, token, float(logits[row, token] - lse[row]) if need_lp[row] else None)

    def _advance(self, s: _Sequence, token: int, logprob: float | None = None) -> None:
        """Account for one sampled token: emit its text, or end the sequence."""
        p = s.job.params
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(self._ll.llama_vocab_is_eog(self.vocab, token))
        if eog:
            return self._finish(s, "stop")
        s.completion_tokens += 1
        if logprob is not None:
            s.logprobs.append(logprob)
        s.text += s.decoder.decode(self._token_bytes(token))
        s.think.token(s.text)
        stop_at = min((i for i in (s.text.find(x, s.sent) for x in p.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            s.text = s.text[:stop_at]
            return self._finish(s, "stop", flush=False)
        # Hold back a tail that could still grow into a stop sequence.
        hold = max((k for x in p.stop for k in range(min(len(x) - 1, len(s.text) - s.sent), 0, -1)
                    if s.text.endswith(x[:k])), default=0)
        end = len(s.text) - hold
        s.job.emit(Delta(s.text[s.sent:end], 1))
        s.sent = end
        if s.completion_tokens >= p.max_tokens or s.n_past >= self.ctx_per_slot:
            return self._finish(s, "length")
        s.next_token = token
        s.generated.append(token)
        if s.think.over_budget:
            self._stop_thinking_now(s)

    def _stop_thinking_now(self, s: _Sequence) -> None:
        """The budget is spent: queue the stop-thinking sentence and `</think>` behind the sampled token."""
        inserted = self._stop_thinking
        if s.n_past + 1 + len(inserted) >= self.ctx_per_slot or len(inserted) + 1 > self.n_batch:
            return self._finish(s, "length")
        s.inserted = list(inserted)
        s.generated.extend(inserted)
        s.completion_tokens += len(inserted)
        s.text += s.decoder.decode(b"", final=True) + STOP_THINKING
        s.think.closed_by_backend(len(s.text))
        s.job.emit(Delta(s.text[s.sent:], len(inserted)))
        s.sent = len(s.text)

    def _token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece_of(token)
        return piece

    def _piece_of(self, token: int) -> bytes:
        n = self._ll.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    def _finish(self, s: _Sequence, reason: str, *, flush: bool = True) -> None:
        if flush:  # a dangling partial UTF-8 character becomes U+FFFD, as llama.cpp's server does
            s.text += s.decoder.decode(b"", final=True)
        if s.sent < len(s.text):
            s.job.emit(Delta(s.text[s.sent:], 0))
        self._release(s, Finished(reason, len(s.job.prompt), s.completion_tokens, s.think.thinking_tokens,
                                  s.think.budget_hit, tuple(s.logprobs)))

    def _release(self, s: _Sequence, event: Event | None, *, keep_cache: bool = True) -> None:
        self._running.remove(s)
        if s.sampler is not None:
            self._ll.llama_sampler_free(s.sampler)
        if keep_cache:  # exactly the tokens whose keys and values are in the slot's cache
            self._cached[s.seq_id] = (s.job.prompt[:s.fed] + s.generated)[:s.n_past]
        else:
            self._ll.llama_memory_seq_rm(self.ctx.memory, s.seq_id, -1, -1)
            self._cached[s.seq_id] = []
        self._free_ids.append(s.seq_id)
        if event is not None:
            s.job.emit(event)
