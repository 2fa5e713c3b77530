"""Weight quantization of an exported ONNX graph with onnxruntime's MatMulNBits quantizer.

int8 and int4 are both weight-only MatMulNBits with symmetric blocks of 32 (the
layout of GGUF's Q8_0 / Q4_0) and int8 activations inside the kernel
(accuracy level 4). onnxruntime's *dynamic* int8 quantization (MatMulInteger,
one scale per tensor for weights and activations) was measured and rejected:
on SmolLM2-135M it agrees with the fp32 graph on 58% of next-token argmaxes
(blockwise int8: 94%) and decodes no faster (blockwise int8: 2.4x faster, one thread).

The exporter writes `x @ Transpose(W)`; the transpose of a constant is folded
into a constant first, so the output head (the largest matrix) is quantized too.

When compress/ left integer codes (GGUF Q8_0 / Q4_0 / Q4_1 blocks of 32 along the input), the weights
they cover are written from those codes instead of re-quantized: ggml's Q8_0 / Q4_0 blocks are
MatMulNBits blocks with the zero point at 128 / 8, so the ONNX weights decode bit for bit to what torch
and the GGUF file hold; Q4_1 (q·d + m) takes a float zero point −m/d, exact up to float rounding.
Each MatMul is named by the module path the torch exporter records on it (pkg.torch.onnx.name_scopes).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import atomic_path
from ..errors import ExportError

ONNX_QUANT = ("int8", "int4")
BLOCK = 32


def quantize_onnx(src: str | Path, dst: str | Path, kind: str, codes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `dst`, a quantized copy of the ONNX model `src`; returns {"kind", "bytes", "ops", "seconds", ...}.

    `codes` (HF parameter name -> compress.grids.QuantCodes) are used for the weights they cover when their grid
    has this kind's bit width (q8_0 for int8; q4_0, q4_1 for int4); the rest is quantized by onnxruntime."""
    import onnx

    if kind not in ONNX_QUANT:
        raise ExportError(f"unknown ONNX quantization '{kind}'; expected one of {list(ONNX_QUANT)}.")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"ONNX model {src} does not exist; export it first.")
    t0 = time.perf_counter()
    # The quantizer logs every node at INFO through its own logger; keep that out of the CLI's output.
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with atomic_path(dst) as tmp:
            from_codes = _matmul_nbits(src, tmp, bits=8 if kind == "int8" else 4, codes=codes or {})
            model = onnx.load(str(tmp), load_external_data=False)
            ops = Counter(n.op_type for n in model.graph.node)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - the quantizers raise many types
        raise ExportError(f"onnxruntime's {kind} quantizer failed on {src}: {type(e).__name__}: {e}. Quantize "
                          f"a graph written by edgedistill's ONNX export.") from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    quantized = ops.get("MatMulNBits", 0)
    if quantized == 0:
        raise ExportError(f"{kind} quantization of {src} changed no MatMul; the graph has no constant weights "
                          f"to quantize.")
    return {"kind": kind, "bytes": dst.stat().st_size, "quantized_matmuls": quantized,
            "fp32_matmuls": ops.get("MatMul", 0), "seconds": round(time.perf_counter() - t0, 2),
            "from_codes": len(from_codes), "from_codes_grids": dict(Counter(from_codes.values()))}


