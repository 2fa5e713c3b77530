"""OWL-style per-block sparsity (outlier-weighted layerwise sparsity, Yin et al. 2023).

A weight is an *outlier* when its activation-weighted magnitude |W_ij|·‖X_j‖₂ (the Wanda score, ‖X_j‖
over the calibration tokens) exceeds `threshold` × the mean score of its block. Blocks holding more
outliers are pruned less: s_l = target − λ · (D_l − mean D) / max |D − mean D|, so every block's
sparsity lies in [target − λ, target + λ] (the block furthest from the mean ratio reaches the bound)
and their mean (equal-sized blocks, as in every HF decoder) is exactly the target. (OWL's paper maps
D onto [0, 2λ] and centres it, which keeps the mean but can leave the ± λ band.)

The ratios are measured on the dense model in one forward pass before layer-wise compression starts.
"""
from __future__ import annotations

import torch

from ..blocks import decoder_layers
from ..errors import CompressError


@torch.no_grad()
def outlier_ratios(model, windows: list[list[int]], threshold: float, batch_size: int = 8) -> list[float]:
    """Per block: the fraction of its linear weights whose |W|·‖X‖ exceeds `threshold` × the block's mean."""
    blocks = decoder_layers(model, CompressError, "compression")
    linears = [[m for m in blk.modules() if isinstance(m, torch.nn.Linear)] for blk in blocks]
    sumsq: dict[torch.nn.Linear, torch.Tensor] = {}

    def hook(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        acc = sumsq.get(mod)
        s = x.pow(2).sum(0)
        sumsq[mod] = s if acc is None else acc + s

    handles = [m.register_forward_pre_hook(hook) for blk in linears for m in blk]
    try:
        device = next(model.parameters()).device
        for b in range(0, len(windows), batch_size):
            model(input_ids=torch.tensor(windows[b:b + batch_size], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    ratios = []
    for i, mods in enumerate(linears):
        scores = [(m.weight.detach().float().abs() * sumsq[m].sqrt().unsqueeze(0)).reshape(-1) for m in mods
                  if m in sumsq]
        if not scores:
            raise CompressError(f"block {i}: none of its linears ran on the calibration text; OWL cannot score it.")
        s = torch.cat(scores)
        ratios.append((s > threshold * s.mean()).float().mean().item())
    return ratios


def owl_profile(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity around `target` within ± `lam`, lower where the outlier ratio is higher; mean = target."""
    if not 0.0 < target < 1.0:
        raise CompressError(f"compress.sparsity = {target}: must lie in (0, 1).")
    if not 0.0 <= lam < min(target, 1.0 - target):
        raise CompressError(f"compress.owl_lambda = {lam}: must lie in [0, {min(target, 1 - target):.3g}) so every "
                            f"block's sparsity (target {target} ± λ) stays inside (0, 1).")
    d = torch.tensor(ratios, dtype=torch.float64)
    centred = d - d.mean()
    spread = centred.abs().max().item()
    if spread == 0.0:
        return [target] * len(ratios)
    return (target - lam * centred / spread).tolist()
