"""Per-architecture facts for GGUF export, as tables.

Each supported Hugging Face architecture is one `ArchSpec` row: the llama.cpp
architecture name, how HF tensor names map onto GGUF names, which tensors get
llama.cpp's Q/K row permutation, and how config.json fields become GGUF
metadata. The byte-level BPE pre-tokenizers llama.cpp knows are a second table.
The mechanism that reads these tables lives in `gguf.py`.

Adding a model family is adding a row: Mistral is the Llama row under another
class name (without a sliding window); Qwen2 is the `qwen2` arch with q/k/v
biases and no permutation (llama.cpp applies NeoX-style RoPE to it). Phi-3 keeps
its fused `qkv_proj` and `gate_up_proj` as llama.cpp's `attn_qkv` / `ffn_up` (its
graph splits them: q, k, v rows in HF's order; gate first, then up), with NeoX RoPE
(no permutation) over `partial_rotary_factor` of each head.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ExportError

# ---------------------------------------------------------------- model architectures


@dataclass(frozen=True)
class MetaKey:
    """One GGUF metadata entry: key template ({arch} is filled in), config field, value kind."""
    key: str
    config: str
    kind: str  # "u32" | "f32"


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str
    # HF tensor name prefix ({bid} = block index) -> GGUF name prefix; ".weight"/".bias" are kept.
    tensors: dict[str, str]
    # GGUF name prefix -> config field giving the head count its rows are permuted with.
    permute: dict[str, str]
    metadata: tuple[MetaKey, ...]
    # Derived or defaulted config fields, filled in when config.json lacks them.
    derived: dict[str, Callable[[dict[str, Any]], Any]]
    # Config fields whose value must be one of these (else llama.cpp would compute something else).
    requires: dict[str, tuple[Any, ...]]
    # HF tensors that carry no weights llama.cpp needs.
    ignored: tuple[str, ...] = ("rotary_emb.inv_freq",)
    tied_embeddings: str = "tie_word_embeddings"
    output_tensor: str = "lm_head.weight"


def _rope(c: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters`; older configs have `rope_theta` + `rope_scaling`.
    return c.get("rope_parameters") or c.get("rope_scaling") or {}


_LLAMA_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.self_attn.q_proj": "blk.{bid}.attn_q",
    "model.layers.{bid}.self_attn.k_proj": "blk.{bid}.attn_k",
    "model.layers.{bid}.self_attn.v_proj": "blk.{bid}.attn_v",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm",
    "model.layers.{bid}.mlp.gate_proj": "blk.{bid}.ffn_gate",
    "model.layers.{bid}.mlp.up_proj": "blk.{bid}.ffn_up",
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}

_LLAMA_METADATA = (
    MetaKey("{arch}.vocab_size", "vocab_size", "u32"),
    MetaKey("{arch}.context_length", "max_position_embeddings", "u32"),
    MetaKey("{arch}.embedding_length", "hidden_size", "u32"),
    MetaKey("{arch}.block_count", "num_hidden_layers", "u32"),
    MetaKey("{arch}.feed_forward_length", "intermediate_size", "u32"),
    MetaKey("{arch}.attention.head_count", "num_attention_heads", "u32"),
    MetaKey("{arch}.attention.head_count_kv", "num_key_value_heads", "u32"),
    MetaKey("{arch}.attention.key_length", "head_dim", "u32"),
    MetaKey("{arch}.attention.value_length", "head_dim", "u32"),
    MetaKey("{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps", "f32"),
    MetaKey("{arch}.rope.freq_base", "rope_theta", "f32"),
    MetaKey("{arch}.rope.dimension_count", "head_dim", "u32"),
)

_LLAMA_DERIVED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "num_key_value_heads": lambda c: c["num_attention_heads"],
    "head_dim": lambda c: c["hidden_size"] // c["num_attention_heads"],
    "rope_theta": lambda c: _rope(c).get("rope_theta", 10000.0),
    "rope_type": lambda c: _rope(c).get("rope_type") or _rope(c).get("type") or "default",
    "tie_word_embeddings": lambda c: False,
}

# HF stores Q/K rows in the rotate-half layout; llama.cpp's llama arch expects interleaved pairs.
_LLAMA_PERMUTE = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


def _no_sliding_window(c: dict[str, Any]) -> bool:
    """llama.cpp's llama/qwen2 graphs attend to the whole context: a window only as long as the context is fine."""
    w = c.get("sliding_window")
    return not c.get("use_sliding_window", w is not None) or w is None or w >= c["max_position_embeddings"]


