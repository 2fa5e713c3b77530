"""GGUF block quantization grids, as pure tensor functions.

One definition serves compress/ (round-to-nearest and GPTQ codes), distill/
(fake-quant training) and export/ (writing blocks losslessly). Arithmetic
follows ggml's reference quantizers (gguf-py `quants.py`): per block of 32
weights along the input dimension, an fp16 scale `d` (and, for Q4_1, an fp16
min `m`); values round half away from zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32


@dataclass(frozen=True)
class Grid:
    name: str
    bits: int
    has_min: bool
    qmin: int
    qmax: int


GRIDS: dict[str, Grid] = {
    "q8_0": Grid("q8_0", 8, False, -127, 127),
    "q4_0": Grid("q4_0", 4, False, -8, 7),
    "q4_1": Grid("q4_1", 4, True, 0, 15),
}


def _round_away(x: torch.Tensor) -> torch.Tensor:
    # C roundf. Not floor(|x| + 0.5): for |x| = 0.49999997 that sum rounds up to 1.0 in fp32.
    a = torch.abs(x)
    f = torch.floor(a)
    return torch.sign(x) * (f + (a - f >= 0.5).to(a.dtype))


def _blocks(w: torch.Tensor) -> torch.Tensor:
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"weight of shape {tuple(w.shape)}: columns must be a multiple of {BLOCK}")
    return w.float().reshape(w.shape[0], w.shape[1] // BLOCK, BLOCK)


@dataclass
class QuantCodes:
    """Integer codes [rows, cols] (int8), fp16 scales [rows, cols/32], optional fp16 mins (Q4_1)."""
    grid: str
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def quantize(w: torch.Tensor, grid: str) -> QuantCodes:
    """Round-to-nearest onto the grid, exactly as ggml's reference quantizer does."""
    g = GRIDS[grid]
    b = _blocks(w)
    if grid == "q8_0":
        amax = b.abs().amax(dim=-1, keepdim=True)
        d = amax / 127.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = _round_away(b * inv)
        scales = d.half()
        mins = None
    elif grid == "q4_0":
        # ggml takes the signed value of largest magnitude, d = max / -8.
        idx = b.abs().argmax(dim=-1, keepdim=True)
        mx = torch.gather(b, -1, idx)
        d = mx / -8.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.clamp(torch.trunc(b * inv + 8.5), 0, 15) - 8
        scales = d.half()
        mins = None
    elif grid == "q4_1":
        mn = b.amin(dim=-1, keepdim=True)
        mx = b.amax(dim=-1, keepdim=True)
        d = (mx - mn) / 15.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.clamp(torch.trunc((b - mn) * inv + 0.5), 0, 15)
        scales = d.half()
        mins = mn.half()
    else:  # pragma: no cover - GRIDS is the gate
        raise KeyError(grid)
    codes = q.to(torch.int8).reshape(w.shape)
    return QuantCodes(grid, codes, scales.squeeze(-1), None if mins is None else mins.squeeze(-1))


def dequantize(qc: QuantCodes) -> torch.Tensor:
    rows, cols = qc.codes.shape
    q = qc.codes.float().reshape(rows, cols // BLOCK, BLOCK)
    out = q * qc.scales.float().unsqueeze(-1)
    if qc.mins is not None:
        out = out + qc.mins.float().unsqueeze(-1)
    return out.reshape(rows, cols)


def fake_quantize(w: torch.Tensor, grid: str) -> torch.Tensor:
    """quantize → dequantize (no gradient path; distill/ wraps it in a straight-through estimator)."""
    return dequantize(quantize(w, grid)).to(w.dtype)
