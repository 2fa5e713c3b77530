"""Round-to-nearest weight quantization onto a GGUF block grid.

The simplest real compressor: every 2-D weight whose input dimension fits the
block grid is replaced by its quantized value. We keep two things: the integer
codes + scales (export/ writes them into GGUF bit for bit) and a dequantized
copy of the model (so torch can evaluate exactly what the GGUF file holds).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..artifacts import atomic_write_bytes
from ..errors import CompressError
from .grids import BLOCK, GRIDS, QuantCodes, dequantize, quantize

CODES_FILE = "quant_codes.safetensors"


def quantizable(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 2 and p.shape[1] % BLOCK == 0 and name.endswith(".weight")


@torch.no_grad()
def quantize_model(model, grid: str) -> tuple[dict[str, QuantCodes], dict]:
    if grid not in GRIDS:
        raise CompressError(f"unknown grid '{grid}'; expected one of {sorted(GRIDS)}")
    codes: dict[str, QuantCodes] = {}
    skipped: list[str] = []
    err_num = err_den = 0.0
    worst = 0.0
    for name, p in model.named_parameters():  # named_parameters() lists a tied weight once
        if not quantizable(name, p):
            if p.ndim == 2:
                skipped.append(name)
            continue
        qc = quantize(p.data, grid)
        deq = dequantize(qc)
        num = (deq - p.data.float()).pow(2).sum().item()
        den = p.data.float().pow(2).sum().item()
        err_num, err_den = err_num + num, err_den + den
        worst = max(worst, (num / max(den, 1e-30)) ** 0.5)
        p.data.copy_(deq.to(p.dtype))
        codes[name] = qc
    if not codes:
        raise CompressError(f"no weight fits the {grid} grid (input dimension must be a multiple of {BLOCK}).")
    g = GRIDS[grid]
    bits = g.bits + 16 / BLOCK * (2 if g.has_min else 1)
    return codes, {"grid": grid, "quantized_tensors": len(codes), "skipped_tensors": skipped,
                   "bits_per_weight": bits, "rel_rms_error": (err_num / max(err_den, 1e-30)) ** 0.5,
                   "worst_tensor_rel_rms_error": worst}


def save_codes(codes: dict[str, QuantCodes], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, qc in codes.items():
        tensors[f"{name}::codes"] = qc.codes.contiguous()
        tensors[f"{name}::scales"] = qc.scales.contiguous()
        if qc.mins is not None:
            tensors[f"{name}::mins"] = qc.mins.contiguous()
    grids = {qc.grid for qc in codes.values()}
    data = save(tensors, metadata={"format": "edgedistill-quant-codes", "grid": ",".join(sorted(grids))})
    atomic_write_bytes(path, _sorted_metadata(data))


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors writes its metadata map in hash order, which changes from process to process: sort it, so the
    same codes always make the same bytes (a resumed build then matches a clean one hash for hash)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, "re-serialised safetensors header grew"
    return data[:8] + text.ljust(n, b" ") + data[8 + n:]


def load_codes(path: Path) -> dict[str, QuantCodes]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "edgedistill-quant-codes":
        raise CompressError(f"{path} is not an edgedistill quantization-codes file.")
    grid = meta["grid"]
    raw = load_file(str(path))
    names = sorted({k.split("::")[0] for k in raw})
    return {n: QuantCodes(grid, raw[f"{n}::codes"], raw[f"{n}::scales"], raw.get(f"{n}::mins")) for n in names}
