"""How fast llama.cpp decodes each weight type on this machine: the `host` profile's per-type rates.

Bandwidth and fp32 GEMM speed do not say how fast llama.cpp's per-type dot-product kernels run: f16
converts every weight, Q4_0 unpacks nibbles, Q8_0 does neither, and which of them is bound by memory or
by arithmetic depends on the CPU (on this project's 2-core VM, one thread). So the host benchmark decodes
a synthetic random Llama of about the size of our students (50 M matmul weights, 8 blocks) in each type
and records matmul weights per second of single-sequence decode: streaming and compute together, as the
runtime really does them. The student is never run here; the predictor scales these rates to its size.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

MEASURED_TYPES = ("f16", "q8_0", "q4_0", "q4_1")
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4)


def _byte_tokenizer():
    """A byte-level BPE with one merge (256 byte tokens + "ab" + 3 specials): about the smallest tokenizer GGUF
    export and llama.cpp take (llama.cpp refuses a BPE vocabulary without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["ab"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return hf


def synthetic_model(out_dir: Path) -> int:
    """Write the random benchmark model to `out_dir`; returns its matmul weight count (blocks + head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPE)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    blocks = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n)
    return blocks + cfg.vocab_size * cfg.hidden_size


def measure_decode_rates(threads: int, types: tuple[str, ...] = MEASURED_TYPES, tokens: int = 24) -> dict[str, float]:
    """{type: billions of matmul weights per second} of llama.cpp decoding one sequence on `threads` threads."""
    from ..export.gguf import write_gguf
    from ..export.llamacpp import LlamaCppModel

    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = synthetic_model(Path(tmp) / "model")
        for t in types:
            path = Path(tmp) / f"{t}.gguf"
            write_gguf(Path(tmp) / "model", path, t)
            with LlamaCppModel(path, n_ctx=64, n_threads=threads) as m:
                tps = m.decode_tokens_per_s(tokens, prompt=list(range(3, 11)))
            rates[t] = round(weights * tps / 1e9, 3)
            path.unlink()
    return rates
