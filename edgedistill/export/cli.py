"""`edgedistill export MODEL_DIR --to gguf[:TYPE]|onnx[:int8|int4] --out PATH`: one format spec, one exporter."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..errors import ExportError


def parse_target(spec: str) -> tuple[str, str]:
    """'gguf' -> ('gguf', 'f16'); 'gguf:q4_k_m'; 'onnx' -> ('onnx', 'fp32'); 'onnx:int8'."""
    from .gguf import DTYPES, LLAMACPP_TYPES
    from .onnx_quant import ONNX_QUANT

    fmt, _, kind = spec.strip().lower().partition(":")
    allowed = {"gguf": (*DTYPES, *LLAMACPP_TYPES), "onnx": ("fp32", *ONNX_QUANT)}
    if fmt not in allowed:
        raise ExportError(f"--to '{spec}': format must be gguf or onnx (e.g. gguf:q8_0, onnx:int8).")
    kind = kind or allowed[fmt][1 if fmt == "gguf" else 0]
    if kind not in allowed[fmt]:
        raise ExportError(f"--to '{spec}': {fmt} type '{kind}' unknown; expected one of {list(allowed[fmt])}.")
    return fmt, kind


def export_model(model_dir: str | Path, spec: str, out: str | Path, codes_file: str | Path | None = None) -> dict[str, Any]:
    """`codes_file`: compress/'s quant_codes.safetensors for this model; the weights it covers are written from
    their codes (GGUF of the codes' type; ONNX int8 from q8_0, int4 from q4_0 / q4_1)."""
    fmt, kind = parse_target(spec)
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a Hugging Face model folder (no config.json).")
    codes = None
    if codes_file is not None:
        from ..compress.rtn import load_codes
        if not Path(codes_file).is_file():
            raise ExportError(f"--codes {codes_file} does not exist; pass the quant_codes.safetensors that "
                              "`edgedistill compress` wrote next to this model.")
        codes = load_codes(Path(codes_file))
    if fmt == "gguf":
        from .gguf import write_gguf
        info = write_gguf(model_dir, out, kind, codes=codes)
        return {**info, "what": f"GGUF {kind}"}
    from .onnx import export_onnx
    if kind == "fp32":
        info = export_onnx(model_dir, out, graph="kv_cache")
        return {**info, "what": "ONNX fp32 with KV cache"}
    from .onnx_quant import quantize_onnx
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        export_onnx(model_dir, Path(tmp) / "model.onnx", graph="kv_cache", external_data=False)
        info = quantize_onnx(Path(tmp) / "model.onnx", out, kind, codes=codes)
    return {**info, "what": f"ONNX {kind} with KV cache"}
