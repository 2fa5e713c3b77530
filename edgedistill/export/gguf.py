"""Write a Hugging Face Llama-family checkpoint as a GGUF file llama.cpp loads.

The per-architecture knowledge (tensor names, Q/K permutation, metadata keys,
pre-tokenizer names) is in `arch.py`; this module is the mechanism. Quantized
tensors are packed from our own grid codes (`compress/grids.py`), so a GGUF
written from codes holds exactly the weights torch evaluated.
"""
from __future__ import annotations

import ctypes
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..artifacts import atomic_path
from ..compress import grids
from ..errors import ExportError
from . import arch

DTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
# Types made by llama.cpp's own quantizer (llama_model_quantize) from an f32 GGUF we write: llama_ftype ids.
LLAMACPP_TYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
F16_MAX = 65504.0


# ---------------------------------------------------------------- ggml block packing (pure numpy)
def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes: low nibble = element j, high nibble = element j + 16."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _pack_q8_0(codes: np.ndarray) -> np.ndarray:
    return codes.view(np.uint8)


def _pack_q4_0(codes: np.ndarray) -> np.ndarray:
    return _nibbles((codes.astype(np.int16) + 8).astype(np.uint8))


def _pack_q4_1(codes: np.ndarray) -> np.ndarray:
    return _nibbles(codes.astype(np.uint8))


@dataclass(frozen=True)
class BlockFormat:
    ggml_type: str  # gguf.GGMLQuantizationType member name
    file_type: str  # gguf.LlamaFileType member name
    pack: Callable[[np.ndarray], np.ndarray]  # int8 codes [rows, blocks, 32] -> payload bytes after d (and m)


BLOCK_FORMATS: dict[str, BlockFormat] = {
    "q8_0": BlockFormat("Q8_0", "MOSTLY_Q8_0", _pack_q8_0),
    "q4_0": BlockFormat("Q4_0", "MOSTLY_Q4_0", _pack_q4_0),
    "q4_1": BlockFormat("Q4_1", "MOSTLY_Q4_1", _pack_q4_1),
}
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", **{k: v.file_type for k, v in BLOCK_FORMATS.items()}}


def pack_blocks(qc: grids.QuantCodes) -> np.ndarray:
    """QuantCodes -> ggml block bytes [rows, blocks * type_size] (uint8): fp16 d, [fp16 m], payload."""
    rows, cols = qc.codes.shape
    nb = cols // grids.BLOCK

    def f16(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().to(torch.float16).contiguous().numpy().reshape(rows, nb, 1).view(np.uint8)

    parts = [f16(qc.scales)] + ([f16(qc.mins)] if qc.mins is not None else [])
    codes = qc.codes.detach().cpu().to(torch.int8).contiguous().numpy().reshape(rows, nb, grids.BLOCK)
    parts.append(BLOCK_FORMATS[qc.grid].pack(codes))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K permutation: per head, rows (rotate-half halves) -> interleaved pairs."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _permute_codes(qc: grids.QuantCodes, n_head: int) -> grids.QuantCodes:
    def p(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return torch.from_numpy(np.ascontiguousarray(permute_rows(t.detach().cpu().numpy(), n_head)))
    return grids.QuantCodes(qc.grid, p(qc.codes), p(qc.scales), p(qc.mins))


def _check_codes(name: str, qc: grids.QuantCodes, shape: tuple[int, ...]) -> None:
    g = grids.GRIDS.get(qc.grid)
    if g is None or qc.grid not in BLOCK_FORMATS:
        raise ExportError(f"codes for '{name}' use grid '{qc.grid}'; GGUF export writes {sorted(BLOCK_FORMATS)}.")
    nb = shape[1] // grids.BLOCK if len(shape) == 2 and shape[1] % grids.BLOCK == 0 else -1
    ok = (nb > 0 and tuple(qc.codes.shape) == shape and tuple(qc.scales.shape) == (shape[0], nb)
          and (qc.mins is None) == (not g.has_min)
          and (qc.mins is None or tuple(qc.mins.shape) == (shape[0], nb)))
    if not ok:
        raise ExportError(f"codes for '{name}' have shape {tuple(qc.codes.shape)} (scales "
                          f"{tuple(qc.scales.shape)}) but the tensor is {shape}; they belong to another model. "
                          f"Re-run compression on this checkpoint.")
    if qc.codes.numel() and (int(qc.codes.min()) < g.qmin or int(qc.codes.max()) > g.qmax):
        raise ExportError(f"codes for '{name}' leave the {qc.grid} range [{g.qmin}, {g.qmax}]; the codes file "
                          f"is corrupt. Re-run compression.")


# ---------------------------------------------------------------- checkpoint reading
def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} is missing; GGUF export needs a Hugging Face model folder with {what}.")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}); restore it from the model's source.") from None