# Phi-3: llama.cpp's `phi3` arch takes the fused tensors as they are and derives the head size from
# embedding_length / head_count, so it writes no key/value length; rope.dimension_count is the rotated part.
_PHI3_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{bid}.input_layernorm": "blk.{bid}.attn_norm",
    "model.layers.{bid}.self_attn.qkv_proj": "blk.{bid}.attn_qkv",
    "model.layers.{bid}.self_attn.o_proj": "blk.{bid}.attn_output",
    "model.layers.{bid}.post_attention_layernorm": "blk.{bid}.ffn_norm",
    "model.layers.{bid}.mlp.gate_up_proj": "blk.{bid}.ffn_up",
    "model.layers.{bid}.mlp.down_proj": "blk.{bid}.ffn_down",
}

_PHI3_METADATA = (
    MetaKey("{arch}.vocab_size", "vocab_size", "u32"),
    MetaKey("{arch}.context_length", "max_position_embeddings", "u32"),
    MetaKey("{arch}.rope.scaling.original_context_length", "original_max_position_embeddings", "u32"),
    MetaKey("{arch}.embedding_length", "hidden_size", "u32"),
    MetaKey("{arch}.block_count", "num_hidden_layers", "u32"),
    MetaKey("{arch}.feed_forward_length", "intermediate_size", "u32"),
    MetaKey("{arch}.attention.head_count", "num_attention_heads", "u32"),
    MetaKey("{arch}.attention.head_count_kv", "num_key_value_heads", "u32"),
    MetaKey("{arch}.attention.layer_norm_rms_epsilon", "rms_norm_eps", "f32"),
    MetaKey("{arch}.rope.freq_base", "rope_theta", "f32"),
    MetaKey("{arch}.rope.dimension_count", "rope_dimension_count", "u32"),
    # 0 = no window. llama.cpp 0.3.36 reads but does not apply a phi3 window (measured: full attention), so a
    # window shorter than the context is refused below rather than silently computed differently.
    MetaKey("{arch}.attention.sliding_window", "sliding_window_or_zero", "u32"),
)

_PHI3_DERIVED: dict[str, Callable[[dict[str, Any]], Any]] = {
    **_LLAMA_DERIVED,
    "original_max_position_embeddings": lambda c: c["max_position_embeddings"],
    "partial_rotary_factor": lambda c: _rope(c).get("partial_rotary_factor", 1.0),
    "rope_dimension_count": lambda c: int(c["partial_rotary_factor"] * c["hidden_size"]) // c["num_attention_heads"],
    "no_sliding_window": _no_sliding_window,
    "sliding_window_or_zero": lambda c: 0,
    "head_dim_is_hidden_over_heads": lambda c: c["head_dim"] == c["hidden_size"] // c["num_attention_heads"],
}


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(
        gguf_arch="llama",
        tensors=_LLAMA_TENSORS,
        permute=_LLAMA_PERMUTE,
        metadata=_LLAMA_METADATA,
        derived=_LLAMA_DERIVED,
        requires={"hidden_act": ("silu",), "rope_type": ("default",)},
    ),
    # Mistral is Llama with an optional sliding window, which llama.cpp's llama graph does not apply.
    "MistralForCausalLM": ArchSpec(
        gguf_arch="llama",
        tensors=_LLAMA_TENSORS,
        permute=_LLAMA_PERMUTE,
        metadata=_LLAMA_METADATA,
        derived={**_LLAMA_DERIVED, "no_sliding_window": _no_sliding_window},
        requires={"hidden_act": ("silu",), "rope_type": ("default",), "no_sliding_window": (True,)},
    ),
    # Qwen2: biases on q/k/v (kept by the ".bias" suffix rule); llama.cpp applies NeoX-style (rotate-half)
    # RoPE to it, which is HF's layout already, so no permutation.
    "Qwen2ForCausalLM": ArchSpec(
        gguf_arch="qwen2",
        tensors=_LLAMA_TENSORS,
        permute={},
        metadata=_LLAMA_METADATA,
        derived={**_LLAMA_DERIVED, "no_sliding_window": _no_sliding_window},
        requires={"hidden_act": ("silu",), "rope_type": ("default",), "no_sliding_window": (True,)},
    ),
    # Phi-3 (mini 4k style). LongRoPE configs (128k: rope_type longrope with long/short factors) are refused.
    "Phi3ForCausalLM": ArchSpec(
        gguf_arch="phi3",
        tensors=_PHI3_TENSORS,
        permute={},
        metadata=_PHI3_METADATA,
        derived=_PHI3_DERIVED,
        requires={"hidden_act": ("silu",), "rope_type": ("default",), "head_dim_is_hidden_over_heads": (True,),
                  "no_sliding_window": (True,)},
    ),
}


def spec_for(config: dict[str, Any]) -> ArchSpec:
    archs = config.get("architectures") or []
    for name in archs:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ExportError(
        f"GGUF export does not support architecture {archs or '(none in config.json)'}; "
        f"supported: {sorted(ARCHITECTURES)}. Distill into one of those, or add a row to "
        f"edgedistill/export/arch.py:ARCHITECTURES.")


