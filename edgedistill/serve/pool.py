"""`--workers N`: N independent instances of one backend behind the `Backend` protocol.

Each request goes to the instance with the least work (waiting + generating, relative to its
slots), ties to the first. Within an instance, llama.cpp and transformers still batch their
own requests; ONNX runs one request per instance, so for it workers are the only parallelism.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .backend import Backend, Handle, Prompt
from .events import Event, SamplingParams


class WorkerPool:
    def __init__(self, workers: Sequence[Backend]):
        if not workers:
            raise ValueError("a worker pool needs at least one backend")
        self.workers = list(workers)
        self.name = workers[0].name

    def _pick(self) -> Backend:
        def busy(b: Backend) -> float:
            load = b.load()
            return (load.get("queue_depth", 0) + load.get("active", 0)) / max(1, load.get("slots", 1))
        return min(self.workers, key=busy)

    def start(self, prompt: Prompt, params: SamplingParams, emit: Callable[[Event], None]) -> Handle:
        return self._pick().start(prompt, params, emit)

    def load(self) -> dict[str, int]:
        loads = [b.load() for b in self.workers]
        return {k: sum(x.get(k, 0) for x in loads) for k in ("queue_depth", "active", "slots")}

    def close(self) -> None:
        for b in self.workers:
            b.close()

    @property
    def prefills(self) -> bool:
        return all(getattr(b, "prefills", False) for b in self.workers)

    @property
    def ready(self) -> bool:
        return all(getattr(b, "ready", True) for b in self.workers)
