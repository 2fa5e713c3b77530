"""Does an exported file fit a device, and how fast will it run there?

Memory: weights + KV cache at the profile's context + runtime overhead (a fixed
part plus the activations of one prefill chunk) must stay within the budget.

Speed: decoding one token streams every weight it multiplies with, plus the
KV cache so far, through memory, and does 2 FLOPs per weight at matrix-vector
efficiency; on the small models and CPUs we target neither term dominates, so
the predictor adds the two times (a roofline would take the larger):
    1 / tokens/s = bytes per token / bandwidth + FLOPs per token / (matvec efficiency × GEMM FLOP/s).
Prefill is compute bound: tokens/s = prefill efficiency × GEMM FLOP/s / FLOPs per token.
The efficiencies are runtime facts, held in `RUNTIMES` and calibrated on
SmolLM2-135M-Instruct (not on the students they are then checked against).
Where the profile has a measured llama.cpp decode rate for the file's type (`decode_rates`: the
`host` benchmark decodes a synthetic model in each type), the weights term is matmul weights / that
rate instead: one fp32 GEMM figure cannot say how f16 conversion, Q8_0 and Q4_0 unpacking compare
on a given CPU, and on the shared 2-core host that mismatch put Q4_0 off by up to 49%.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import DeviceError
from .profiles import DeviceProfile

MB = 1e6


@dataclass(frozen=True)
class RuntimeFacts:
    kv_bytes: int                 # bytes per cached K or V element
    prefill_chunk: int | None     # tokens per prefill step; None = the whole prompt at once
    overhead_bytes: int           # the runtime itself: library, graph, scratch
    matvec_efficiency: float      # fraction of GEMM FLOP/s reached by single-token (matrix-vector) decoding
    prefill_efficiency: float     # fraction of GEMM FLOP/s reached in prefill


# Calibrated with llama.cpp 0.3.36 on one thread of the build host (SmolLM2-135M-Instruct f16/q8_0/q4_0):
# after the streaming time, the rest of a decode step is ~0.27 GFLOP at ~6.5% of the host's fp32 GEMM rate
# (medians over 3 rounds for f16 / q8_0 / q4_0: 0.070, 0.065, 0.058).
# onnxruntime's matvec efficiency is calibrated the same way on its fp32 KV-cache graph.
RUNTIMES: dict[str, RuntimeFacts] = {
    "llama.cpp": RuntimeFacts(kv_bytes=2, prefill_chunk=512, overhead_bytes=int(40 * MB),
                              matvec_efficiency=0.065, prefill_efficiency=0.4),
    "onnxruntime": RuntimeFacts(kv_bytes=4, prefill_chunk=None, overhead_bytes=int(80 * MB),
                                matvec_efficiency=0.065, prefill_efficiency=0.4),
}


@dataclass(frozen=True)
class ModelShape:
    """What fit arithmetic needs from config.json."""
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int  # all parameters, the embedding table counted once

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelShape":
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            head_dim = int(config.get("head_dim") or hidden // heads)
            kv = int(config.get("num_key_value_heads") or heads)
            layers, ffn, vocab = (int(config[k]) for k in ("num_hidden_layers", "intermediate_size", "vocab_size"))
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceError(f"config.json lacks {e} needed for device fit; expected a Llama-family config.") from None
        tied = bool(config.get("tie_word_embeddings", False))
        per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * ffn + 2 * hidden
        params = layers * per_layer + vocab * hidden * (1 if tied else 2) + hidden
        return cls(layers, hidden, ffn, heads, kv, head_dim, vocab, tied, params)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelShape":
        p = Path(model_dir) / "config.json"
        if not p.is_file():
            raise DeviceError(f"{p} is missing; device fit needs the model's config.json.")
        return cls.from_config(json.loads(p.read_text()))

    def kv_bytes_per_token(self, elem_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * elem_bytes

    def matmul_params(self) -> int:
        """Weights multiplied with per token: everything but the embedding lookup (the head always)."""
        return self.params - self.hidden * (self.layers * 2 + 1) - (0 if self.tied else self.vocab * self.hidden)

    def flops_per_token(self, position: int) -> float:
        return 2.0 * self.matmul_params() + 4.0 * self.layers * self.heads * self.head_dim * position


@dataclass(frozen=True)
class Candidate:
    """An exported file as device fit sees it."""
    path: str          # relative to the build folder
    runtime: str       # key of RUNTIMES
    format: str        # weight format: a GGUF type (q8_0) or an ONNX precision (fp32, int8, int4)
    file_bytes: int
    weight_read_bytes: int  # bytes of weights read per decoded token
    ppl: float | None = None


def gguf_candidate(path: Path, rel: str, ppl: float | None = None) -> Candidate:
    """Type and per-token bytes read from the GGUF header: the embedding table is only gathered from,
    unless it doubles as the output head (tied)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    ft = reader.fields.get("general.file_type")
    fmt = _GGUF_FILE_TYPES.get(int(ft.contents())) if ft is not None else None
    if fmt is None:
        fmt = Path(rel).stem.rsplit("-", 1)[-1].lower()
    read = sum(sizes.values())
    if "output.weight" in sizes:
        read -= sizes.get("token_embd.weight", 0)
    return Candidate(rel, "llama.cpp", fmt, path.stat().st_size, read, ppl)


