"""Structured pruning with OBS compensation: a genuinely smaller dense model.

Per block, the consuming projection's Hessian chooses what to remove and
compensates the rest: FFN intermediate neurons through down_proj (removing
rows of gate/up), attention heads through o_proj, a whole KV group at a time
under GQA (removing its query heads' rows of q_proj and its rows of k/v_proj).
Every block removes the same count, since HF configs hold one width per model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CompressError
from .grids import BLOCK
from .layerwise import InputGroup, compress_layerwise, decoder_blocks
from .methods import resolve_device
from .obs import remove_column_groups


@dataclass(frozen=True)
class StructuredNames:
    """Per-architecture module names inside a block (a table, not `if arch` chains)."""
    ffn_producers: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    ffn_consumer: str = "mlp.down_proj"
    q: str = "self_attn.q_proj"
    kv: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj")
    attn_consumer: str = "self_attn.o_proj"


NAMES: dict[str, StructuredNames] = {m: StructuredNames() for m in ("llama", "mistral", "qwen2", "qwen3")}


def _shrink_rows(lin: torch.nn.Linear, rows: torch.Tensor) -> None:
    lin.weight = torch.nn.Parameter(lin.weight.data[rows].clone(), requires_grad=False)
    if lin.bias is not None:
        lin.bias = torch.nn.Parameter(lin.bias.data[rows].clone(), requires_grad=False)
    lin.out_features = len(rows)


def _shrink_cols(lin: torch.nn.Linear, W: torch.Tensor, cols: torch.Tensor) -> None:
    lin.weight = torch.nn.Parameter(W[:, cols].to(lin.weight.dtype).contiguous(), requires_grad=False)
    lin.in_features = len(cols)


@torch.no_grad()
def structured_prune(model, windows: list[list[int]], *, ffn_sparsity: float, heads_sparsity: float = 0.0,
                     damp: float = 0.01, device: str = "auto", batch_size: int = 8) -> tuple[object, dict]:
    cfg = model.config
    names = NAMES.get(cfg.model_type)
    if names is None:
        raise CompressError(f"structured pruning knows the module names of {sorted(NAMES)}; "
                            f"'{cfg.model_type}' is not among them.")
    if not 0.0 <= ffn_sparsity < 1.0 or not 0.0 <= heads_sparsity < 1.0:
        raise CompressError(f"compress.sparsity ({ffn_sparsity}) and compress.heads_sparsity ({heads_sparsity}) "
                            f"must lie in [0, 1).")
    F = cfg.intermediate_size
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rep = n_heads // n_kv
    # Keep FFN widths on the 32-column GGUF block grid so the down projection stays quantizable.
    keep_ffn = max(BLOCK, int(round(F * (1 - ffn_sparsity) / BLOCK)) * BLOCK) if ffn_sparsity > 0 else F
    keep_ffn = min(keep_ffn, F)
    keep_kv = max(1, int(round(n_kv * (1 - heads_sparsity))))
    if keep_ffn == F and keep_kv == n_kv:
        raise CompressError(f"structured pruning with sparsity {ffn_sparsity} and heads_sparsity {heads_sparsity} "
                            f"removes nothing from {F} FFN neurons and {n_kv} KV groups; raise one of them.")

    def compress_group(i: int, group: InputGroup, lin: dict[str, torch.nn.Linear]) -> dict:
        H = group.hessian.H
        out = {}
        if names.ffn_consumer in group.names and keep_ffn < F:
            down = lin[names.ffn_consumer]
            groups = torch.arange(F, device=H.device).unsqueeze(1)
            kept, W, err = remove_column_groups(down.weight.data.float().to(H.device), H, groups, F - keep_ffn,
                                                f"layers.{i}.{names.ffn_consumer}", damp)
            cols = torch.tensor(kept, device=W.device)
            _shrink_cols(down, W, cols)
            for p in names.ffn_producers:
                _shrink_rows(lin[p], cols.to(lin[p].weight.device))
            out[names.ffn_consumer] = {"rel_error": round(err, 6), "kept": len(kept), "of": F}
        if names.attn_consumer in group.names and keep_kv < n_kv:
            o = lin[names.attn_consumer]
            cols_per_group = rep * hd
            groups = torch.arange(n_heads * hd, device=H.device).reshape(n_kv, cols_per_group)
            kept, W, err = remove_column_groups(o.weight.data.float().to(H.device), H, groups, n_kv - keep_kv,
                                                f"layers.{i}.{names.attn_consumer}", damp)
            kept_t = torch.tensor(kept, device=W.device)
            _shrink_cols(o, W, groups[kept_t].reshape(-1))
            _shrink_rows(lin[names.q], groups[kept_t].reshape(-1).to(lin[names.q].weight.device))
            kv_rows = (kept_t.unsqueeze(1) * hd + torch.arange(hd, device=W.device)).reshape(-1)
            for p in names.kv:
                _shrink_rows(lin[p], kv_rows.to(lin[p].weight.device))
            out[names.attn_consumer] = {"rel_error": round(err, 6), "kept_kv_groups": kept, "of": n_kv}
        return out

    params_before = sum(p.numel() for p in model.parameters())
    result = compress_layerwise(model, windows, compress_group, device=resolve_device(device),
                                batch_size=batch_size, label="structured")
    cfg.intermediate_size = keep_ffn
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = keep_kv * rep, keep_kv, hd
    for blk in decoder_blocks(model):
        attn = getattr(blk, "self_attn", None)
        for attr, value in (("num_heads", keep_kv * rep), ("num_key_value_heads", keep_kv)):
            if attn is not None and hasattr(attn, attr):
                setattr(attn, attr, value)
    errs = [m["rel_error"] for m in result["layers"].values()]
    return model, {"ffn_kept": keep_ffn, "ffn_of": F, "kv_groups_kept": keep_kv, "kv_groups_of": n_kv,
                   "params_before": params_before, "params_after": sum(p.numel() for p in model.parameters()),
                   "mean_rel_error": round(sum(errs) / max(len(errs), 1), 6),
                   "max_rel_error": round(max(errs, default=0.0), 6), **result}