def _load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"no *.safetensors in {model_dir}; save the model with save_pretrained "
                          f"(safe_serialization=True) before exporting.")
    from safetensors import SafetensorError

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{f} is corrupt or truncated ({e}); re-run the stage that wrote it (or save_pretrained "
                              "the model again) before exporting.") from None
    return out


# ---------------------------------------------------------------- tokenizer
@dataclass
class Vocab:
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def _added_affixes(tok) -> tuple[bool, bool]:
    """Whether encoding with special tokens adds exactly BOS in front / EOS behind (else ExportError)."""
    probe = "Hello world 12"
    plain = tok.encode(probe, add_special_tokens=False)
    full = tok.encode(probe, add_special_tokens=True)
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain]
    if not starts:
        raise ExportError("the tokenizer's post-processor changes the text tokens themselves; llama.cpp cannot "
                          "reproduce that. Use a tokenizer whose post-processor only adds BOS/EOS.")
    pre, post = full[:starts[0]], full[starts[0] + len(plain):]
    if pre not in ([], [tok.bos_token_id]) or post not in ([], [tok.eos_token_id]):
        raise ExportError(f"the tokenizer adds {pre} before and {post} after the text; llama.cpp can only add "
                          f"the BOS ({tok.bos_token_id}) and EOS ({tok.eos_token_id}) ids. Use a simpler "
                          f"post-processor.")
    return bool(pre), bool(post)


def read_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """Byte-level BPE tokenizer.json -> llama.cpp `gpt2` vocabulary, or ExportError if not representable."""
    import gguf
    from transformers import AutoTokenizer

    tj = _read_json(model_dir / "tokenizer.json", "a fast tokenizer (tokenizer.json)")
    model, decoder = tj.get("model", {}), tj.get("decoder") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model type {model.get('type')!r} (need BPE)")
    if decoder.get("type") != "ByteLevel":
        problems.append(f"decoder {decoder.get('type')!r} (need ByteLevel)")
    if tj.get("normalizer"):
        problems.append(f"normalizer {tj['normalizer'].get('type')!r} (need none)")
    for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            problems.append(f"BPE {key}={model[key]!r}")
    if problems:
        raise ExportError(f"cannot represent this tokenizer in GGUF: {'; '.join(problems)}. Export supports "
                          f"byte-level BPE tokenizers (GPT-2 / SmolLM style).")
    pre = arch.pre_tokenizer_name(tj)

    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    entries = [(i, t, int(gguf.TokenType.NORMAL)) for t, i in model["vocab"].items()]
    for a in tj.get("added_tokens", []):
        # llama.cpp matches CONTROL / USER_DEFINED tokens as raw text, so their content is stored as is.
        kind = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
        entries.append((a["id"], a["content"], int(kind)))
    for i, text, kind in entries:
        if i >= n_vocab:
            raise ExportError(f"token id {i} ({text!r}) is outside the model's {n_vocab} embedding rows; the "
                              f"tokenizer does not belong to this model.")
        tokens[i], types[i] = text, kind
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    special_ids = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    add_bos, add_eos = _added_affixes(tok)
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    return Vocab(pre, tokens, types, merges, {k: v for k, v in special_ids.items() if v is not None},
                 add_bos, add_eos, template)


def _add_vocab(w, v: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
              "pad": w.add_pad_token_id}
    for k, i in v.special_ids.items():
        adders[k](i)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


# ---------------------------------------------------------------- the exporter
def _ordered(names: list[str]) -> list[str]:
    def key(n: str):
        parts = n.split(".")
        return (0 if n.startswith("token_embd") else 2 if not n.startswith("blk.") else 1,
                int(parts[1]) if n.startswith("blk.") else 0, n)
    return sorted(names, key=key)


