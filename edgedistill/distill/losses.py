"""Knowledge-distillation losses, computed in token chunks from hidden states.

Full (tokens × vocab) logits of teacher and student are never held at once:
each chunk's logits are formed from the last hidden states and the lm_head,
reduced to a scalar, and recomputed during backward (activation checkpointing),
so peak memory grows with the chunk, not the sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _forward_kl_chunk(h_s: torch.Tensor, w_s: torch.Tensor, b_s, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    s_logits = F.linear(h_s, w_s, b_s).float() / temperature
    t_logp = F.log_softmax(t_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits, dim=-1)
    # KL(p_t || p_s) summed over vocabulary and tokens.
    return (t_logp.exp() * (t_logp - s_logp)).sum()


def forward_kl(student_hidden: torch.Tensor, student_head: torch.nn.Linear, teacher_hidden: torch.Tensor,
               teacher_head: torch.nn.Linear, mask: torch.Tensor | None = None, temperature: float = 1.0,
               chunk_tokens: int = 1024, recompute: bool | None = None) -> torch.Tensor:
    """Mean over (unmasked) tokens of KL(teacher ‖ student), scaled by T² as in Hinton et al.

    `recompute` (default: when all logits would exceed ~512 MB) trades one extra lm_head
    matmul per chunk for not keeping the chunk's logits alive until backward.
    """
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        hs, ht = hs[keep], ht[keep]
    n = hs.shape[0]
    if recompute is None:
        recompute = n * student_head.weight.shape[0] * 4 > (512 << 20)
    total = hs.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_tokens):
        with torch.no_grad():
            t_logits = teacher_head(ht[s:s + chunk_tokens])
        part = hs[s:s + chunk_tokens]
        if recompute and torch.is_grad_enabled() and part.requires_grad:
            total = total + checkpoint(_forward_kl_chunk, part, student_head.weight, student_head.bias, t_logits,
                                       temperature, use_reentrant=False)
        else:
            total = total + _forward_kl_chunk(part, student_head.weight, student_head.bias, t_logits, temperature)
    return total * (temperature ** 2) / max(n, 1)