def fold_constant_transposes(model: Any) -> int:
    """Replace Transpose(perm=[1, 0]) of a 2-D initializer by the transposed initializer; returns how many."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    folded = []
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.ndim != 2 or perm not in (None, [1, 0]):
            continue
        model.graph.initializer.append(numpy_helper.from_array(w.T.copy(), node.output[0]))
        folded.append(node)
    for node in folded:
        model.graph.node.remove(node)
    return len(folded)


def _matmul_nbits(src: Path, dst: Path, bits: int, codes: dict[str, Any]) -> dict[str, str]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    fold_constant_transposes(model)
    from_codes = matmuls_from_codes(model, codes, bits) if codes else {}
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=True,
                             accuracy_level=4)
    q.process()
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        # save_model_to_file writes into the target's folder; go through a scratch name, then move.
        out = Path(tmp) / "model.onnx"
        q.model.save_model_to_file(str(out), use_external_data_format=False)
        out.replace(dst)
    return from_codes


# ---------------------------------------------------------------- MatMulNBits from compress/'s codes
GRID_BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4}
MAX_CODES_REL_ERROR = 0.5  # codes further than this (relative RMS) from the graph's weight belong to another tensor


def _module_of(node: Any) -> str | None:
    """'model.layers.0.self_attn.q_proj' for a MatMul the torch exporter made from that module's linear."""
    import ast

    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if not scopes:
        return None
    parts = ast.literal_eval(scopes)
    module = parts[-2] if len(parts) >= 2 else ""
    return module.removeprefix("lm.") or None


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 2m] values 0..15 -> [..., m] bytes, element 2j in the low nibble (MatMulNBits' order)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def matmulnbits_tensors(qc: Any) -> dict[str, np.ndarray]:
    """B [N, blocks, 32·bits/8] uint8, scales [N, blocks] fp32 and zero_points for one QuantCodes [N, K]."""
    codes = qc.codes.detach().cpu().numpy().astype(np.int16)
    n, k = codes.shape
    blocks = k // BLOCK
    scales = qc.scales.detach().cpu().float().numpy().reshape(n, blocks)
    q = codes.reshape(n, blocks, BLOCK)
    if qc.grid == "q8_0":
        return {"B": (q + 128).astype(np.uint8), "scales": scales, "zero_points": np.full((n, blocks), 128, np.uint8)}
    if qc.grid == "q4_0":
        zp = np.full((n, blocks + blocks % 2), 8, np.uint8)
        return {"B": _pack_nibbles((q + 8).astype(np.uint8)), "scales": scales, "zero_points": _pack_nibbles(zp)}
    mins = qc.mins.detach().cpu().float().numpy().reshape(n, blocks)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(scales != 0, -mins / scales, 0.0).astype(np.float32)
    return {"B": _pack_nibbles(q.astype(np.uint8)), "scales": scales, "zero_points": zp}


def matmuls_from_codes(model: Any, codes: dict[str, Any], bits: int) -> dict[str, str]:
    """Replace each MatMul whose constant weight has codes of `bits` bits by a MatMulNBits holding those codes;
    returns {HF weight name: grid}. Codes of another width are left to onnxruntime's quantizer."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done: dict[str, str] = {}
    for idx, node in enumerate(list(model.graph.node)):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        module = _module_of(node)
        if module is None:
            continue
        names = [f"{module}.weight"] + (["model.embed_tokens.weight"] if module == "lm_head" else [])
        w = numpy_helper.to_array(inits[node.input[1]])  # [K, N]: the graph computes x @ w
        for name in names:
            qc = codes.get(name)
            if qc is None or GRID_BITS.get(qc.grid) != bits or tuple(qc.codes.shape) != w.T.shape:
                continue
            deq = qc.dequantize().float().numpy()
            if qc.grid == "q4_1" and bool(((qc.scales == 0) & (qc.mins != 0)).any()):
                continue  # a constant block (d = 0, m != 0) has no MatMulNBits form
            err = float(np.sqrt(((deq - w.T) ** 2).sum() / max(float((w ** 2).sum()), 1e-30)))
            if err > MAX_CODES_REL_ERROR:
                continue  # not this tensor's codes (e.g. an untied head next to the embedding's codes)
            t = matmulnbits_tensors(qc)
            base = node.input[1]
            new_inits = [numpy_helper.from_array(arr, f"{base}_codes_{key}") for key, arr in t.items()]
            model.graph.initializer.extend(new_inits)
            k, n = w.shape
            nbits = helper.make_node("MatMulNBits", [node.input[0]] + [i.name for i in new_inits], list(node.output),
                                     name=f"{node.name}_codes", domain="com.microsoft", K=k, N=n, bits=bits,
                                     block_size=BLOCK, accuracy_level=4)
            nbits.metadata_props.extend(node.metadata_props)
            model.graph.node.remove(node)
            model.graph.node.insert(idx, nbits)
            done[name] = qc.grid
            break
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    used = {i for n in model.graph.node for i in n.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    return done
