"""Causal attention for the calibration forwards on CPU, in query blocks.

torch's CPU flash-attention kernel splits keys into blocks of 512, so for calibration windows of ≤ 512 tokens
`is_causal` skips nothing: every query computes against every key, half of them masked. Queries in blocks of
`QUERY_BLOCK`, each against the keys up to its own end with an explicit mask on that span, compute about
half the products: on SmolLM2-135M's shape (32 windows × 512 tokens, 9 heads, 3 KV heads) 103 ms instead of
145 ms per block in bf16 on the 2-core build machine. The result is attention over the same keys, differing
only in rounding (≤ 1e-3 in bf16).

It is used through transformers' attention interface, so any model whose attention calls that interface
(Llama, Qwen2, Mistral, Phi-3) gets it, and only for the compression's own copies of the blocks
(`calibration_attention`). Anything but plain causal self-attention without a mask — padding or sliding-window
masks, softcapping, attention sinks, dropout, a KV cache, another device — goes to transformers' own SDPA path.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

NAME = "edgedistill_causal_blocks"
QUERY_BLOCK = 64


def causal_blocks_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-interface signature: [B, H, S, D] in, ([B, S, H, D], None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    plain = (attention_mask is None and causal and not dropout and q_len == kv_len and q_len > QUERY_BLOCK
             and query.device.type == "cpu" and query.shape[1] % key.shape[1] == 0
             and not any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias", "cache")))
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    out = torch.empty(query.shape[0], q_len, query.shape[1], value.shape[-1], dtype=query.dtype, device=query.device)
    for i in range(0, q_len, QUERY_BLOCK):
        e = min(i + QUERY_BLOCK, q_len)
        mask = torch.ones(e - i, e, dtype=torch.bool, device=query.device).tril(i)  # query i+r sees keys ≤ i+r
        o = F.scaled_dot_product_attention(query[:, :, i:e], key[:, :, :e], value[:, :, :e], attn_mask=mask,
                                           scale=scaling, enable_gqa=gqa)
        out[:, i:e] = o.transpose(1, 2)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, causal_blocks_attention)


@contextlib.contextmanager
def calibration_attention(module: torch.nn.Module) -> Iterator[None]:
    """Inside, the SDPA attention of `module`'s submodules runs as causal_blocks_attention; their configs are
    restored on exit (a block that is not a copy shares its config with the whole model)."""
    configs = {id(m.config): m.config for m in module.modules()
               if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"}
    if not configs:
        yield
        return
    _register()
    for c in configs.values():
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c in configs.values():
            c._attn_implementation = "sdpa"
