"""4-bit quality on CPU: llama.cpp's own quantizer vs our GPTQ codes, all measured in llama.cpp.

SmolLM2-135M-Instruct (fp32) → GGUF f32 → llama.cpp Q4_0 and Q4_K_M (its quantizer, through
llama-cpp-python's `llama_model_quantize`), and ours: GPTQ onto Q4_0 / Q4_1 blocks written into
GGUF losslessly. Every file is scored on the same held-out windows (stdlib text never used for
calibration) by llama.cpp itself.

llama.cpp's Q4_0 ftype wants Q6_K for the (tied) output/embedding tensor; for SmolLM2 (576 columns,
not a multiple of 256) it falls back to Q8_0. So "ours" comes in two sizes: `*_emb_q8_0` (embedding
RTN Q8_0: the same file size as llama.cpp's Q4_0, the headline `gap_closed`) and `*_emb_same`
(embedding on the same 4-bit grid: a smaller file). File sizes are reported for all.

Caveat for Q4_1: the embedded teacher is itself dequantized from a Q4_1 GGUF, so its weights already
sit on a Q4_1 grid and GPTQ Q4_1 reproduces them exactly (reconstruction error 0): pass `--grids q4_0`
to skip that trivial case (each grid costs a few minutes of GPTQ plus two llama.cpp evaluations).

    python bench/quant_quality.py [--windows 16] [--seq-len 512] [--calib 32x512]

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from edgedistill.artifacts import atomic_write_json
from edgedistill.compress.grids import quantize
from edgedistill.compress.methods import ObsConfig, obs_compress
from edgedistill.data.text import load_corpus
from edgedistill.data.tokens import token_stream, windows
from edgedistill.evaluate import evaluate
from edgedistill.export.gguf import write_gguf
from edgedistill.export.llamacpp import LlamaCppModel
from edgedistill.models import load_causal_lm, load_tokenizer, resolve_model


def llamacpp_quantize(src: Path, dst: Path, ftype_name: str) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({ftype_name}) failed with {rc}")


def ppl(path: Path, wins: list[list[int]]) -> float:
    with LlamaCppModel(path, n_ctx=max(512, len(wins[0]))) as lm:
        return evaluate(wins, {"m": lm.logits})["ppl"]["m"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", default="32x512")
    ap.add_argument("--grids", default="q4_0,q4_1")
    ap.add_argument("--out", default=None, help="keep the GGUF files here (default: a temp folder)")
    ap.add_argument("--reuse", action="store_true", help="keep GGUF files already in --out (from an earlier run with the "
                    "same settings) instead of writing them again")
    ap.add_argument("--only", default=None, help="evaluate only these files, e.g. f32,llamacpp_q4_0,ours_q4_0_emb_q8_0")
    ap.add_argument("--json", default=None, help="also write the result JSON here (e.g. bench/results/quant_quality.json)")
    args = ap.parse_args()
    n_cal, t_cal = map(int, args.calib.split("x"))
    t_start = time.perf_counter()

    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    corpus = load_corpus("stdlib", 3_000_000, 0.05, 0)
    heldout = windows(token_stream(tok, corpus.heldout, args.windows * args.seq_len), args.seq_len, args.windows,
                      what="held-out text")
    calib = windows(token_stream(tok, corpus.train, n_cal * t_cal), t_cal, n_cal, what="calibration text")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="quant_quality-"))
    out.mkdir(parents=True, exist_ok=True)

    files: dict[str, Path] = {"f32": out / "f32.gguf"}
    if not (args.reuse and files["f32"].is_file()):
        write_gguf(model_dir, files["f32"], "f32")
    for ft in ("Q4_0", "Q4_K_M"):
        files[f"llamacpp_{ft.lower()}"] = out / f"llamacpp-{ft.lower()}.gguf"
        if not (args.reuse and files[f"llamacpp_{ft.lower()}"].is_file()):
            llamacpp_quantize(files["f32"], files[f"llamacpp_{ft.lower()}"], ft)

    gptq_seconds = {}
    for grid in args.grids.split(","):
        reused = [out / f"ours-{grid}-emb-same.gguf", out / f"ours-{grid}-emb-q8_0.gguf"]
        if args.reuse and all(p.is_file() for p in reused):
            files[f"ours_{grid}_emb_same"], files[f"ours_{grid}_emb_q8_0"] = reused
            gptq_seconds[grid] = "reused"
            continue
        model = load_causal_lm(model_dir)
        t0 = time.perf_counter()
        codes, metrics = obs_compress(model, calib, ObsConfig(grid=grid))
        gptq_seconds[grid] = round(time.perf_counter() - t0, 1)
        mdir = out / f"gptq-{grid}"
        model.save_pretrained(mdir)
        tok.save_pretrained(mdir)
        emb = model.get_input_embeddings().weight.detach()
        files[f"ours_{grid}_emb_same"] = out / f"ours-{grid}-emb-same.gguf"
        write_gguf(mdir, files[f"ours_{grid}_emb_same"], grid, codes=codes)
        files[f"ours_{grid}_emb_q8_0"] = out / f"ours-{grid}-emb-q8_0.gguf"
        write_gguf(mdir, files[f"ours_{grid}_emb_q8_0"], grid,
                   codes={**codes, "model.embed_tokens.weight": quantize(emb, "q8_0")})
        print(f"GPTQ {grid}: {gptq_seconds[grid]} s, mean layer rel. error {metrics['mean_rel_error']:.5f}", flush=True)

    result = {"bench": "quant_quality", "model": args.model, "heldout": f"{args.windows}x{args.seq_len}",
              "calib": args.calib, "torch_threads": torch.get_num_threads(), "gptq_seconds": gptq_seconds}
    only = set(args.only.split(",")) if args.only else set(files)
    result["reused_files"] = bool(args.reuse)
    for key, path in files.items():
        result[f"bytes_{key}"] = path.stat().st_size
        if key not in only:
            continue
        result[f"ppl_{key}"] = round(ppl(path, heldout), 4)
        print(f"{key:>24}: ppl {result[f'ppl_{key}']:9.4f}  {path.stat().st_size / 2**20:7.2f} MiB", flush=True)
    f32 = result["ppl_f32"]
    for grid in args.grids.split(","):
        ref = result["ppl_llamacpp_q4_0"]
        for emb in ("emb_same", "emb_q8_0"):
            if f"ppl_ours_{grid}_{emb}" in result:
                ours = result[f"ppl_ours_{grid}_{emb}"]
                result[f"gap_closed_{grid}_{emb}"] = round(1 - (ours - f32) / (ref - f32), 4)
    result["ppl_ours_q4_0"] = result.get("ppl_ours_q4_0_emb_q8_0")
    result["gap_closed"] = result.get("gap_closed_q4_0_emb_q8_0")
    if "bytes_ours_q4_0_emb_q8_0" in result:  # the same tensor types; only metadata bytes differ
        result["size_ratio_ours_q4_0_vs_llamacpp_q4_0"] = round(result["bytes_ours_q4_0_emb_q8_0"]
                                                                / result["bytes_llamacpp_q4_0"], 6)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    if args.json:
        atomic_write_json(args.json, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
