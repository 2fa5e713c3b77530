"""The compress stage as one function: a model folder in, a compressed folder (+ codes) out, with metrics.

Used by `build.stage_compress` and `edgedistill compress`. Writes `<out>/model`
(a HF folder holding exactly the weights the codes decode to) and, for a grid,
`<out>/quant_codes.safetensors` that GGUF export writes bit for bit.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import CompressError
from .rtn import CODES_FILE, load_codes, quantize_model, save_codes

# Dense formats store a pruned weight as an explicit zero: nothing we export skips them.
SPARSITY_RUNTIME_NOTE = ("safetensors, GGUF (llama.cpp) and ONNX (onnxruntime) store pruned weights as explicit zeros "
                         "and compute with them: unstructured and N:M sparsity change neither size on disk nor decode "
                         "speed in these runtimes (N:M needs sparse tensor cores, e.g. 2:4 on NVIDIA Ampere+ via "
                         "TensorRT/cuSPARSELt). Use method 'structured' for a smaller, faster dense model.")


def _ppl(model, windows: list[list[int]]) -> float:
    from ..evaluate import evaluate, torch_logits_fn
    return evaluate(windows, {"m": torch_logits_fn(model)})["ppl"]["m"]


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*.safetensors"))


def qat_passthrough(model, codes_file: Path) -> tuple[dict, dict]:
    """The codes a quantize-aware student was trained through, checked against the weights it holds: every coded
    tensor must dequantize bit for bit to the model's value, so the GGUF written from them is what torch evaluates."""
    import torch

    from .grids import dequantize
    if not codes_file.is_file():
        raise CompressError(f"compress.method 'qat': {codes_file} does not exist. It is written by a distillation "
                            f"with distill.quantize_aware set (q8_0, q4_0, q4_1); train with it or pick another method.")
    codes = load_codes(codes_file)
    params = dict(model.named_parameters())
    for name, qc in codes.items():
        if name not in params:
            raise CompressError(f"compress.method 'qat': {codes_file} holds codes for '{name}', which the model lacks; "
                                f"the codes file belongs to another model.")
        if not torch.equal(dequantize(qc).to(params[name].dtype), params[name].data):
            raise CompressError(f"compress.method 'qat': '{name}' differs from the dequantized {qc.grid} codes in "
                                f"{codes_file}; the model was changed after quantize-aware training.")
    grid = next(iter(codes.values())).grid
    return codes, {"grid": grid, "from_quantize_aware_training": True, "quantized_tensors": len(codes)}


def compress_model(model_dir: str | Path, out_dir: Path, spec, tokenizer, calib: list[list[int]],
                   heldout: list[list[int]], qat_codes: Path | None = None) -> dict:
    """Compress the model in `model_dir` as `spec` (a recipe CompressSpec) says; write `out_dir`."""
    from ..models import load_causal_lm
    from .methods import ObsConfig, obs_compress

    model = load_causal_lm(str(model_dir))
    t0 = time.perf_counter()
    ppl_before = _ppl(model, heldout)
    codes: dict = {}
    if spec.method == "qat":
        codes, metrics = qat_passthrough(model, Path(qat_codes) if qat_codes else Path(model_dir) / "qat" / CODES_FILE)
    elif spec.method == "q8_0" and qat_codes is not None and Path(qat_codes).is_file():
        # The student was trained through this grid: its codes are the export, bit for bit.
        codes, metrics = load_codes(Path(qat_codes)), {"grid": "q8_0", "from_quantize_aware_training": True}
    elif spec.method == "q8_0":
        codes, metrics = quantize_model(model, "q8_0")
    elif spec.method in ("gptq", "sparsegpt"):
        grid = spec.grid or ("q4_0" if spec.method == "gptq" else None)
        cfg = ObsConfig(sparsity=spec.sparsity if spec.method == "sparsegpt" and spec.pattern == "unstructured" else 0.0,
                        pattern=spec.pattern if spec.method == "sparsegpt" else "unstructured",
                        grid=grid, act_order=spec.act_order, damp=spec.damp, blocksize=spec.blocksize,
                        device=spec.device, sparsity_profile=spec.sparsity_profile,
                        owl_threshold=spec.owl_threshold, owl_lambda=spec.owl_lambda, one_pass=spec.one_pass)
        codes, metrics = obs_compress(model, calib, cfg)
    elif spec.method == "structured":
        from .structured import structured_prune
        model, metrics = structured_prune(model, calib, ffn_sparsity=spec.sparsity, heads_sparsity=spec.heads_sparsity,
                                          damp=spec.damp, device=spec.device)
    else:
        raise CompressError(f"compress.method '{spec.method}' has no compressor here.")
    seconds = time.perf_counter() - t0
    ppl_after = _ppl(model, heldout)
    (out_dir / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    if codes:
        save_codes(codes, out_dir / CODES_FILE)
    out = {"method": spec.method, **metrics, "compress_seconds": round(seconds, 2),
           "ppl_before": ppl_before, "ppl_after": ppl_after, "heldout_windows": len(heldout),
           "bytes_on_disk": {"before_safetensors": _dir_bytes(Path(model_dir)),
                             "after_safetensors": _dir_bytes(out_dir / "model"),
                             "codes": (out_dir / CODES_FILE).stat().st_size if codes else 0},
           "params": sum(p.numel() for p in model.parameters())}
    if spec.method == "sparsegpt":
        out["sparsity_note"] = SPARSITY_RUNTIME_NOTE
    return out
