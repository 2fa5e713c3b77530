"""Calibration Hessians' products in bf16 with fp32 accumulation, on CPUs with AVX-512 BF16.

The block forwards run in bfloat16, so a Hessian's inputs X are bf16 values. The product of two bf16 values is
exact in fp32, so 2 XᵀX accumulated in fp32 is the fp32 Hessian of those inputs, but torch on CPU has no GEMM
for it: its bf16 matmul rounds the result to bf16 (and aten's `mm.dtype` with an fp32 output is CUDA-only), so
`HessianAccumulator` converted X to fp32 and ran fp32 GEMMs at half the bf16 rate. `csrc/gram_bf16.c` does the
product with AVX-512 BF16 dot products (fp32 accumulators, lower triangle only, the output's column blocks split
across threads): SmolLM2-135M's 16384 × 1536 down_proj input takes 0.11–0.12 s on 2 cores against 0.29–0.34 s for
the fp32 triangle (`bench/gram_bf16.py`).

It is compiled on first use with the system C compiler (`$CC`, else `cc`) into the cache
(`$EDGEDISTILL_CACHE/native/`, named by a hash of the source and flags), written atomically, and checked once
against torch on a small product. Without the CPU feature, a compiler, or with `EDGEDISTILL_NATIVE=0`,
`gram_kernel()` is None and the Hessians take the torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from ..host import built_once, cpu_flags

log = logging.getLogger("edgedistill.compress")

SOURCE = Path(__file__).with_name("csrc") / "gram_bf16.c"
FLAGS = ["-O3", "-std=gnu11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fPIC",
         "-shared", "-pthread"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")



def cpu_has_bf16_dot() -> bool:
    return all(flag in cpu_flags() for flag in CPU_FLAGS)


def _compile(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [os.environ.get("CC", "cc"), *FLAGS, "-o", tmp, str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: another process sees the old state or the whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    if os.environ.get("EDGEDISTILL_NATIVE", "1") == "0" or not cpu_has_bf16_dot() or not SOURCE.is_file():
        return None
    from ..models import cache_dir
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"gram_bf16-{key}.so"
    try:
        if not target.is_file():
            _compile(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        log.info("bf16 Hessian kernel unavailable (%s); Hessians use torch's fp32 GEMM", e)
        return None
    fn = lib.gram_bf16
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_float, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    if not _self_check(fn):
        log.warning("bf16 Hessian kernel %s disagrees with torch on a test product; Hessians use torch's fp32 GEMM",
                    target)
        return None
    return fn


def _self_check(fn) -> bool:
    """One small product (odd rows, features not a multiple of the tile) against float64 torch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, 70, generator=g).to(torch.bfloat16)
    out = torch.full((70, 70), float("nan"))
    if fn(x.data_ptr(), 101, 70, 70, out.data_ptr(), 70, 1.0, 0.0, 2) != 0:
        return False
    ref = x.double().T @ x.double()
    return bool(torch.allclose(out.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item()))


gram_kernel = built_once(_load)  # the compiled kernel (a ctypes function), or None where it cannot run


def gram_bf16_(out: torch.Tensor, x: torch.Tensor, alpha: float, beta: float, threads: int | None = None) -> bool:
    """out ← beta·out + alpha·xᵀx in place for x [n, d] bf16 and out [d, d] fp32 (symmetric on entry unless beta is
    0), both on CPU. False (out untouched) where the kernel is unavailable or the tensors don't fit it."""
    fn = gram_kernel()
    if (fn is None or x.dtype != torch.bfloat16 or out.dtype != torch.float32 or x.device.type != "cpu"
            or out.device.type != "cpu" or x.dim() != 2 or out.shape != (x.shape[1], x.shape[1])):
        return False
    if out.stride(1) != 1:
        return False
    if x.stride(1) != 1:
        x = x.contiguous()
    threads = threads or torch.get_num_threads()
    status = fn(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), out.stride(0), float(alpha),
                float(beta), int(threads))  # ctypes releases the GIL for the call
    return status == 0
