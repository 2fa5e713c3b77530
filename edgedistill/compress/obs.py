"""The one Hessian (OBS) engine behind SparseGPT, GPTQ and structured pruning.

A linear layer y = W x is compressed against its calibration inputs X through
H = 2 X Xᵀ: removing or rounding weight w_i costs (w_i − q_i)² / [H⁻¹]_ii and is
compensated on the columns not yet processed along row i of H⁻¹'s upper
Cholesky factor U. Columns are swept left to right:

* the sweep is blocked twice: an outer block (`blocksize`, 128 as in the papers)
  fixes the adaptive unstructured mask and batches the update of all later
  columns into one matrix product; inside it, sub-blocks of `SUB` columns are
  solved together.
* pure pruning of a sub-block is linear, so its sequential column loop collapses
  into one batched triangular solve per row (`_pruned_errors`).
* N:M groups are solved in closed form: each group's mask is still chosen from
  the weights as earlier groups left them, and its errors come from a table of
  the group's solve for each of the C(m, n) masks (`_NMTables`); on a GPU a
  whole outer block of groups is one CUDA graph replay (`_GraphedNMBlock`).
* rounding onto a grid is not linear: those columns go one at a time, but only
  over a sub-block's width.

Everything here is pure tensor math on one device; `layerwise.py` feeds it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..errors import CompressError
from .grids import BLOCK, GRIDS, QuantCodes, _round_away, quantize

log = logging.getLogger("edgedistill.compress")

SUB = 16  # columns solved together inside an outer block (a multiple of every supported N:M group's M)
DAMP_ESCALATION = (1.0, 10.0, 100.0, 1000.0)  # multiples of `damp` tried before giving up


@dataclass(frozen=True)
class Pruning:
    """What to remove: `sparsity` of each (segment, outer block) by saliency, or `n` of every `m` columns."""
    sparsity: float = 0.0
    n: int = 0
    m: int = 0

    @property
    def structured_nm(self) -> bool:
        return self.m > 0


@dataclass
class SweepResult:
    weight: torch.Tensor              # compressed weight, original column order, fp32
    codes: QuantCodes | None          # when a grid was given
    mask: torch.Tensor | None         # True where a weight was pruned
    segment_errors: list[float] | None = None  # relative reconstruction error of each stacked linear


# ---------------------------------------------------------------- Hessians
class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ in fp32 over calibration tokens (any leading shape; last dim = features).

    bf16 inputs on a CPU with AVX-512 BF16 go to `gram.gram_bf16_`: bf16 products, fp32 accumulation, at the bf16
    rate (`native=False` or `EDGEDISTILL_NATIVE=0` turns it off). Otherwise H is symmetric, so only its lower
    triangle is multiplied, as row panels of ~`BLOCK_COLS` rows: panel p gets X[:, p]ᵀ X[:, :p.stop], one GEMM
    each (4 panels cover 62.5% of the full product for SmolLM2's 1536-wide down_proj input); `H` mirrors the upper
    triangle once when read. The input is converted to fp32 once, untransposed: BLAS reads the transposed column
    slice directly (a transposed copy cost as much as the products)."""

    BLOCK_COLS = 384

    def __init__(self, columns: int, device: torch.device | str, native: bool = True):
        self._H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        n_blocks = max(1, round(columns / self.BLOCK_COLS))
        edges = [round(columns * k / n_blocks) for k in range(n_blocks + 1)]
        self._blocks = [slice(a, b) for a, b in zip(edges, edges[1:])]
        self.tokens = 0
        self._mirrored = True  # all zeros
        self.native = native

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        total = self.tokens + x2.shape[0]
        if total == self.tokens:
            return
        if self.native and x2.dtype == torch.bfloat16 and self._H.device.type == "cpu":
            from .gram import gram_bf16_
            H = self.H  # symmetric on entry: the kernel scales and writes both triangles
            if gram_bf16_(H, x2.to(self._H.device), 2.0 / total, self.tokens / total):
                self.tokens = total
                return
        xf = x2.to(self._H.device, torch.float32)  # [tokens, features]
        self._H.mul_(self.tokens / total)
        for a in self._blocks:
            self._H[a, :a.stop].addmm_(xf[:, a].T, xf[:, :a.stop], alpha=2.0 / total)
        self.tokens = total
        self._mirrored = False

    @property
    def H(self) -> torch.Tensor:
        if not self._mirrored:
            for i, a in enumerate(self._blocks):
                for b in self._blocks[:i]:
                    self._H[b, a] = self._H[a, b].T
                # the diagonal panel was computed in full: make it exactly symmetric (GEMM rounding differs)
                d = self._H[a, a]
                d.copy_(torch.tril(d) + torch.tril(d, -1).T)
            self._mirrored = True
        return self._H


def inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹ and the mask of dead inputs (zero diagonal).

    λ = damp · mean(diag H). If the factorisation fails, λ is raised tenfold (logged) up to
    `DAMP_ESCALATION[-1]` · damp; then a CompressError names the layer.
    """
    return _damped(H, damp, name, upper_factor=True)


def damped_inverse(H: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + λI)⁻¹ itself (for structured removal), with the same dead-input handling and escalation."""
    return _damped(H, damp, name, upper_factor=False)


def _damped(H: torch.Tensor, damp: float, name: str, upper_factor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean_diag = torch.diag(H).mean().item()
    if not torch.isfinite(H.sum()):  # one reduction: inf/NaN anywhere propagates into the sum
        raise CompressError(f"layer '{name}': its calibration Hessian holds inf/NaN (the layer's inputs overflow). "
                            f"Calibrate in float32 or check the model's weights.")
    eye = torch.arange(H.shape[0], device=H.device)
    for factor in DAMP_ESCALATION:
        lam = damp * factor * mean_diag
        Hd = H.clone()
        Hd[eye, eye] += lam
        if upper_factor:
            # With J the reversal, J H J = L Lᵀ gives H⁻¹ = Uᵀ U for the upper U = J L⁻¹ J: one factorisation and
            # one triangular inverse instead of factorise, invert, factorise again.
            L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
            if info.item() == 0:
                U = lower_inverse(L).flip(0, 1)
                if torch.isfinite(torch.diagonal(U)).all():
                    return U, dead
        else:
            L, info = torch.linalg.cholesky_ex(Hd)
            if info.item() == 0:
                return torch.cholesky_inverse(L), dead
        log.warning("layer '%s': Cholesky failed with dampening %.3g of the mean diagonal; retrying with %.3g",
                    name, damp * factor, damp * factor * 10)
    raise CompressError(f"layer '{name}': the calibration Hessian is not positive definite even with dampening "
                        f"{damp * DAMP_ESCALATION[-1]:.3g} × its mean diagonal. Use more calibration samples or "
                        f"raise compress.damp.")


def lower_inverse(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """L⁻¹ of a lower-triangular L. On CPU by halves, [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]], down to
    triangular solves of ≤ `leaf` columns: about n³/3 multiply-adds, mostly in GEMMs, where one triangular solve
    against the identity does n³ (on the 2-core machine 48 ms less per SmolLM2-135M block). Rounding differs from
    the single solve; over 42 calibration groups of SmolLM2-135M their SparseGPT errors differed by 5e-9 relative on
    average (spread 7e-8), either way. On a GPU: the single solve, one kernel."""
    n = L.shape[0]
    if L.device.type != "cpu" or n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = (n // 2 + 63) // 64 * 64
    a_inv, c_inv = lower_inverse(L[:h, :h], leaf), lower_inverse(L[h:, h:], leaf)
    out = torch.zeros_like(L)
    out[:h, :h] = a_inv
    out[h:, h:] = c_inv
    out[h:, :h] = -(c_inv @ (L[h:, :h] @ a_inv))
    return out


def reconstruction_terms(W0: torch.Tensor, W1: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """(‖(W1 − W0) X‖², ‖W0 X‖²) over the calibration inputs behind H."""
    D = (W1 - W0).float()
    return ((D @ H) * D).sum().item(), ((W0.float() @ H) * W0.float()).sum().item()


def reconstruction_error(W0: torch.Tensor, W1: torch.Tensor, H: torch.Tensor) -> float:
    """‖(W1 − W0) X‖² / ‖W0 X‖² over the calibration inputs behind H."""
    num, den = reconstruction_terms(W0, W1, H)
    return num / den if den > 0 else 0.0


# ---------------------------------------------------------------- grid rounding with fixed scales
@dataclass
class GroupScales:
    """fp16 scales (and Q4_1 mins) of every 32-column block, decided before its columns are rounded."""
    grid: str
    scales: torch.Tensor  # [rows, cols/32] fp16
    mins: torch.Tensor | None

    @classmethod
    def empty(cls, grid: str, rows: int, cols: int, device) -> "GroupScales":
        z = torch.zeros(rows, cols // BLOCK, dtype=torch.float16, device=device)
        return cls(grid, z, z.clone() if GRIDS[grid].has_min else None)

    def set_from(self, group: int, w: torch.Tensor) -> None:
        """ggml's own choice of scale (and min) for the current values of one 32-column block."""
        qc = quantize(w, self.grid)
        self.scales[:, group] = qc.scales[:, 0]
        if self.mins is not None:
            self.mins[:, group] = qc.mins[:, 0]

    def round(self, w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and dequantized values of column `w` in block `group` (what llama.cpp will compute)."""
        g = GRIDS[self.grid]
        d = self.scales[:, group].float()
        m = self.mins[:, group].float() if self.mins is not None else 0.0
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        x = (w - m) * inv
        q = torch.clamp(_round_away(x), g.qmin, g.qmax)
        return q, q * d + m


# ---------------------------------------------------------------- the sweep
def _pruned_errors(Wt: torch.Tensor, U: torch.Tensor, mask_t: torch.Tensor, batched: bool) -> torch.Tensor:
    """Scaled errors Eᵀ [b, rows] of pruning `mask_t` in a transposed sub-block Wᵀ [b, rows] given U [b, b]
    (upper): for a pruned column i, Σ_{k≤i} U_ki E_k = W_i; E_i = 0 otherwise. Leaves Wᵀ unchanged.

    batched: one lower-triangular solve per row in a single batched call (one kernel on a GPU). Else
    forward substitution over the b columns, each step vectorised over rows: on CPU the batched solve
    is a LAPACK call per row, thousands per sub-block, and was slower than the published column loop."""
    if batched:
        mr = mask_t.to(Wt.dtype).T
        A = U.T.expand(Wt.shape[1], -1, -1) * mr.unsqueeze(-1)
        A.diagonal(dim1=-2, dim2=-1).add_(1.0 - mr)
        return torch.linalg.solve_triangular(A, (Wt.T * mr).unsqueeze(-1), upper=False).squeeze(-1).T
    # Two ops per column on views made once: dividing by U_cc where pruned and by inf elsewhere gives the ±0 that
    # R·0/U_cc gave, and the strict upper row of U (zeros up to c) updates every row, the earlier ones by −0.
    # Bit-identical to the textbook loop in half its time: on CPU the sweep is bound by per-op overhead.
    Dm = torch.where(mask_t, torch.diagonal(U).unsqueeze(1), torch.tensor(float("inf"), dtype=Wt.dtype))
    R = Wt.clone()
    E = torch.empty_like(Wt)
    for r, e, d, u in zip(R.unbind(0), E.unbind(0), Dm.unbind(0), torch.triu(U, 1).unbind(0)):
        torch.div(r, d, out=e)
        R.addr_(u, e, alpha=-1.0)
    return E


_KERNELS: dict = {}  # "pruned_block", "lowest" → numba function, or None without numba; built once, under the lock
_KERNELS_LOCK = threading.Lock()


def _pruned_block_kernel():
    return _kernels()["pruned_block"]


def _select_kernel():
    """numba's selection of an outer block's lowest-saliency weights, or None without numba (see _unstructured_mask)."""
    return _kernels()["lowest"]


def _kernels() -> dict:
    """The numba kernels of the CPU sweep, built (or loaded from numba's cache) on first use, once: two groups'
    sweeps start side by side on threads."""
    with _KERNELS_LOCK:
        if not _KERNELS:
            _KERNELS.update(_build_kernels())
    return _KERNELS


def _build_kernels() -> dict:
    """On CPU the sweep's cost is its per-column loop, not arithmetic: in torch a few tiny ops per column whose
    dispatch (and the GIL, when two groups sweep side by side) dominates. Compiled, an outer block is one call that
    releases the GIL: 1.82 s → 0.99 s for the sweeps of 7 SmolLM2-135M blocks on one thread (an outer block of a
    576-row weight: 0.28 ms), per-layer errors equal to 1e-7 relative. Without numba: None, and the torch loops."""
    try:
        import numba
    except ImportError:
        return {"pruned_block": None, "lowest": None}

    # one signature, C-contiguous arrays: the inner loops vectorise (a strided-array version ran 6× slower)
    @numba.njit("void(float32[:, ::1], float32[:, ::1], boolean[:, ::1], float32[:, ::1])", nogil=True,
                cache=True, error_model="numpy")
    def pruned_block(W1, U1, mask1, E1):
        """In place on W1 [b, rows] (an outer block of Wᵀ): columns left to right, each pruned weight's error
        e = w / U_cc into E1 and onto the block's later columns along U's row c, then the weight set to 0."""
        b, rows = W1.shape
        for c in range(b):
            d = U1[c, c]
            for r in range(rows):
                if mask1[c, r]:
                    E1[c, r] = W1[c, r] / d
                    W1[c, r] = 0.0
                else:
                    E1[c, r] = 0.0
            for k in range(c + 1, b):
                u = U1[c, k]
                for r in range(rows):
                    W1[k, r] -= u * E1[c, r]

    @numba.njit("void(float32[:, ::1], float32[::1], int64, int64, int64, float32[:, ::1], boolean[:, ::1])",
                nogil=True, cache=True, error_model="numpy")
    def lowest(W1, d, r0, r1, k, scratch, mask):
        """mask[:, r0:r1] = the k lowest w²/d² of W1[:, r0:r1] (W1 is an outer block of Wᵀ, [b, rows]), by a radix
        select on the scores' bits (non-negative floats order as their bits do): two 16-bit histogram passes and
        one marking pass, where topk sorts. Scores are computed as torch computes them (fp32 w², d², quotient);
        ties at the threshold are taken in order."""
        b = W1.shape[0]
        bits = scratch.view(np.uint32)
        hist = np.zeros(65536, np.int64)
        for c in range(b):
            dd = d[c] * d[c]
            for r in range(r0, r1):
                w = W1[c, r]
                scratch[c, r] = (w * w) / dd
                hist[bits[c, r] >> 16] += 1
        below, hi = 0, 0
        while below + hist[hi] < k:
            below += hist[hi]
            hi += 1
        hist[:] = 0
        for c in range(b):
            for r in range(r0, r1):
                if bits[c, r] >> 16 == hi:
                    hist[bits[c, r] & 0xFFFF] += 1
        lo = 0
        while below + hist[lo] < k:
            below += hist[lo]
            lo += 1
        t = np.uint32((hi << 16) | lo)
        ties = k - below
        for c in range(b):
            for r in range(r0, r1):
                u = bits[c, r]
                if u < t:
                    mask[c, r] = True
                elif u == t and ties > 0:
                    mask[c, r] = True
                    ties -= 1
                else:
                    mask[c, r] = False
    return {"pruned_block": pruned_block, "lowest": lowest}


def _unstructured_mask(W1: torch.Tensor, d: torch.Tensor, sparsity: float, segments: list[tuple[int, int]],
                       jit: bool = True) -> torch.Tensor:
    """Exactly floor(sparsity · size) lowest-saliency weights of each segment's slice of the block (W1: [rows, b]).
    On CPU through numba's radix select on the contiguous Wᵀ block when W1 is its transpose (the sweep's case)."""
    kernel = _select_kernel() if jit and W1.device.type == "cpu" and W1.dtype == torch.float32 else None
    if kernel is not None and W1.T.is_contiguous():
        Wt1 = W1.T
        mask_t = torch.zeros(Wt1.shape, dtype=torch.bool)  # rows in no segment stay unpruned
        scratch = torch.empty(Wt1.shape, dtype=torch.float32)
        Wa, da, sa, ma = Wt1.numpy(), d.contiguous().numpy(), scratch.numpy(), mask_t.numpy()
        for r0, r1 in segments:
            kernel(Wa, da, r0, r1, int(Wt1.shape[0] * (r1 - r0) * sparsity), sa, ma)
        return mask_t.T
    score = W1.pow(2) / d.pow(2).unsqueeze(0)
    mask = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
    for r0, r1 in segments:
        s = score[r0:r1].reshape(-1)
        k = int(s.numel() * sparsity)
        if k:
            idx = torch.topk(s, k, largest=False, sorted=False).indices
            mask[r0:r1].view(-1)[idx] = True
    return mask


def _nm_mask(W: torch.Tensor, d: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """n lowest-saliency weights of every group of m consecutive columns (W has a multiple of m columns)."""
    rows, b = W.shape
    score = (W.pow(2) / d.pow(2).unsqueeze(0)).reshape(rows, b // m, m)
    idx = torch.topk(score, n, dim=-1, largest=False).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, b)


class _NMTables:
    """Closed-form OBS solves for every mask of every N:M group of a weight, so that a group costs a dozen
    tensor ops instead of a column loop.

    For a group g of m columns with pruned set P, the sequential OBS errors satisfy e_P U_PP = w_P, e_K = 0
    (U: the group's diagonal block of the upper factor). With M = diag(mask) and T = M U M + (I − M),
    e = w M T⁻¹ exactly; `a[g, bits]` holds M T⁻¹ for each of the C(m, n) masks, indexed by the mask's bits
    (other entries stay zero and are never read)."""

    def __init__(self, U: torch.Tensor, n: int, m: int):
        cols = U.shape[0]
        G, dev = cols // m, U.device
        r = torch.arange(m, device=dev)
        base = (torch.arange(G, device=dev) * m)[:, None, None]
        Ug = U[base + r[:, None], base + r[None, :]]                        # [G, m, m] diagonal blocks
        codes = torch.arange(2 ** m, device=dev)
        bits = ((codes[:, None] >> r) & 1).to(U.dtype)                        # [2^m, m]
        valid = bits.sum(-1) == n
        Mq = bits[valid]                                                      # [Q, m]
        T = Ug[:, None] * (Mq[:, :, None] * Mq[:, None, :]) + torch.diag_embed(1.0 - Mq)[None]
        eye = torch.eye(m, dtype=U.dtype, device=dev).expand_as(T)
        Tinv = torch.linalg.solve_triangular(T, eye, upper=True)              # [G, Q, m, m]
        self.a = torch.zeros(G, 2 ** m, m, m, dtype=U.dtype, device=dev)
        self.a[:, valid] = Mq[None, :, :, None] * Tinv
        self.strict_t = torch.triu(Ug, 1).transpose(1, 2).contiguous()      # [G, m, m]: updates inside a group
        self.inv_d2 = (1.0 / torch.diagonal(Ug, dim1=1, dim2=2).pow(2)).unsqueeze(-1)  # [G, m, 1]
        self.pow2 = (2 ** r).to(U.dtype)                                      # mask bits → table index
        self.n, self.m = n, m


def _nm_block(W1: torch.Tensor, U1: torch.Tensor, tab: _NMTables, g0: int, E1: torch.Tensor,
              mask1: torch.Tensor) -> None:
    """One outer block of an N:M sweep, in place: W1 [b, rows] (transposed weights), its errors into E1 and
    its mask into mask1. Each group's mask is chosen from the weights as every earlier group left them."""
    n, m = tab.n, tab.m
    for k, j1 in enumerate(range(0, W1.shape[0], m)):
        j2, g = j1 + m, g0 + k
        w = W1[j1:j2]                                                         # [m, rows]
        score = w.square() * tab.inv_d2[g]
        idx = torch.topk(score, n, dim=0, largest=False).indices
        mask = torch.zeros_like(w, dtype=torch.bool).scatter_(0, idx, True)
        code = (tab.pow2 @ mask.to(w.dtype)).long()                           # [rows]
        e = torch.bmm(w.T.unsqueeze(1), tab.a[g][code]).squeeze(1).T          # [m, rows]
        w.sub_(tab.strict_t[g] @ e).masked_fill_(mask, 0.0)
        E1[j1:j2] = e
        mask1[j1:j2] = mask
        if j2 < W1.shape[0]:
            W1[j2:].sub_(U1[j1:j2, j2:].T @ e)


class _GraphedNMBlock:
    """`_nm_block` replayed from a CUDA graph per block shape: an N:M sweep is thousands of tiny kernels
    (2:4 on a 2560-column linear: 640 groups × a dozen ops), so on a GPU launch overhead, not arithmetic,
    sets its speed. Inputs are copied into static buffers, the graph is replayed, outputs copied out.
    Any failure to capture falls back to running the ops directly (logged once).

    `replay="eager"` runs the same static-buffer plumbing with the ops executed at replay instead of a graph:
    it is how the CPU tests check the copies in and out on machines without a GPU."""

    def __init__(self, replay: str = "graph"):
        self._runners: dict = {}
        self.disabled = False
        self.replay = replay

    def __call__(self, W1, U1, tab: _NMTables, g0: int, E1, mask1) -> None:
        use = self.replay == "eager" or (W1.device.type == "cuda" and not self.disabled)
        if not use:
            return _nm_block(W1, U1, tab, g0, E1, mask1)
        b, rows = W1.shape
        key = (b, rows, tab.n, tab.m, W1.dtype, W1.device)
        entry = self._runners.get(key)
        check = entry is None
        if entry is None:
            try:
                entry = self._prepare(b, rows, tab)
            except Exception as exc:  # capture unsupported here: eager is correct, only slower
                log.warning("N:M sweep: CUDA graph capture failed (%s); running the sweep eagerly", exc)
                self.disabled = True
                return _nm_block(W1, U1, tab, g0, E1, mask1)
            self._runners[key] = entry
        if check:  # the first replay of each shape is checked against the ops run directly on a copy
            W2, E2, m2 = W1.clone(), torch.empty_like(E1), torch.empty_like(mask1)
            _nm_block(W2, U1, tab, g0, E2, m2)
            self._replay(entry, W1, U1, tab, g0, E1, mask1)
            if not (torch.equal(mask1, m2) and torch.allclose(W1, W2, rtol=1e-4, atol=1e-6)):
                log.warning("N:M sweep: the CUDA graph's result differs from the direct ops; running eagerly")
                self.disabled = True
                W1.copy_(W2)
                E1.copy_(E2)
                mask1.copy_(m2)
            return
        self._replay(entry, W1, U1, tab, g0, E1, mask1)

    @staticmethod
    def _replay(entry, W1, U1, tab: _NMTables, g0: int, E1, mask1) -> None:
        b = W1.shape[0]
        replay, st = entry
        G = b // tab.m
        st["W"].copy_(W1)
        st["U"].copy_(U1)
        st["tab"].a.copy_(tab.a[g0:g0 + G])
        st["tab"].strict_t.copy_(tab.strict_t[g0:g0 + G])
        st["tab"].inv_d2.copy_(tab.inv_d2[g0:g0 + G])
        replay()
        W1.copy_(st["W"])
        E1.copy_(st["E"])
        mask1.copy_(st["mask"])

    def _prepare(self, b: int, rows: int, tab: _NMTables):
        dev, dt, G = tab.a.device, tab.a.dtype, b // tab.m
        static = _NMTables.__new__(_NMTables)
        static.n, static.m, static.pow2 = tab.n, tab.m, tab.pow2.clone()
        static.a = torch.zeros((G,) + tuple(tab.a.shape[1:]), dtype=dt, device=dev)
        static.strict_t = torch.zeros((G, tab.m, tab.m), dtype=dt, device=dev)
        static.inv_d2 = torch.ones((G, tab.m, 1), dtype=dt, device=dev)
        st = {"W": torch.zeros(b, rows, dtype=dt, device=dev), "U": torch.eye(b, dtype=dt, device=dev),
              "E": torch.zeros(b, rows, dtype=dt, device=dev),
              "mask": torch.zeros(b, rows, dtype=torch.bool, device=dev), "tab": static}

        def run() -> None:
            _nm_block(st["W"], st["U"], static, 0, st["E"], st["mask"])

        if self.replay == "eager":
            return run, st
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (allocations, library handles)
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        return graph.replay, st


def _nm_sweep(Wt: torch.Tensor, U: torch.Tensor, n: int, m: int, blocksize: int,
              graphed: _GraphedNMBlock | None = None) -> torch.Tensor:
    """Pure N:M pruning of Wt [cols, rows] in place; returns the mask (transposed, True = pruned)."""
    cols = Wt.shape[0]
    tab = _NMTables(U, n, m)
    mask_t = torch.zeros(Wt.shape, dtype=torch.bool, device=Wt.device)
    run = graphed if graphed is not None else _nm_block
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2]
        E1 = torch.empty_like(W1)
        run(W1, U[i1:i2, i1:i2], tab, i1 // m, E1, mask_t[i1:i2])
        if i2 < cols:
            Wt[i2:].sub_(U[i1:i2, i2:].T @ E1)
    return mask_t


_GRAPHED_NM = _GraphedNMBlock()


@torch.no_grad()
def sweep(W: torch.Tensor, U: torch.Tensor, *, pruning: Pruning | None = None, grid: str | None = None,
          segments: list[tuple[int, int]] | None = None, perm: torch.Tensor | None = None,
          static_scales: GroupScales | None = None, blocksize: int = 128,
          batched_solve: bool | None = None, nm_tables: bool = True, jit: bool = True) -> SweepResult:
    """Compress W [rows, cols] (columns already in processing order `perm`, if any) against U.

    `segments` are the row ranges of the linears stacked in W (they share one Hessian but get their own
    unstructured masks). With `perm` (act-order), `static_scales` must hold the scales of the original
    32-column blocks; without it, each block's scale is chosen when the sweep reaches the block.
    Returns the weight and codes in the original column order. `batched_solve` (default: on GPUs only)
    picks how pruned sub-blocks are solved; both give the same result. Pure N:M pruning goes through
    closed-form per-group solves (`_nm_sweep`; CUDA-graphed on a GPU) unless `nm_tables` is False, which
    runs the generic sub-block loop (same result up to rounding; kept for tests and comparison). On CPU, pure
    unstructured pruning runs each outer block's column loop as one numba-compiled call (`jit`; the torch
    sub-block loop when numba is missing or `jit` is False: same result up to rounding).

    Internally the sweep works on Wᵀ, so that each column it visits is one contiguous row.
    """
    rows, cols = W.shape
    if batched_solve is None:
        batched_solve = W.device.type != "cpu"
    Wt = W.T.float().contiguous()  # [cols, rows]
    segments = segments or [(0, rows)]
    pruning = pruning if pruning and (pruning.sparsity > 0 or pruning.structured_nm) else None
    if blocksize % SUB or blocksize % BLOCK:
        raise CompressError(f"blocksize {blocksize} must be a multiple of {max(SUB, BLOCK)}.")
    scales = codes_t = None
    if grid is not None:
        if perm is not None and static_scales is None:
            raise CompressError("act-order quantization needs static scales of the original 32-column blocks.")
        codes_t = torch.zeros(cols, rows, dtype=torch.int8, device=W.device)
        scales = static_scales if static_scales is not None else GroupScales.empty(grid, rows, cols, W.device)
    group_of = (perm // BLOCK if perm is not None else torch.arange(cols, device=W.device) // BLOCK).tolist()
    mask_t = torch.zeros(cols, rows, dtype=torch.bool, device=W.device) if pruning else None
    # An N:M sub-block is one group, so each group's mask sees the updates of all groups before it.
    sub = pruning.m if pruning and pruning.structured_nm else SUB
    if pruning and pruning.structured_nm and grid is None and nm_tables:
        mask_t = _nm_sweep(Wt, U, pruning.n, pruning.m, blocksize, _GRAPHED_NM)
        W, mask = Wt.T, mask_t.T
        if perm is not None:
            inv = torch.argsort(perm)
            W, mask = W[:, inv], mask[:, inv]
        return SweepResult(W.contiguous(), None, mask.contiguous())

    # CPU, pure unstructured pruning: each outer block's column loop in one compiled call (see _pruned_block)
    compiled_block = (jit and grid is None and pruning is not None and not pruning.structured_nm
                      and not batched_solve and Wt.device.type == "cpu" and Wt.dtype == torch.float32
                      and _pruned_block_kernel() is not None)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        mask1 = None
        if pruning and not pruning.structured_nm:
            mask1 = _unstructured_mask(W1.T, torch.diag(U1), pruning.sparsity, segments, jit).T
        if compiled_block:
            mask1 = mask1.contiguous()
            _pruned_block_kernel()(W1.numpy(), U1.contiguous().numpy(), mask1.numpy(), E1.numpy())
            mask_t[i1:i2] = mask1
            if i2 < cols:
                Wt[i2:].sub_(U[i1:i2, i2:].T @ E1)
            continue
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            Wj, Uj = W1[j1:j2], U1[j1:j2, j1:j2]
            if pruning and pruning.structured_nm:
                mj = _nm_mask(Wj.T, torch.diag(Uj), pruning.n, pruning.m).T
            else:
                mj = mask1[j1:j2] if mask1 is not None else None
            if grid is None:
                Ej = _pruned_errors(Wj, Uj, mj, batched_solve)
                Wj.sub_(torch.triu(Uj, 1).T @ Ej)  # updates inside the sub-block; pruned entries zeroed below
                Wj.masked_fill_(mj, 0.0)
            else:
                Ej = torch.empty_like(Wj)
                for c in range(j2 - j1):
                    col = i1 + j1 + c
                    w = Wj[c]
                    if static_scales is None and col % BLOCK == 0:
                        blk = Wt[col:col + BLOCK]  # current values: every earlier column's update is in
                        if mask1 is not None:
                            blk = blk.masked_fill(mask1[col - i1:col - i1 + BLOCK], 0.0)
                        scales.set_from(col // BLOCK, blk.T)
                    target = w.masked_fill(mj[c], 0.0) if mj is not None else w
                    q, v = scales.round(target, group_of[col])
                    if mj is not None:
                        q = q.masked_fill(mj[c], 0.0)
                        v = v.masked_fill(mj[c], 0.0)
                    codes_t[col] = q.to(torch.int8)
                    err = (w - v) / Uj[c, c]
                    Wj[c:].addr_(Uj[c, c:], err, alpha=-1.0)
                    Wj[c] = v
                    Ej[c] = err
            if mj is not None:
                mask_t[i1 + j1:i1 + j2] = mj
            E1[j1:j2] = Ej
            if j2 < i2 - i1:
                W1[j2:].sub_(U1[j1:j2, j2:].T @ Ej)
        if i2 < cols:
            Wt[i2:].sub_(U[i1:i2, i2:].T @ E1)

    W = Wt.T
    mask = mask_t.T if mask_t is not None else None
    codes = codes_t.T if codes_t is not None else None
    if perm is not None:
        inv = torch.argsort(perm)
        W = W[:, inv]
        mask = mask[:, inv] if mask is not None else None
        codes = codes[:, inv] if codes is not None else None
    qc = None
    if grid is not None:
        qc = QuantCodes(grid, codes.contiguous().cpu(), scales.scales.cpu(),
                        None if scales.mins is None else scales.mins.cpu())
    return SweepResult(W.contiguous(), qc, None if mask is None else mask.contiguous())


@contextlib.contextmanager
def sweep_threads(device: torch.device, threads: int = 1) -> Iterator[None]:
    """On CPU, one thread: the sweep's many small ops and LAPACK's factorisations of a few-hundred-column
    Hessian ran 10-100× slower on a 2-thread pool shared with other work (cholesky_inverse of 576² took
    1.5 s vs 11 ms) and gain nothing from it when the pool is free."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_SWEEP_THREADS = [1]  # threads one compress_weight call uses on CPU (see sweep_threads and wide_sweeps)


@contextlib.contextmanager
def wide_sweeps(threads: int) -> Iterator[None]:
    """compress_weight calls inside use `threads` threads instead of one: for a caller that knows nothing else runs
    meanwhile (the one-pass path with cpu_threads ≥ 2 on a single-linear group: down_proj's factorisation and sweep
    took 0.25 s on one thread, 0.14 s on two, on the idle 2-core machine)."""
    before = _SWEEP_THREADS[0]
    _SWEEP_THREADS[0] = max(1, threads)
    try:
        yield
    finally:
        _SWEEP_THREADS[0] = before


def compress_weight(W: torch.Tensor, H: torch.Tensor, name: str, *, pruning: Pruning | None = None,
                    grid: str | None = None, act_order: bool = False, damp: float = 0.01,
                    segments: list[tuple[int, int]] | None = None, blocksize: int = 128) -> tuple[SweepResult, float]:
    """SparseGPT / GPTQ / both on one (stacked) weight. Returns the result and its relative reconstruction error."""
    rows, cols = W.shape
    _check_args(name, cols, pruning, grid)
    if grid is None and pruning is None:
        raise CompressError(f"layer '{name}': nothing to do; give a sparsity pattern, a grid, or both.")
    with sweep_threads(W.device, _SWEEP_THREADS[0]):
        return _compress_weight(W, H, name, pruning, grid, act_order, damp, segments, blocksize)


def _compress_weight(W, H, name, pruning, grid, act_order, damp, segments, blocksize):
    rows, cols = W.shape
    U, dead = inverse_cholesky(H, damp, name)
    W0 = W.float()
    W = W0.clone()
    W[:, dead] = 0.0
    perm = static = None
    # Act-order only reorders pure quantization: masks (N:M groups, outer blocks) live in the original order.
    if act_order and grid is not None and pruning is None:
        perm = torch.argsort(torch.diag(H), descending=True)
        if grid is not None:
            static = GroupScales.empty(grid, rows, cols, W.device)
            for g in range(cols // BLOCK):
                static.set_from(g, W[:, g * BLOCK:(g + 1) * BLOCK])
        W = W[:, perm]
        Hp = H[perm][:, perm]
        U, _ = inverse_cholesky(Hp, damp, name)
    res = sweep(W, U, pruning=pruning, grid=grid, segments=segments, perm=perm, static_scales=static,
                blocksize=blocksize)
    terms = [reconstruction_terms(W0[r0:r1], res.weight[r0:r1], H) for r0, r1 in (segments or [(0, rows)])]
    res.segment_errors = [n / d if d > 0 else 0.0 for n, d in terms]
    den = sum(d for _, d in terms)
    return res, (sum(n for n, _ in terms) / den if den > 0 else 0.0)


def _check_args(name: str, cols: int, pruning: Pruning | None, grid: str | None) -> None:
    if pruning is not None:
        if pruning.structured_nm:
            if not (0 < pruning.n < pruning.m) or SUB % pruning.m:
                raise CompressError(f"layer '{name}': N:M pattern {pruning.n}:{pruning.m} is not supported; use "
                                    f"N < M with M dividing {SUB} (2:4, 4:8, 1:2 ...).")
            if cols % pruning.m:
                raise CompressError(f"layer '{name}': N:M pattern {pruning.n}:{pruning.m} needs the input "
                                    f"dimension ({cols}) to be a multiple of {pruning.m}.")
        elif not 0.0 < pruning.sparsity < 1.0:
            raise CompressError(f"layer '{name}': sparsity {pruning.sparsity} must lie in (0, 1).")
    if grid is not None:
        if grid not in GRIDS:
            raise CompressError(f"layer '{name}': unknown grid '{grid}'; expected one of {sorted(GRIDS)}.")
        if cols % BLOCK:
            raise CompressError(f"layer '{name}': input dimension {cols} is not a multiple of {BLOCK}; the "
                                f"{grid} grid quantizes blocks of {BLOCK} along it.")
        if pruning is not None and GRIDS[grid].has_min:
            raise CompressError(f"layer '{name}': joint sparsity + quantization needs a grid that holds an exact "
                                f"zero (q8_0, q4_0); {grid} stores an offset min.")


@torch.no_grad()
def remove_column_groups(W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, remove: int, name: str,
                         damp: float = 0.01) -> tuple[list[int], torch.Tensor, float]:
    """Structured OBS: drop `remove` of the equal-sized column groups `groups` [G, s] of W, compensating on the
    others. Greedy in a few rounds: each round removes the groups whose joint removal error
    tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ) is smallest, then applies the exact joint update to W and H⁻¹.
    Returns the kept group indices (sorted), W with every column kept (removed ones zeroed), and the
    relative reconstruction error."""
    G = groups.shape[0]
    if not 0 <= remove < G:
        raise CompressError(f"layer '{name}': cannot remove {remove} of {G} groups; at least one must stay.")
    Hinv, dead = damped_inverse(H, damp, name)
    W0 = W.float()
    W = W0.clone()
    W[:, dead] = 0.0
    alive = torch.ones(G, dtype=torch.bool)
    rounds = min(remove, 16)
    removed = 0
    for r in range(rounds):
        take = (remove * (r + 1)) // rounds - removed
        if take == 0:
            continue
        idx = groups[alive]                                   # [A, s]
        Hss = Hinv[idx.unsqueeze(-1), idx.unsqueeze(-2)]      # [A, s, s]
        Ws = W[:, idx].permute(1, 2, 0)                       # [A, s, rows]
        err = (Ws * torch.linalg.solve(Hss, Ws)).sum(dim=(1, 2))
        pick = torch.nonzero(alive).squeeze(1)[torch.topk(err, take, largest=False).indices]
        S = groups[pick].reshape(-1)
        A = torch.linalg.inv(Hinv[S][:, S])
        W -= W[:, S] @ A @ Hinv[S, :]
        Hinv -= Hinv[:, S] @ A @ Hinv[S, :]
        W[:, S] = 0.0
        alive[pick] = False
        removed += take
    kept = torch.nonzero(alive).squeeze(1).tolist()
    return kept, W, reconstruction_error(W0, W, H)
