"""Every GGUF architecture row beyond Llama: tiny random model -> GGUF f16/q8_0/q4_0 -> llama.cpp
tokenizes like transformers and computes the same logits."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")

from edgedistill.errors import ExportError  # noqa: E402
from edgedistill.export.arch import ARCHITECTURES  # noqa: E402
from edgedistill.export.gguf import write_gguf  # noqa: E402
from edgedistill.export.llamacpp import LlamaCppModel  # noqa: E402

TEXTS = ["def f(x):\n    return x ** 2  # 123", "Unicode: naïve café 日本語 🤖", "<|im_start|>user\nhi<|im_end|>\n", ""]


def make_tiny(kind: str, out_dir, tokenizer, seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None, tie_word_embeddings=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
            elif p.ndim == 1 and not torch.all(p == 1):  # q/k/v biases: non-zero so they are exercised
                p.normal_(0.0, 0.5)
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def arch_model(request, tmp_path_factory, tiny_tokenizer):
    return request.param, make_tiny(request.param, tmp_path_factory.mktemp(request.param), tiny_tokenizer)


def test_rows_are_registered():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(ARCHITECTURES)


def _torch_logits(model_dir, ids, grid=None):
    """Logits of the torch model, with every 2-D weight put through the GGUF grid when `grid` is given:
    what llama.cpp should compute from a file of that type."""
    from transformers import AutoModelForCausalLM

    from edgedistill.compress.grids import fake_quantize
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        if grid:
            for name, p in model.named_parameters():
                if p.ndim == 2:
                    p.copy_(fake_quantize(p, grid))
        return model(torch.tensor([ids])).logits[0].numpy(), model


def test_tokenization_and_logits_match_transformers(arch_model, tmp_path, tiny_tokenizer):
    kind, d = arch_model
    ids = list(range(3, 203))
    for dtype in ("f16", "q8_0", "q4_0"):
        ref, model = _torch_logits(d, ids, None if dtype == "f16" else dtype)
        if kind == "qwen2":
            assert float(model.model.layers[0].self_attn.q_proj.bias.detach().abs().max()) > 0.1
        path = tmp_path / f"{kind}-{dtype}.gguf"
        info = write_gguf(d, path, dtype)
        assert info["arch"] == ("qwen2" if kind == "qwen2" else "llama") and info["fallback"] == {}
        with LlamaCppModel(path, n_ctx=256) as lm:
            if dtype == "f16":
                for text in TEXTS:
                    assert lm.tokenize(text) == tiny_tokenizer.encode(text, add_special_tokens=False), text
            got = lm.logits(ids)
        top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
        err = float(np.abs(got - ref).max()) / float(np.abs(ref).max())
        # f16 weights and KV cache; for block types llama.cpp also rounds activations to 8 bits in the dot products.
        assert err <= (2e-2 if dtype == "f16" else 6e-2) and top1 >= (0.95 if dtype == "f16" else 0.9), \
            (kind, dtype, err, top1)


def test_sliding_window_is_refused(tmp_path, arch_model):
    kind, d = arch_model
    m = tmp_path / "swa"
    shutil.copytree(d, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg.update(sliding_window=128, use_sliding_window=True)
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="no_sliding_window"):
        write_gguf(m, tmp_path / "x.gguf", "f16")
