"""Check the device predictor on this machine: predicted vs measured llama.cpp decode tokens/s.

    python bench/host_predictor.py MODEL_DIR [--types f16,q8_0,q4_0] [--rounds 3]

Writes GGUFs of MODEL_DIR (a HF folder) into a temporary folder, loads the `host` profile (bandwidth,
GEMM FLOP/s and llama.cpp's per-type decode rates on a synthetic model, measured now), and for each type
decodes 64 tokens on the profile's thread count. Each round re-measures the host right before its
decodes, since the machine is shared. Prints one line per measurement and, last, one JSON object with
medians, ratios, the load average, and the matvec efficiency each run implies for the formula without rates.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from edgedistill.devices.fit import RUNTIMES, ModelShape, fit_candidate, gguf_candidate
from edgedistill.devices.profiles import load_profile, measure_host
from edgedistill.export.gguf import write_gguf
from edgedistill.export.llamacpp import LlamaCppModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    shape = ModelShape.from_model_dir(a.model_dir)
    rows: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for t in a.types.split(","):
            paths[t] = Path(tmp) / f"model-{t}.gguf"
            write_gguf(a.model_dir, paths[t], t)
        load = [os.getloadavg()[0]]
        for r in range(a.rounds):
            measure_host.cache_clear()
            prof = load_profile("host")
            print(f"round {r}: decode rates (G weights/s) {prof.decode_rates}, load {os.getloadavg()[0]:.1f}",
                  flush=True)
            for t, p in paths.items():
                fit = fit_candidate(gguf_candidate(p, p.name), shape, prof, context=256)
                with LlamaCppModel(p, n_ctx=256, n_threads=prof.threads) as m:
                    tps = m.decode_tokens_per_s(a.tokens)
                c = gguf_candidate(p, p.name)
                stream = c.weight_read_bytes / (prof.memory_bandwidth_gbs * 1e9)
                rest = 1 / tps - stream
                implied = 2 * shape.matmul_params() / (prof.compute_gflops * 1e9 * rest) if rest > 0 else float("inf")
                row = rows.setdefault(t, {"predicted": [], "measured": [], "implied_matvec_eff": []})
                row["predicted"].append(fit.decode_tps)
                row["measured"].append(tps)
                row["implied_matvec_eff"].append(implied)
                print(f"round {r} {t:>5}: bandwidth {prof.memory_bandwidth_gbs:5.2f} GB/s, GEMM "
                      f"{prof.compute_gflops:6.1f} GFLOP/s, predicted {fit.decode_tps:6.1f} tok/s, "
                      f"measured {tps:6.1f} tok/s", flush=True)
            load.append(os.getloadavg()[0])
    out = {"model_dir": a.model_dir, "threads": prof.threads, "loadavg_1min": [round(x, 2) for x in load],
           "matvec_efficiency_used": RUNTIMES["llama.cpp"].matvec_efficiency, "types": {}}
    for t, row in rows.items():
        pred, meas = statistics.median(row["predicted"]), statistics.median(row["measured"])
        out["types"][t] = {"predicted_tps": round(pred, 2), "measured_tps": round(meas, 2),
                           "error": round(pred / meas - 1, 3),
                           "implied_matvec_eff": round(statistics.median(row["implied_matvec_eff"]), 4)}
    out["within_35pct"] = all(abs(v["error"]) <= 0.35 for v in out["types"].values())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
