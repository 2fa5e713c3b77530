"""One evaluator for every format: the same token windows through torch, llama.cpp and onnxruntime.

For each runner: perplexity on held-out windows; against a reference runner
(the torch student): top-1 agreement and KL(reference ‖ runner) per token.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from .progress import progress_bar

LogitsFn = Callable[[list[int]], np.ndarray]


def torch_logits_fn(model) -> LogitsFn:
    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(tokens: list[int]) -> np.ndarray:
        out = model(torch.tensor([tokens], device=device)).logits[0]
        return out.float().cpu().numpy()
    return fn


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def evaluate(windows: list[list[int]], runners: dict[str, LogitsFn], reference: str | None = None) -> dict:
    """Perplexity of every runner; top-1 agreement and KL against `reference` for the others."""
    nll = {k: 0.0 for k in runners}
    agree = {k: 0 for k in runners if k != reference}
    kl = {k: 0.0 for k in runners if k != reference}
    secs = {k: 0.0 for k in runners}
    count = 0
    with progress_bar("evaluate", total=len(windows)) as bar:
        for w in windows:
            targets = np.asarray(w[1:])
            ref_logp = None
            if reference is not None:
                t0 = time.perf_counter()
                ref_logp = _log_softmax(runners[reference](w)[:-1])
                secs[reference] += time.perf_counter() - t0
                nll[reference] -= ref_logp[np.arange(len(targets)), targets].sum()
            for name, fn in runners.items():
                if name == reference:
                    continue
                t0 = time.perf_counter()
                logits = fn(w)
                secs[name] += time.perf_counter() - t0
                logp = _log_softmax(logits[:-1])
                nll[name] -= logp[np.arange(len(targets)), targets].sum()
                if ref_logp is not None:
                    agree[name] += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
                    kl[name] += float((np.exp(ref_logp) * (ref_logp - logp)).sum())
            count += len(targets)
            bar.advance()
    out = {"tokens": count, "windows": len(windows),
           "ppl": {k: math.exp(v / count) for k, v in nll.items()},
           "eval_seconds": {k: round(v, 3) for k, v in secs.items()}}
    if reference is not None:
        out["reference"] = reference
        out["top1_agreement"] = {k: v / count for k, v in agree.items()}
        out["kl_to_reference"] = {k: v / count for k, v in kl.items()}
    return out


def check_gates(metrics: dict, spec, files: list[str]) -> dict:
    """Apply the recipe's eval gates to every exported file; EvalError naming each file and figure that fails.
    Returns {file: "pass"} when all pass."""
    from .errors import EvalError

    ref = metrics.get("reference")
    failures = []
    for f in files:
        checks = []
        if spec.max_ppl_increase is not None and ref is not None:
            inc = metrics["ppl"][f] / metrics["ppl"][ref] - 1
            checks.append((inc <= spec.max_ppl_increase,
                           f"perplexity {metrics['ppl'][f]:.3f} is {inc:+.2%} vs the {ref}'s "
                           f"{metrics['ppl'][ref]:.3f} (eval.max_ppl_increase {spec.max_ppl_increase:.2%})"))
        if spec.min_top1_agreement is not None and f in metrics.get("top1_agreement", {}):
            t = metrics["top1_agreement"][f]
            checks.append((t >= spec.min_top1_agreement,
                           f"top-1 agreement {t:.4f} (eval.min_top1_agreement {spec.min_top1_agreement})"))
        if spec.max_kl is not None and f in metrics.get("kl_to_reference", {}):
            k = metrics["kl_to_reference"][f]
            checks.append((k <= spec.max_kl, f"KL to {ref} {k:.5f} (eval.max_kl {spec.max_kl})"))
        if spec.min_decode_tps is not None and f in metrics.get("decode_tps", {}):
            d = metrics["decode_tps"][f]
            checks.append((d >= spec.min_decode_tps, f"decode {d:.1f} tokens/s (eval.min_decode_tps {spec.min_decode_tps})"))
        failures += [f"{f}: {msg}" for ok, msg in checks if not ok]
    if failures:
        raise EvalError("quality gates failed:\n  " + "\n  ".join(failures)
                        + "\nLoosen the gate in the recipe's eval section, or export a more precise type.")
    return {f: "pass" for f in files}
