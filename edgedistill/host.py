"""This host's CPU (from /proc/cpuinfo), and kernels built for it once per process."""
from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return "unknown", frozenset()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return name, frozenset(flags)


def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo is missing)."""
    return _cpuinfo()[1]


def cpu_model() -> str:
    return _cpuinfo()[0]


def built_once(build: Callable[[], T]) -> Callable[[], T]:
    """`build()` run on the first call and its result returned ever after, once even when threads make the first
    call together (two groups' sweeps start side by side; lru_cache alone may run `build` twice)."""
    lock = threading.Lock()
    box: list = []

    @functools.wraps(build)
    def get() -> T:
        with lock:
            if not box:
                box.append(build())
        return box[0]
    return get
