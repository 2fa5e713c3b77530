"""Knowledge-distillation losses, fused with the lm_head and computed in token chunks.

Where the memory of distillation goes is the (tokens × vocab) logits: teacher and
student, fp32, plus their softmaxes and gradients. Here a custom autograd Function
walks the tokens in chunks; for each chunk it forms both logits from the last
hidden states and the lm_head weights, reduces them to a loss, and — because the
gradient of every loss below with respect to the student logits has a closed form —
computes that chunk's gradient for the student hidden states and lm_head right away.
Backward then only scales the stored gradients: nothing is recomputed and no more
than one chunk of logits is ever alive.

Losses (p = teacher, q = student, both softened by the temperature T):
  forward_kl   KL(p ‖ q)                        (mean-seeking; Hinton et al.)
  reverse_kl   KL(q ‖ p)                        (mode-seeking)
  jsd          β·KL(p ‖ m) + (1−β)·KL(q ‖ m),  m = β·p + (1−β)·q
               (generalized JSD of GKD, Agarwal et al.; β→0 is forward KL, β→1 reverse KL,
               the convention TRL's GKDTrainer uses)
The KD term is scaled by T²; an optional hard-label cross-entropy (at T = 1) is mixed in as
(1 − ce_weight)·KD + ce_weight·CE. The sum over selected tokens is divided by `normalizer`
(default: the number of selected tokens here), so gradient accumulation passes the token
count of the whole optimizer step and gets the same gradient as one big batch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["forward_kl", "reverse_kl", "jsd"]
LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class LossSpec:
    kind: LossKind = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 1024
    compile: bool = False  # the per-chunk softmax arithmetic through torch.compile (one fused pass, bf16 in/out)

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"unknown loss '{self.kind}'; expected one of {LOSSES}")
        if not 0.0 <= self.beta <= 1.0 or not 0.0 <= self.ce_weight <= 1.0 or self.temperature <= 0:
            raise ValueError(f"bad loss settings {self}: need 0 ≤ beta ≤ 1, 0 ≤ ce_weight ≤ 1, temperature > 0")


@dataclass
class DenseTeacher:
    """Online teacher: its last hidden states [..., H_t] and lm_head weight [V, H_t]."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class TopKTeacher:
    """Offline teacher: its top-k log-probs [..., k] (at T = 1) and their token ids [..., k].

    The remaining probability mass is spread evenly over the other V − k tokens, which makes
    it a full distribution: every loss (reverse KL and JSD included) stays finite.
    """
    logprobs: torch.Tensor
    indices: torch.Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Softmax arithmetic runs in fp32 (fp64 when the inputs are fp64, as in the exactness tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _teacher_logits(teacher, rows: slice, vocab: int, acc: torch.dtype) -> torch.Tensor:
    """Teacher logits (up to a per-row constant) for a chunk of selected tokens (a dense teacher's in its
    compute dtype: the loss converts them to `acc` itself)."""
    if isinstance(teacher, DenseTeacher):
        return F.linear(teacher.hidden[rows], teacher.weight, teacher.bias)
    lp = teacher.logprobs[rows].to(acc)
    idx = teacher.indices[rows].long()
    k = lp.shape[-1]
    tail = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / max(vocab - k, 1)
    out = tail.log().expand(lp.shape[0], vocab).clone()
    return out.scatter_(-1, idx, lp)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Σ a·b [n, V] → [n] in one pass: a batched GEMV; linalg.vecdot multiplies into an [n, V] temporary
    on CPU, a whole extra pass over the chunk's logits. Under torch.compile the plain product-sum, which
    inductor fuses into the surrounding softmax kernels."""
    if torch.compiler.is_compiling():
        return (a * b).sum(-1)
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a·b without a temporary of a's size (per-row dots, then their sum)."""
    return _rowdot(a, b).sum()


def _chunk_loss_and_grad(z: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor | None,
                         spec: LossSpec, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of a chunk and its gradient w.r.t. the student logits z, in `out_dtype`. The arithmetic runs
    in fp32 (fp64 for fp64 inputs) whatever the logits' dtype."""
    acc = _acc(z.dtype)
    z = z.to(acc)
    t_logits = t_logits.to(acc)
    T = spec.temperature
    kind = spec.kind
    if kind == "jsd" and spec.beta in (0.0, 1.0):  # the mixture's limits, where one log would be −inf
        kind = "forward_kl" if spec.beta == 0.0 else "reverse_kl"
    ls = F.log_softmax(z if T == 1.0 else z / T, dim=-1)
    lt = F.log_softmax(t_logits if T == 1.0 else t_logits / T, dim=-1)
    del t_logits
    if kind == "forward_kl":
        pt = lt.exp()
        loss = _dot(pt, lt.sub_(ls))
        grad = ls.exp_().sub_(pt)                      # d/d(z/T) KL(p‖q) = q − p
        del pt
    else:
        qs = ls.exp()
        if kind == "reverse_kl":
            g = ls.sub_(lt)                            # d KL(q‖p) / dq, up to a constant
            loss = _dot(qs, g)
        else:
            b = spec.beta
            lm = torch.logaddexp(ls + math.log(1 - b), lt + math.log(b))
            pt = lt.exp()
            loss = b * _dot(pt, lt - lm) + (1 - b) * _dot(qs, ls - lm)
            g = ls.sub_(lm).mul_(1 - b)                # dJSD/dq; the p-terms cancel through m
            del pt, lm
        # Softmax Jacobian: dL/d(z/T) = q ⊙ (g − ⟨q, g⟩).
        rowdot = _rowdot(qs, g).unsqueeze(-1)
        grad = qs.mul_(g.sub_(rowdot))
        del g, qs
    del ls, lt
    scale = (1.0 - spec.ce_weight) * T  # T² · (1/T) from the chain rule through z/T
    loss = loss * (1.0 - spec.ce_weight) * T * T
    if scale != 1.0:
        grad.mul_(scale)
    if spec.ce_weight > 0.0 and labels is not None:
        valid = labels >= 0
        if valid.any():
            lsz = F.log_softmax(z, dim=-1)
            safe = labels.clamp_min(0)
            nll = -lsz.gather(-1, safe[:, None]).squeeze(-1)
            loss = loss + spec.ce_weight * (nll * valid).sum()
            pce = lsz.exp_()
            pce.scatter_add_(-1, safe[:, None], -torch.ones_like(pce[:, :1]))
            grad.add_(pce.mul_(valid[:, None].to(pce.dtype)), alpha=spec.ce_weight)
    return loss, grad.to(out_dtype)


@functools.cache
def _compiled_chunk():
    return torch.compile(_chunk_loss_and_grad, dynamic=None)


def _chunk_fn(spec: LossSpec):
    """The chunk arithmetic, compiled once per process when the spec asks for it."""
    return _compiled_chunk() if spec.compile else _chunk_loss_and_grad


class _ChunkedKD(torch.autograd.Function):
    """Loss over selected tokens; gradients computed chunk by chunk during forward."""

    @staticmethod
    def forward(ctx, hs, weight, bias, teacher, labels, spec: LossSpec, normalizer: float, cd: torch.dtype):
        n, vocab = hs.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        acc = _acc(cd)
        grad_h = torch.empty_like(hs) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hs.device)
        # Matmuls in the compute dtype `cd` (bf16 under autocast), softmax arithmetic in `acc` (fp32).
        w = weight.to(cd)
        b = None if bias is None else bias.to(cd)
        if isinstance(teacher, DenseTeacher):
            teacher = DenseTeacher(teacher.hidden.to(cd), teacher.weight.to(cd),
                                   None if teacher.bias is None else teacher.bias.to(cd))
        step = spec.chunk_tokens
        chunk = _chunk_fn(spec)
        with torch.autocast(hs.device.type, enabled=False):
            for s in range(0, n, step):
                rows = slice(s, min(s + step, n))
                h = hs[rows].to(cd)
                z = F.linear(h, w, b)
                loss, g = chunk(z, _teacher_logits(teacher, rows, vocab, acc),
                                None if labels is None else labels[rows], spec, cd)
                del z
                total += loss
                if need_h:
                    if grad_h.dtype == cd:
                        torch.mm(g, w, out=grad_h[rows])
                    else:
                        grad_h[rows] = g @ w
                if need_w:
                    if cd == acc:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w.add_(g.t() @ h)  # bf16 matmul, accumulated over chunks in fp32
                if need_b:
                    grad_b.add_(g.sum(0))
                del g
        inv = 1.0 / normalizer
        ctx.save_for_backward(*(t.mul_(inv) if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.has = (need_h, need_w, need_b)
        ctx.w_dtype = weight.dtype
        return total * inv

    @staticmethod
    def backward(ctx, go):
        gh, gw, gb = ctx.saved_tensors
        need_h, need_w, need_b = ctx.has
        return (gh * go if need_h else None, (gw * go).to(ctx.w_dtype) if need_w else None,
                (gb * go).to(ctx.w_dtype) if need_b else None, None, None, None, None, None)


def kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher: DenseTeacher | TopKTeacher,
            spec: LossSpec = LossSpec(), *, mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
            normalizer: float | None = None, student_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation loss of the student's last hidden states [..., H] through lm_head `student_weight` [V, H].

    `mask` [...] (bool) selects the positions that count (e.g. completion tokens, not prompt or padding);
    `labels` [...] (next-token ids, −100 to skip) feed the optional hard-label CE term;
    `normalizer` is the number of counted tokens in the whole optimizer step (gradient accumulation).
    """
    H = student_hidden.shape[-1]
    hs = student_hidden.reshape(-1, H)
    keep = None if mask is None else mask.reshape(-1).bool()
    if isinstance(teacher, DenseTeacher):
        t_rows = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])
        t = DenseTeacher(t_rows if keep is None else t_rows[keep], teacher.weight, teacher.bias)
    else:
        k = teacher.logprobs.shape[-1]
        lp, ix = teacher.logprobs.reshape(-1, k), teacher.indices.reshape(-1, k)
        t = TopKTeacher(lp if keep is None else lp[keep], ix if keep is None else ix[keep])
    lab = None if labels is None else labels.reshape(-1)
    if keep is not None:
        hs = hs[keep]
        lab = None if lab is None else lab[keep]
    if normalizer is None:
        normalizer = max(hs.shape[0], 1)
    dev = hs.device.type
    cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hs.dtype
    return _ChunkedKD.apply(hs, student_weight, student_bias, t, lab, spec, float(normalizer), cd)


def dense_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: LossSpec,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """The same loss from full logits with plain autograd (for tests and the naive benchmark row)."""
    T = spec.temperature
    acc = _acc(student_logits.dtype)
    student_logits = student_logits.to(acc)
    ls = F.log_softmax(student_logits / T, -1)
    lt = F.log_softmax(teacher_logits.to(acc) / T, -1)
    if spec.kind == "forward_kl":
        per = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    elif spec.kind == "reverse_kl":
        per = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    else:
        b = spec.beta
        if b == 0.0:
            per = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
        elif b == 1.0:
            per = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
        else:
            lm = torch.logsumexp(torch.stack([ls + math.log(1 - b), lt + math.log(b)]), 0)
            per = (b * F.kl_div(lm, lt, log_target=True, reduction="none").sum(-1)
                   + (1 - b) * F.kl_div(lm, ls, log_target=True, reduction="none").sum(-1))
    total = (1 - spec.ce_weight) * T * T * per
    if spec.ce_weight > 0 and labels is not None:
        ce = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), labels.reshape(-1),
                             ignore_index=-100, reduction="none").reshape(per.shape)
        total = total + spec.ce_weight * ce
    return total.mean()
