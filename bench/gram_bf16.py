"""The calibration Hessian's product on CPU: our AVX-512 BF16 kernel vs torch's fp32 GEMM.

A Hessian H = 2/n XᵀX of bf16 block inputs X. Anchor: what `HessianAccumulator` does without the kernel (X to
fp32, then the lower triangle as row panels of fp32 GEMMs, mirrored), and the plain full fp32 product. Ours:
`compress/csrc/gram_bf16.c` (bf16 products, fp32 accumulation, lower triangle). Shapes are SmolLM2-135M's
Hessian inputs at 32 × 512 calibration tokens (576: q/k/v, o, gate/up; 1536: down). Reports the best of `--repeat`
seconds per shape, the ratio, and each result's max relative error against a float64 product.

    python bench/gram_bf16.py [--threads 2] [--tokens 16384] [--repeat 5]

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from edgedistill.compress.gram import gram_kernel
from edgedistill.compress.obs import HessianAccumulator


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--features", default="576,1536")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if gram_kernel() is None:
        raise SystemExit("the bf16 Hessian kernel is unavailable here (no AVX-512 BF16, no C compiler, or "
                         "EDGEDISTILL_NATIVE=0): nothing to compare")
    g = torch.Generator().manual_seed(0)
    rows = []
    for d in map(int, args.features.split(",")):
        # activation-like: per-feature scales spread over two orders of magnitude, a nonzero mean
        x = (torch.randn(args.tokens, d, generator=g) * torch.rand(d, generator=g).pow(3) * 4
             + torch.randn(d, generator=g) * 0.5).to(torch.bfloat16)
        ref = 2 * (x.double().T @ x.double()) / args.tokens

        def run(native: bool) -> torch.Tensor:
            acc = HessianAccumulator(d, "cpu", native=native)
            acc.add(x)
            return acc.H

        def full() -> torch.Tensor:
            xf = x.float()
            return (xf.T @ xf).mul_(2 / args.tokens)

        def err(H: torch.Tensor) -> float:
            return float((H.double() - ref).abs().max() / ref.abs().max())

        run(True)  # the first call builds the kernel
        ours, panels, plain = (best_of(lambda: run(True), args.repeat), best_of(lambda: run(False), args.repeat),
                               best_of(full, args.repeat))
        row = {"tokens": args.tokens, "features": d, "ours_s": round(ours, 4), "torch_triangle_s": round(panels, 4),
               "torch_full_s": round(plain, 4), "speedup_vs_triangle": round(panels / ours, 2),
               "speedup_vs_full": round(plain / ours, 2), "ours_triangle_gflops": round(args.tokens * d * d / ours / 1e9, 1),
               "max_rel_err_ours": float(f"{err(run(True)):.3g}"), "max_rel_err_torch": float(f"{err(full()):.3g}")}
        print(row)
        rows.append(row)
    total = {k: sum(r[k] for r in rows) for k in ("ours_s", "torch_triangle_s")}
    # a SmolLM2-135M block has three 576-wide Hessians (q/k/v, o, gate/up) and one 1536-wide (down)
    per_block = {"ours_s": None, "torch_triangle_s": None}
    widths = [r["features"] for r in rows]
    if widths == [576, 1536]:
        per_block = {k: round(3 * rows[0][k] + rows[1][k], 4) for k in ("ours_s", "torch_triangle_s")}
    print(json.dumps({"bench": "gram_bf16", "threads": args.threads, "rows": rows,
                      "smollm2_block_s": per_block,
                      "speedup": round(total["torch_triangle_s"] / total["ours_s"], 2)}))


if __name__ == "__main__":
    main()
