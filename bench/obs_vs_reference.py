"""Our OBS engine vs the published SparseGPT algorithm, on the same random SmolLM2-360M-shaped model.

Baseline: SparseGPT as the paper's pseudo-code gives it (Frantar & Alistarh 2023, Algorithm 1 with the
reference code's defaults: blocksize 128, percdamp 0.01, one linear at a time, one column per step),
written out below. Ours: `compress_weight` (linears sharing an input stacked on one Hessian, sub-blocks
solved as batched triangular solves). Both run inside the same layer-wise driver on identical
calibration inputs, so the timed difference is the pruning sweep itself; calibration (capture,
Hessians, block forwards) is reported separately.

    python bench/obs_vs_reference.py --device cpu --small     # minutes on 2 cores
    python bench/obs_vs_reference.py --device cuda            # the full run: 32 layers, 128 x 2048 tokens

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from edgedistill.compress.layerwise import compress_layerwise
from edgedistill.compress.obs import Pruning, compress_weight, reconstruction_terms


# ---------------------------------------------------------------- the baseline, from the paper's pseudo-code
@torch.no_grad()
def reference_sparsegpt(W: torch.Tensor, H: torch.Tensor, sparsity: float = 0.5, prunen: int = 0, prunem: int = 0,
                        blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    W = W.clone().float()
    H = H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(cols, device=W.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / (torch.diag(Hinv1)[i:i + prunem].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


# ---------------------------------------------------------------- the run
def make_model(small: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=2 if small else 32,
                      num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(method: str, pattern: str, windows, device, small: bool, batch_size: int) -> dict:
    """One layer-wise pass. method "reference" or "ours": that sweep compresses the model. "paired": on every
    group both sweeps run on the same Hessian (ours first, each timed alone) and ours is applied, so the two
    errors compare like for like at every layer instead of after 32 layers of diverging inputs."""
    model = make_model(small)
    prune = Pruning(sparsity=0.5) if pattern == "unstructured" else Pruning(n=2, m=4)
    methods = ("ours", "reference") if method == "paired" else (method,)
    terms = {m: {"num": 0.0, "den": 0.0, "rel": []} for m in methods}
    sweep = {m: 0.0 for m in methods}

    def compress_group(i, group, linears):
        H = group.hessian.H
        mods = [linears[n] for n in group.names]
        results = {}
        for meth in methods:
            _sync(device)
            t = time.perf_counter()
            if meth == "reference":
                news = [reference_sparsegpt(m.weight.data.float(), H, 0.5, prune.n, prune.m) for m in mods]
            else:
                W = torch.cat([m.weight.data.float() for m in mods])
                bounds, r = [], 0
                for m in mods:
                    bounds.append((r, r + m.out_features))
                    r += m.out_features
                res, _ = compress_weight(W, H, f"layers.{i}", pruning=prune, segments=bounds)
                news = [res.weight[r0:r1] for r0, r1 in bounds]
            _sync(device)
            sweep[meth] += time.perf_counter() - t
            results[meth] = news
            for m, new in zip(mods, news):
                num, den = reconstruction_terms(m.weight.data.float(), new, H)
                terms[meth]["num"] += num
                terms[meth]["den"] += den
                terms[meth]["rel"].append(num / den)
        for m, new in zip(mods, results[methods[0]]):
            m.weight.data.copy_(new)
        return {}

    t0 = time.perf_counter()
    # Both sweeps run on the same thread count (on CPU: the driver's one thread).
    out = compress_layerwise(model, windows, compress_group, device=device, batch_size=batch_size)
    total = time.perf_counter() - t0
    runs = {}
    for meth in methods:
        tm = terms[meth]
        runs[meth] = {"sweep_s": round(sweep[meth], 2), "calibration_s": round(total - sum(sweep.values()), 2),
                      "rel_error": tm["num"] / tm["den"], "mean_layer_rel_error": sum(tm["rel"]) / len(tm["rel"]),
                      "layer_rel_errors": tm["rel"], "timings_s": out["timings_s"]}
    return runs if method == "paired" else runs[method]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="2 layers, 16 x 256 calibration tokens (CPU, minutes)")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--patterns", default="unstructured,2:4", help="comma-separated, in the order to run them")
    ap.add_argument("--paired", action="store_true", help="one layer-wise pass per pattern with both sweeps on every "
                    "group's identical Hessian (ours applied): errors compared layer by layer on the same inputs")
    args = ap.parse_args()
    patterns = args.patterns.split(",")
    if set(patterns) - {"unstructured", "2:4"}:
        ap.error(f"--patterns: expected unstructured and/or 2:4, got {args.patterns}")
    device = torch.device(args.device)
    n = args.samples or (16 if args.small else 128)
    T = args.seq_len or (256 if args.small else 2048)
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 49152, (n, T), generator=g).tolist()
    results = {}
    for pattern in patterns:
        if args.paired:
            both = run("paired", pattern, windows, device, args.small, args.batch_size)
            results |= {f"{m}_{pattern}": r for m, r in both.items()}
        else:
            for method in ("reference", "ours"):
                results[f"{method}_{pattern}"] = run(method, pattern, windows, device, args.small, args.batch_size)
        for method in ("reference", "ours"):
            r = results[f"{method}_{pattern}"]
            print(f"{method:>9} {pattern:>12}: sweep {r['sweep_s']:8.2f} s  (calibration {r['calibration_s']:.2f} s)  "
                  f"rel. reconstruction error {r['rel_error']:.6f}", flush=True)
    summary = {"bench": "obs_vs_reference", "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "model": "random SmolLM2-360M shape" + (" (2 layers)" if args.small else " (32 layers)"),
               "calib_tokens": f"{n}x{T}", "cpu_threads": 1 if device.type == "cpu" else None,
               "paired": args.paired}
    for pattern, key in (("unstructured", "unstructured_50"), ("2:4", "2_4")):
        if pattern not in patterns:
            continue
        ref, ours = results[f"reference_{pattern}"], results[f"ours_{pattern}"]
        summary |= {f"reference_{key}_s": ref["sweep_s"], f"ours_{key}_s": ours["sweep_s"],
                    f"speedup_{key}": round(ref["sweep_s"] / max(ours["sweep_s"], 1e-9), 2),
                    f"reference_{key}_rel_error": round(ref["rel_error"], 6),
                    f"ours_{key}_rel_error": round(ours["rel_error"], 6),
                    f"calibration_{key}_s": ours["calibration_s"]}
        if args.paired:  # the same Hessians: how many of the linears came out no worse than the reference
            pairs = list(zip(ours["layer_rel_errors"], ref["layer_rel_errors"]))
            summary[f"ours_{key}_no_worse_linears"] = f"{sum(o <= r for o, r in pairs)}/{len(pairs)}"
            summary[f"ours_{key}_mean_layer_rel_error"] = round(ours["mean_layer_rel_error"], 6)
            summary[f"reference_{key}_mean_layer_rel_error"] = round(ref["mean_layer_rel_error"], 6)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