_GGUF_FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 15: "q4_k_m", 17: "q5_k_m", 18: "q6_k",
                    32: "bf16"}


def onnx_candidate(files: list[Path], rel: str, shape: ModelShape, ppl: float | None = None) -> Candidate:
    """An ONNX model (and its external data): int8/int4 from the file name, fp32 otherwise. The fp32 embedding
    table is only gathered from, unless it doubles as the fp32 output head (tied, unquantized)."""
    stem = Path(rel).stem.lower()
    fmt = next((f for f in ("int8", "int4") if stem.endswith(f)), "fp32")
    size = sum(f.stat().st_size for f in files)
    gathered = 0 if (fmt == "fp32" and shape.tied) else shape.vocab * shape.hidden * 4
    return Candidate(rel, "onnxruntime", fmt, size, max(size - gathered, 0), ppl)


@dataclass
class Fit:
    """One candidate on one device."""
    path: str
    runtime: str
    format: str
    supported: bool
    weights_mb: float
    kv_cache_mb: float
    overhead_mb: float
    total_mb: float
    budget_mb: float
    fits: bool
    context: int
    decode_tps: float          # at the start of a conversation
    decode_tps_full_context: float
    prefill_tps: float
    fast_enough: bool
    ppl: float | None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def fit_candidate(c: Candidate, shape: ModelShape, profile: DeviceProfile, context: int | None = None) -> Fit:
    ctx = context or profile.default_context
    rt = RUNTIMES[c.runtime]
    supported = c.format in profile.runtimes.get(c.runtime, [])  # type: ignore[call-overload]
    kv_tok = shape.kv_bytes_per_token(rt.kv_bytes)
    kv = kv_tok * ctx
    chunk = min(rt.prefill_chunk or ctx, ctx)
    activations = chunk * (shape.vocab + shape.ffn + 4 * shape.hidden) * 4
    overhead = rt.overhead_bytes + activations
    total = c.file_bytes + kv + overhead
    budget = profile.budget_gb * 1e9
    bw = profile.memory_bandwidth_gbs * 1e9
    matvec = profile.compute_gflops * 1e9 * rt.matvec_efficiency

    rate = profile.decode_rates.get(c.format) if c.runtime == "llama.cpp" else None

    def decode(position: int) -> float:
        if rate:  # the runtime's measured speed for this weight type, plus the KV cache read so far
            attention = shape.flops_per_token(position) - shape.flops_per_token(0)
            return 1.0 / (shape.matmul_params() / (rate * 1e9) + kv_tok * position / bw + attention / matvec)
        return 1.0 / ((c.weight_read_bytes + kv_tok * position) / bw + shape.flops_per_token(position) / matvec)

    prefill = profile.compute_gflops * 1e9 * rt.prefill_efficiency / shape.flops_per_token(min(ctx, 512) // 2)
    start = decode(0)
    return Fit(c.path, c.runtime, c.format, supported, c.file_bytes / MB, kv / MB, overhead / MB, total / MB,
               budget / MB, total <= budget, ctx, start, decode(ctx), prefill,
               start >= profile.min_decode_tps, c.ppl)


def choose(fits: list[Fit], ppl_tolerance: float = 0.01) -> Fit | None:
    """The file to ship: among supported files that fit (and are fast enough, if any is), the fastest whose
    perplexity is within `ppl_tolerance` of the best; without perplexities, the most precise that is fast enough."""
    ok = [f for f in fits if f.supported and f.fits]
    if not ok:
        return None
    fast = [f for f in ok if f.fast_enough]
    if not fast:
        return max(ok, key=lambda f: f.decode_tps)
    known = [f for f in fast if f.ppl is not None]
    if known:
        best = min(f.ppl for f in known)  # type: ignore[type-var]
        good = [f for f in known if f.ppl <= best * (1 + ppl_tolerance)]  # type: ignore[operator]
        return max(good, key=lambda f: f.decode_tps)
    return max(fast, key=lambda f: f.weights_mb)


def explain_no_fit(device: str, fits: list[Fit]) -> str:
    rows = "; ".join(f"{f.path} ({f.runtime} {f.format}): "
                     + ("not supported there" if not f.supported else f"needs {f.total_mb:.0f} MB of {f.budget_mb:.0f}")
                     for f in fits)
    return (f"no exported file fits {device}: {rows or 'the build exported no GGUF or ONNX file'}. "
            f"Export a smaller type (e.g. add q4_0 to export.gguf), shorten devices.context, or distill a smaller student.")