def resolve_config(spec: ArchSpec, config: dict[str, Any]) -> dict[str, Any]:
    """config.json with the derived fields filled in, checked against the row's requirements."""
    cfg = dict(config)
    for key, derive in spec.derived.items():
        if cfg.get(key) is None:
            cfg[key] = derive(cfg)
    for key, allowed in spec.requires.items():
        if cfg.get(key) not in allowed:
            raise ExportError(
                f"config.json has {key}={cfg.get(key)!r}; GGUF export of {spec.gguf_arch} supports "
                f"{key} in {list(allowed)}. Export a model without it, or extend the table in arch.py.")
    missing = [m.config for m in spec.metadata if cfg.get(m.config) is None]
    if missing:
        raise ExportError(f"config.json lacks {missing}, needed for the GGUF header; re-save the model "
                          f"with transformers' save_pretrained.")
    return cfg


@dataclass(frozen=True)
class TensorTarget:
    gguf_name: str
    permute_heads: int | None  # head count for llama.cpp's Q/K row permutation, None if none


def _name_patterns(spec: ArchSpec) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for hf, gg in spec.tensors.items():
        rx = re.escape(hf).replace(re.escape("{bid}"), r"(?P<bid>\d+)")
        out.append((re.compile(rf"^{rx}\.(?P<suffix>weight|bias)$"), gg))
    return out


def map_tensor(spec: ArchSpec, cfg: dict[str, Any], hf_name: str) -> TensorTarget | None:
    """The GGUF name for an HF tensor; None for tensors llama.cpp does not need."""
    if any(hf_name.endswith(s) for s in spec.ignored):
        return None
    for rx, gg in _name_patterns(spec):
        m = rx.match(hf_name)
        if m:
            base = gg.format(bid=m.group("bid")) if "{bid}" in gg else gg
            short = gg.split(".")[-1]
            heads = cfg[spec.permute[short]] if short in spec.permute else None
            return TensorTarget(f"{base}.{m.group('suffix')}", heads)
    raise ExportError(
        f"tensor '{hf_name}' has no GGUF name for the {spec.gguf_arch} architecture; "
        f"known HF names: {sorted(spec.tensors)}. The checkpoint has layers llama.cpp would ignore: "
        f"export a plain model or extend the table in arch.py.")


# llama.cpp (0.3.36) changes special-token attributes for models whose general.name contains one of these, and
# fails to load ("unordered_map::at") when the vocabulary lacks the tokens it then looks up. general.name is only
# a label, and our tokenizer metadata is complete without such overrides, so the label is written without them.
LLAMACPP_NAME_TRIGGERS = ("phi-3", "phi3")


def gguf_model_name(name: str) -> str:
    """`name` as general.name, with substrings that switch on llama.cpp's per-name tokenizer workarounds broken up."""
    for trigger in LLAMACPP_NAME_TRIGGERS:
        name = re.sub(re.escape(trigger), trigger[:-1].rstrip("-") + "_3", name, flags=re.IGNORECASE)
    return name


# ---------------------------------------------------------------- byte-level BPE pre-tokenizers


@dataclass(frozen=True)
class PreTokenizer:
    """A tokenizer.json pre_tokenizer chain llama.cpp reproduces under `name` (tokenizer.ggml.pre)."""
    name: str
    steps: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]  # (type, ((field, value), ...)), in order
    ignore_merges: bool = False  # BPE option; llama.cpp only honours it for its "llama-bpe" pre-tokenizer


_BYTE_LEVEL = ("ByteLevel", (("add_prefix_space", False), ("use_regex", True)))

PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    # GPT-2's regex. llama.cpp spells this pre-tokenizer "gpt-2" ("gpt2" is the tokenizer model's name).
    PreTokenizer("gpt-2", (_BYTE_LEVEL,)),
    # SmolLM / SmolLM2: every digit split off first, then the GPT-2 regex.
    PreTokenizer("smollm", (("Digits", (("individual_digits", True),)), _BYTE_LEVEL)),
)


def _steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer that splits text exactly like this tokenizer.json, or ExportError."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    model = tokenizer_json.get("model", {})
    for row in PRE_TOKENIZERS:
        if len(steps) != len(row.steps):
            continue
        if all(s.get("type") == t and all(s.get(k) == v for k, v in fields)
               for s, (t, fields) in zip(steps, row.steps)) \
                and bool(model.get("ignore_merges", False)) == row.ignore_merges:
            return row.name
    raise ExportError(
        f"the tokenizer's pre-tokenizer {steps} (BPE ignore_merges={model.get('ignore_merges')}) "
        f"has no llama.cpp equivalent we know; "
        f"supported: {[r.name for r in PRE_TOKENIZERS]}. Use a tokenizer with one of those, or add a "
        f"verified row to edgedistill/export/arch.py:PRE_TOKENIZERS.")