def write_gguf(model_dir: str | Path, out_path: str | Path, dtype: str = "f16",
               codes: dict[str, grids.QuantCodes] | None = None) -> dict[str, Any]:
    """Export an HF checkpoint folder to GGUF.

    dtype sets the type of every 2-D weight: f32, f16, or a block grid (q8_0, q4_0, q4_1); k-quants
    (q4_k_m, q5_k_m, q6_k) go through llama.cpp's quantizer (`write_gguf_llamacpp`). 1-D tensors
    stay f32. A tensor with an entry in `codes` (keyed by HF parameter name) is written losslessly in its
    codes' grid whatever `dtype` says; other grid tensors are quantized here with the same grid code.
    Weights whose input dimension is not a multiple of 32 fall back to f16 (listed under "fallback").
    """
    import gguf

    if dtype in LLAMACPP_TYPES and not codes:
        return write_gguf_llamacpp(model_dir, out_path, dtype)
    if dtype not in DTYPES:
        raise ExportError(f"unknown GGUF dtype '{dtype}'; expected one of {list(DTYPES) + list(LLAMACPP_TYPES)} "
                          f"(k-quants without codes only).")
    model_dir, codes = Path(model_dir), dict(codes or {})
    config = _read_json(model_dir / "config.json", "config.json")
    spec = arch.spec_for(config)
    cfg = arch.resolve_config(spec, config)
    vocab = read_vocab(model_dir, int(cfg["vocab_size"]))
    weights = _load_weights(model_dir)
    tied = bool(cfg[spec.tied_embeddings])
    if tied:
        weights.pop(spec.output_tensor, None)
    elif spec.output_tensor not in weights:
        raise ExportError(f"config says the output head is untied but {spec.output_tensor} is not in "
                          f"{model_dir}; re-save the model with save_pretrained.")
    unused = sorted(set(codes) - set(weights))
    if unused:
        raise ExportError(f"codes given for tensors the checkpoint lacks: {unused[:5]}; codes must be keyed by "
                          f"HF parameter name of this model.")

    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    fallback: dict[str, str] = {}
    for hf_name, t in weights.items():
        target = arch.map_tensor(spec, cfg, hf_name)
        if target is None:
            continue
        w = t.detach().float().contiguous()
        qc = codes.get(hf_name)
        if qc is not None:
            _check_codes(hf_name, qc, tuple(w.shape))
        grid = qc.grid if qc is not None else dtype
        if w.ndim == 2 and grid in BLOCK_FORMATS and w.shape[1] % grids.BLOCK == 0:
            qc = qc if qc is not None else grids.quantize(w, grid)
            if target.permute_heads:
                qc = _permute_codes(qc, target.permute_heads)
            fmt = BLOCK_FORMATS[grid]
            tensors[target.gguf_name] = (pack_blocks(qc), getattr(gguf.GGMLQuantizationType, fmt.ggml_type))
            continue
        arr = w.numpy()
        if target.permute_heads:
            arr = permute_rows(arr, target.permute_heads)
        kind = "f32" if w.ndim < 2 or dtype == "f32" else "f16"
        if kind == "f16" and np.abs(arr).max(initial=0.0) > F16_MAX:
            kind = "f32"
        if w.ndim == 2 and kind != dtype:
            fallback[target.gguf_name] = kind.upper()
        np_dtype = np.float16 if kind == "f16" else np.float32
        tensors[target.gguf_name] = (np.ascontiguousarray(arr.astype(np_dtype)), None)

    counts: Counter[str] = Counter()
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), spec.gguf_arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(arch.gguf_model_name(model_dir.name))
        writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[dtype])))
        adders = {"u32": writer.add_uint32, "f32": writer.add_float32}
        for m in spec.metadata:
            value = cfg[m.config]
            adders[m.kind](m.key.format(arch=spec.gguf_arch), int(value) if m.kind == "u32" else float(value))
        _add_vocab(writer, vocab)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name in _ordered(list(tensors)):
            arr, raw = tensors[name]
            writer.add_tensor(name, arr, raw_dtype=raw)
            counts[raw.name if raw is not None else ("F16" if arr.dtype == np.float16 else "F32")] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    size = Path(out_path).stat().st_size
    return {"type": dtype, "bytes": size, "arch": spec.gguf_arch, "pre_tokenizer": vocab.pre,
            "tied_embeddings": tied, "tensor_types": dict(counts), "fallback": fallback}


# ---------------------------------------------------------------- llama.cpp's quantizer
def quantize_with_llamacpp(src: str | Path, dst: str | Path, ftype: int, *, threads: int | None = None) -> None:
    """llama_model_quantize(src -> dst) with llama.cpp's defaults (k-quant mixes, fallbacks for unfit shapes)."""
    import llama_cpp

    from .llamacpp import _captured_llama_log

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(threads or 0)
    with atomic_path(dst) as tmp, _captured_llama_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise ExportError(f"llama.cpp's quantizer failed on {src} (ftype {ftype}): "
                              f"{''.join(log).strip() or f'return code {rc}'}. Re-export the f32 GGUF and retry.")


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def write_gguf_llamacpp(model_dir: str | Path, out_path: str | Path, dtype: str) -> dict[str, Any]:
    """A k-quant GGUF: our f32 GGUF, quantized by llama.cpp. Tensors llama.cpp stored in a type other than
    the nominal one (shapes off its 256-wide super-blocks, or its mix rules) are listed under "fallback"."""
    import tempfile

    if dtype not in LLAMACPP_TYPES:
        raise ExportError(f"'{dtype}' is not a llama.cpp quantizer type; expected one of {sorted(LLAMACPP_TYPES)}.")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        f32 = Path(tmp) / "f32.gguf"
        info = write_gguf(model_dir, f32, "f32")
        quantize_with_llamacpp(f32, out_path, LLAMACPP_TYPES[dtype])
    types = gguf_tensor_types(out_path)
    nominal = dtype.split("_")[0].upper() + "_K"  # q4_k_m -> Q4_K
    counts = Counter(types.values())
    fallback = {n: t for n, t in types.items() if t != nominal and not n.endswith("norm.weight")}
    return {**info, "type": dtype, "bytes": out_path.stat().st_size, "tensor_types": dict(counts),
            "fallback": fallback, "quantizer": "llama.cpp"}
