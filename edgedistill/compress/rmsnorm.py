"""RMSNorm in one pass for the bf16 calibration forwards on CPU.

transformers' Llama-family RMSNorm (Llama, Qwen2, Mistral, Phi-3 share it) is five passes over the activations
in eager mode: to fp32, square, mean, scale, back to bf16, times the weight. On SmolLM2-135M's calibration batch
(16,384 × 576) that is ~53 ms per norm on the 2-core build machine, two per block; as one compiled pass over each
row (numba, the rows split over the threads, the GIL released) it is a few ms.

The arithmetic is transformers': x in fp32, its mean square, x · rsqrt(ms + eps) rounded to bf16, times the
weight, rounded to bf16. Only the order of the mean's sum differs (a float64 accumulator here), which can move
an output by one bf16 step. Each norm's first call is checked against the module's own forward; a module whose
forward is not that formula (Gemma's 1 + weight, say) keeps its own.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import numpy as np
import torch

from ..host import built_once

log = logging.getLogger("edgedistill.compress")


def _build():
    try:
        import numba
    except ImportError:
        return None

    @numba.njit("void(uint16[:, ::1], float32[::1], float32, uint16[:, ::1], int64, int64)", nogil=True,
                cache=True, error_model="numpy")
    def rms_rows(x, w, eps, out, r0, r1):
        h = x.shape[1]
        bits = np.empty(h, np.uint32)
        vals = bits.view(np.float32)
        for i in range(r0, r1):
            for j in range(h):
                bits[j] = np.uint32(x[i, j]) << 16  # bf16 → fp32, exactly
            acc = 0.0
            for j in range(h):
                acc += np.float64(vals[j]) * np.float64(vals[j])
            scale = np.float32(1.0) / np.sqrt(np.float32(acc / h) + eps)
            for j in range(h):
                vals[j] = vals[j] * scale
            for j in range(h):  # round to bf16 (nearest, ties to even), then weight × it, rounded again
                u = bits[j]
                bits[j] = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16) << 16
            for j in range(h):
                vals[j] = vals[j] * w[j]
            for j in range(h):
                u = bits[j]
                out[i, j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16)
    return rms_rows


_kernel = built_once(_build)  # the numba kernel, or None without numba


def _as_u16(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float, threads: int) -> torch.Tensor:
    """transformers' RMSNorm of a bf16 CPU tensor (last dim normalised) in one pass, rows split over `threads`."""
    kernel = _kernel()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    out = torch.empty_like(x2)
    xa, oa = _as_u16(x2), _as_u16(out)
    w = weight.detach().float().contiguous().numpy()
    rows = x2.shape[0]
    parts = max(1, min(threads, rows // 256))
    edges = [rows * k // parts for k in range(parts + 1)]
    if parts == 1:
        kernel(xa, w, np.float32(eps), oa, 0, rows)
    else:
        futures = [_pool(parts - 1).submit(kernel, xa, w, np.float32(eps), oa, a, b)
                   for a, b in zip(edges[1:-1], edges[2:])]
        kernel(xa, w, np.float32(eps), oa, edges[0], edges[1])
        for f in futures:
            f.result()
    return out.view(shape)


_POOLS: dict = {}


def _pool(workers: int):
    if workers not in _POOLS:
        from concurrent.futures import ThreadPoolExecutor
        _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgedistill-rmsnorm")
    return _POOLS[workers]


_CHECKED: dict = {}  # norm class → does its forward compute the formula above (checked on its first call)


def _eps(module) -> float | None:
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def _fused_forward(module, own):
    eps = _eps(module)
    cls = type(module)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if (_CHECKED.get(cls) is False or hidden_states.dtype != torch.bfloat16 or hidden_states.device.type != "cpu"
                or module.weight.dtype != torch.bfloat16 or torch.is_grad_enabled()):
            return own(hidden_states)
        out = rms_norm_bf16(hidden_states, module.weight, eps, torch.get_num_threads())
        if cls not in _CHECKED:
            ref = own(hidden_states)
            diff = (out.float() - ref.float()).abs()
            # transformers' formula differs from ours only in the mean's summation order: a few outputs one bf16
            # step apart. Anything more is another formula: keep the module's own.
            _CHECKED[cls] = bool(diff.max() <= 2 ** -7 * ref.float().abs().max() and (diff > 0).float().mean() <= 0.01)
            if not _CHECKED[cls]:
                log.info("%s: not transformers' Llama RMSNorm formula; calibration keeps its own forward", cls.__name__)
                return ref
        return out
    return forward


@contextlib.contextmanager
def calibration_rms_norms(block: torch.nn.Module) -> Iterator[None]:
    """Inside, `block`'s RMSNorm modules (class name ending in RMSNorm, a 1-D weight, an epsilon) run their bf16
    CPU forwards as one pass; their own forwards are back on exit."""
    if _kernel() is None:
        yield
        return
    patched = []
    for mod in block.modules():
        w = getattr(mod, "weight", None)
        eps = _eps(mod)
        if (type(mod).__name__.endswith("RMSNorm") and isinstance(w, torch.nn.Parameter) and w.dim() == 1
                and isinstance(eps, float) and "forward" not in vars(mod)):
            mod.forward = _fused_forward(mod, mod.forward)
            patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            vars(mod).pop("forward", None)
