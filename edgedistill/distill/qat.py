"""Quantized distillation (Polino et al., 2018): train through the export's own grid.

Every weight that the compressor would put on a GGUF block grid (compress/rtn.py's
`quantizable`) is replaced, in the forward pass, by its fake-quantized value from
compress/grids.py — the very function that produces the codes export/ writes — and
the gradient passes straight through to the latent fp32 weight. After training, the
codes of the latent weights are what the student computed with, bit for bit.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from ..compress.grids import GRIDS, QuantCodes, fake_quantize, quantize
from ..compress.rtn import quantizable
from ..errors import DistillError


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, grid):
        with torch.no_grad():
            return fake_quantize(w, grid)

    @staticmethod
    def backward(ctx, g):
        return g, None


def check_grid(grid: str) -> None:
    if grid not in GRIDS:
        raise DistillError(f"quantize-aware grid '{grid}' is unknown; expected one of {sorted(GRIDS)}.")


def quantized_names(model) -> list[str]:
    """Parameter names (a tied weight once, as named_parameters lists it) that live on the grid."""
    return [n for n, p in model.named_parameters() if quantizable(n, p)]


def fake_quantized_params(model, grid: str) -> dict[str, torch.Tensor]:
    return {n: _StraightThrough.apply(p, grid) for n, p in model.named_parameters() if quantizable(n, p)}


def forward_hidden(model, params: dict[str, torch.Tensor] | None, **inputs) -> torch.Tensor:
    """Last hidden states of a HF causal LM's backbone, optionally with some parameters swapped in."""
    base = model.base_model
    if not params:
        return base(**inputs).last_hidden_state
    prefix = model.base_model_prefix + "."
    inner = {n[len(prefix):]: t for n, t in params.items() if n.startswith(prefix)}
    return functional_call(base, inner, args=(), kwargs=inputs).last_hidden_state


def head_weight(model, params: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head weight the forward pass should use (the fake-quantized one under QAT; tied weights found by identity)."""
    head = model.get_output_embeddings()
    if params:
        for n, p in model.named_parameters():
            if p is head.weight and n in params:
                return params[n], head.bias
    return head.weight, head.bias


@torch.no_grad()
def export_codes(model, grid: str) -> dict[str, QuantCodes]:
    """Codes of the latent weights, and the model's weights replaced by their fake-quantized values."""
    codes = {}
    for n, p in model.named_parameters():
        if quantizable(n, p):
            qc = quantize(p.data, grid)
            codes[n] = qc
            p.data.copy_(qc.dequantize().to(p.dtype))
    if not codes:
        raise DistillError(f"no student weight fits the {grid} grid (input dimension must be a multiple of 32).")
    return codes
