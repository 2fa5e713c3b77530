"""SparseGPT and GPTQ on a whole model: the OBS engine driven block by block.

`obs_compress(model, windows, ObsConfig(...))` rewrites the model's block
linears in place (fp32, exactly the values the codes decode to) and returns
the GGUF codes (for a grid) keyed by HF parameter name, plus metrics.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from ..blocks import layers_prefix
from ..errors import CompressError
from .grids import GRIDS, QuantCodes
from .layerwise import InputGroup, compress_layerwise, decoder_blocks
from .obs import Pruning, compress_weight

PATTERN = re.compile(r"^(\d+):(\d+)$")


@dataclass
class ObsConfig:
    sparsity: float = 0.0                 # unstructured fraction removed (0 = none)
    pattern: str = "unstructured"         # "unstructured" or "N:M" (2:4, 4:8)
    grid: str | None = None               # q8_0 | q4_0 | q4_1: GPTQ onto that GGUF grid
    act_order: bool = True
    damp: float = 0.01
    blocksize: int = 128
    device: str = "auto"
    forward_dtype: str = "bfloat16"
    batch_size: int = 8
    cpu_threads: int = 1                  # see layerwise.compress_layerwise
    one_pass: bool | None = None          # one block forward, groups compressed as it reaches them (None: on CPU)
    sparsity_profile: str = "uniform"     # uniform | owl: per-block sparsity from outlier ratios (compress/owl.py)
    owl_threshold: float = 5.0            # OWL's M: an outlier's |W|·‖X‖ exceeds M × its block's mean
    owl_lambda: float = 0.08              # OWL's λ: block sparsities lie in [sparsity − λ, sparsity + λ]


def parse_pruning(sparsity: float, pattern: str, field: str = "compress.pattern") -> Pruning | None:
    if pattern == "unstructured":
        if sparsity == 0.0:
            return None
        if not 0.0 < sparsity < 1.0:
            raise CompressError(f"compress.sparsity = {sparsity}: must lie in (0, 1) (the fraction of weights removed).")
        return Pruning(sparsity=sparsity)
    m = PATTERN.match(pattern)
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise CompressError(f"{field} = '{pattern}': expected 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'.")
    return Pruning(n=int(m[1]), m=int(m[2]))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError(f"compress.device = '{device}' but no CUDA device is visible; use 'auto' or 'cpu'.")
    return torch.device(device)


@torch.no_grad()
def obs_compress(model, windows: list[list[int]], cfg: ObsConfig) -> tuple[dict[str, QuantCodes], dict]:
    pruning = parse_pruning(cfg.sparsity, cfg.pattern)
    if cfg.grid is not None and cfg.grid not in GRIDS:
        raise CompressError(f"compress.grid = '{cfg.grid}': expected one of {sorted(GRIDS)}.")
    if pruning is None and cfg.grid is None:
        raise CompressError("nothing to compress: set compress.sparsity / compress.pattern, compress.grid, or both.")
    if not windows:
        raise CompressError("no calibration windows; compress needs calibration text.")
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.forward_dtype)
    prefix = layers_prefix(model, CompressError, "compression")  # a model without a block list fails here
    codes: dict[str, QuantCodes] = {}
    block_pruning, profile = _block_pruning(model, windows, cfg, pruning, dtype)

    def compress_group(i: int, group: InputGroup, linears: dict[str, torch.nn.Linear]) -> dict:
        mods = [linears[n] for n in group.names]
        W = torch.cat([m.weight.data.float() for m in mods], dim=0)
        bounds, r = [], 0
        for m in mods:
            bounds.append((r, r + m.out_features))
            r += m.out_features
        H = group.hessian.H
        res, _ = compress_weight(W, H, f"{prefix}{i}.{'+'.join(group.names)}", pruning=block_pruning(i), grid=cfg.grid,
                                 act_order=cfg.act_order, damp=cfg.damp, segments=bounds, blocksize=cfg.blocksize)
        out = {}
        for n, m, (r0, r1), err in zip(group.names, mods, bounds, res.segment_errors):
            new = res.weight[r0:r1]
            metrics = {"rel_error": round(err, 6),
                       "sparsity": round((new == 0).float().mean().item(), 4)}
            m.weight.data.copy_(new.to(m.weight.dtype))
            if res.codes is not None:
                qc = res.codes
                codes[f"{prefix}{i}.{n}.weight"] = QuantCodes(
                    qc.grid, qc.codes[r0:r1].clone(), qc.scales[r0:r1].clone(),
                    None if qc.mins is None else qc.mins[r0:r1].clone())
            out[n] = metrics
        return out

    # One pass on CPU by default: all windows in one batch costs memory a GPU may lack (attention over
    # N × seqlen), and the GPU path's timings (bench/obs_vs_reference.py) were measured two-pass.
    one_pass = device.type == "cpu" if cfg.one_pass is None else cfg.one_pass
    result = compress_layerwise(model, windows, compress_group, device=device, forward_dtype=dtype,
                                batch_size=cfg.batch_size, cpu_threads=cfg.cpu_threads, one_pass=one_pass)
    errs = [m["rel_error"] for m in result["layers"].values()]
    total = zero = 0
    for blk in decoder_blocks(model):
        for mod in blk.modules():
            if isinstance(mod, torch.nn.Linear):
                total += mod.weight.numel()
                zero += int((mod.weight == 0).sum())
    metrics = {"config": asdict(cfg), "device": str(device), "calib_windows": len(windows),
               "calib_tokens": sum(map(len, windows)), "block_linear_sparsity": round(zero / max(total, 1), 4),
               "mean_rel_error": round(sum(errs) / len(errs), 6), "max_rel_error": round(max(errs), 6),
               "quantized_tensors": len(codes), **({"sparsity_profile": profile} if profile else {}), **result}
    return codes, metrics


def _block_pruning(model, windows, cfg: ObsConfig, pruning: Pruning | None, dtype):
    """Block index → its Pruning: the same everywhere (uniform), or OWL's per-block sparsity (plus its record)."""
    if cfg.sparsity_profile == "uniform":
        return (lambda i: pruning), None
    if cfg.sparsity_profile != "owl":
        raise CompressError(f"compress.sparsity_profile = '{cfg.sparsity_profile}': expected 'uniform' or 'owl'.")
    if pruning is None or pruning.structured_nm:
        raise CompressError("compress.sparsity_profile 'owl' sets unstructured sparsity per block: it needs "
                            "compress.pattern 'unstructured' and a compress.sparsity in (0, 1).")
    if cfg.owl_threshold <= 0:
        raise CompressError(f"compress.owl_threshold = {cfg.owl_threshold}: must be > 0 (OWL uses 3-10).")
    from .owl import outlier_ratios, owl_profile
    cpu = next(model.parameters()).device.type == "cpu"
    with torch.autocast("cpu", dtype=dtype, enabled=cpu and dtype != torch.float32):
        ratios = outlier_ratios(model, windows, cfg.owl_threshold, cfg.batch_size)
    per_block = owl_profile(ratios, pruning.sparsity, cfg.owl_lambda)
    record = {"kind": "owl", "threshold": cfg.owl_threshold, "lambda": cfg.owl_lambda,
              "outlier_ratios": [round(r, 6) for r in ratios], "block_sparsity": [round(s, 6) for s in per_block]}
    return (lambda i: Pruning(sparsity=per_block[i])), record
