"""Device profiles: what a target can hold and how fast it moves bytes and does arithmetic.

Profiles are YAML files shipped in `profiles/`; `host` is this machine, its RAM,
memory bandwidth and compute measured by a short benchmark when it is loaded.
"""
from __future__ import annotations

import functools
import os
import time
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import DeviceError

Runtime = Literal["llama.cpp", "onnxruntime"]


class DeviceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    measure: bool = Field(False, description="fill RAM / bandwidth / compute from a benchmark of this machine")
    ram_gb: float = Field(ge=0)
    budget_gb: float = Field(ge=0, description="memory the model, its KV cache and its runtime may use")
    memory_bandwidth_gbs: float = Field(ge=0, description="sustained read bandwidth, GB/s (1e9 bytes)")
    compute_gflops: float = Field(ge=0, description="sustained dense matmul throughput, GFLOP/s")
    threads: int = Field(1, ge=1)
    default_context: int = Field(2048, ge=16)
    min_decode_tps: float = Field(5.0, ge=0, description="decode speed below which a file is too slow here")
    runtimes: dict[Runtime, list[str]] = Field(description="runtime -> weight formats it runs on this device")
    decode_rates: dict[str, float] = Field(default_factory=dict, description=(
        "llama.cpp single-sequence decode speed per GGUF type, billions of matmul weights per second (streaming "
        "and kernel arithmetic together; measured for host by devices/kernels.py). A type without a rate is "
        "predicted from memory_bandwidth_gbs and compute_gflops"))


def _profile_files() -> dict[str, str]:
    folder = resources.files("edgedistill.devices") / "profiles"
    return {f.name[:-5]: f.read_text() for f in folder.iterdir() if f.name.endswith(".yaml")}


def known_devices() -> list[str]:
    return sorted(_profile_files())


def load_profile(name: str, *, measure: bool = True) -> DeviceProfile:
    """The named profile; `host` is measured (once per process) unless measure=False."""
    files = _profile_files()
    if name not in files:
        raise DeviceError(f"unknown device '{name}'; known devices: {', '.join(sorted(files))}. "
                          f"Pick one of those (`edgedistill devices list`).")
    try:
        profile = DeviceProfile.model_validate(yaml.safe_load(files[name]))
    except (ValidationError, yaml.YAMLError) as e:
        raise DeviceError(f"device profile '{name}' is invalid: {e}") from None
    if profile.measure and measure:
        profile = profile.model_copy(update=measure_host(profile.threads))
    return profile


# ---------------------------------------------------------------- measuring this machine
def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure_bandwidth(mib: int = 256, repeats: int = 4) -> float:
    """GB/s of one thread streaming through `mib` MiB (best of `repeats`); larger than most caches."""
    import numpy as np

    a = np.ones(mib * 2**20 // 8, dtype=np.float64)
    a.sum()  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def measure_compute(threads: int, n: int = 512, repeats: int = 5) -> float:
    """GFLOP/s of an fp32 GEMM on `threads` threads (best of `repeats`)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / best / 1e9


def measure_decode_rates(threads: int) -> dict[str, float]:
    from .kernels import measure_decode_rates as measure
    return measure(threads)


@functools.lru_cache(maxsize=4)
def measure_host(threads: int) -> dict[str, object]:
    mem = _meminfo()
    ram = mem.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    avail = mem.get("MemAvailable", ram)
    return {"ram_gb": round(ram / 1e9, 2), "budget_gb": round(0.8 * avail / 1e9, 2),
            "memory_bandwidth_gbs": round(measure_bandwidth(), 2),
            "compute_gflops": round(measure_compute(threads), 1),
            "decode_rates": measure_decode_rates(threads)}
