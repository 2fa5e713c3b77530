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
    from transformers import MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None, tie_word_embeddings=False))
    elif kind == "phi3":
        # fused qkv_proj / gate_up_proj, untied head, and RoPE over half of each head (as Phi-4-mini has)
        model = Phi3ForCausalLM(Phi3Config(**common, sliding_window=None, tie_word_embeddings=False,
                                           original_max_position_embeddings=1024,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                            "partial_rotary_factor": 0.5}))
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


@pytest.fixture(scope="module", params=["mistral", "qwen2", "phi3"])
def arch_model(request, tmp_path_factory, tiny_tokenizer):
    return request.param, make_tiny(request.param, tmp_path_factory.mktemp(request.param), tiny_tokenizer)


def test_rows_are_registered():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"} <= set(ARCHITECTURES)


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
        assert info["arch"] == {"qwen2": "qwen2", "phi3": "phi3"}.get(kind, "llama") and info["fallback"] == {}
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


def test_phi3_tensors_metadata_and_gptq_codes(tmp_path, tiny_tokenizer):
    """Phi-3's fused projections are single nn.Linear layers to compress/: GPTQ codes for qkv_proj and
    gate_up_proj go into attn_qkv / ffn_up bit for bit, and llama.cpp computes what torch computes from them."""
    import gguf

    from edgedistill.compress.grids import dequantize
    from edgedistill.compress.methods import ObsConfig, obs_compress
    from edgedistill.data.text import load_corpus
    from transformers import AutoModelForCausalLM

    d = make_tiny("phi3", tmp_path / "phi3", tiny_tokenizer, seed=3)
    corpus = load_corpus("stdlib", max_chars=40_000, heldout_fraction=0.1, seed=2)
    ids = tiny_tokenizer.encode("\n".join(corpus.train))
    calib = [ids[i * 64:(i + 1) * 64] for i in range(8)]
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    codes, _ = obs_compress(model, calib, ObsConfig(grid="q4_0", batch_size=4))
    assert {n.split(".", 3)[3] for n in codes} == {"self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                                                   "mlp.gate_up_proj.weight", "mlp.down_proj.weight"}
    model.save_pretrained(tmp_path / "q")
    tiny_tokenizer.save_pretrained(tmp_path / "q")
    path = tmp_path / "q.gguf"
    write_gguf(tmp_path / "q", path, dtype="q4_0", codes=codes)
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("phi3.")}
    assert reader.fields["general.name"].contents() == "q"
    assert fields["phi3.rope.dimension_count"] == 8 and fields["phi3.attention.sliding_window"] == 0
    assert fields["phi3.rope.scaling.original_context_length"] == 1024 and "phi3.attention.key_length" not in fields
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [64, (4 + 2 * 2) * 16]
    assert tensors["blk.0.ffn_up.weight"].shape.tolist() == [64, 2 * 128]
    for hf, gg in (("self_attn.qkv_proj", "attn_qkv"), ("mlp.gate_up_proj", "ffn_up")):
        qc = codes[f"model.layers.1.{hf}.weight"]
        t = tensors[f"blk.1.{gg}.weight"]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(qc.codes.shape)
        assert np.array_equal(got.view(np.uint32), dequantize(qc).numpy().view(np.uint32)), hf
    from edgedistill.compress.grids import fake_quantize
    with torch.no_grad():  # the embedding and the head have no codes: the writer rounds them to q4_0 itself
        for name, p in model.named_parameters():
            if p.ndim == 2 and name not in codes:
                p.copy_(fake_quantize(p, "q4_0"))
        text_ids = list(range(3, 131))
        ref = model(torch.tensor([text_ids])).logits[0].numpy()
    with LlamaCppModel(path, n_ctx=256) as lm:
        got = lm.logits(text_ids)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    err = float(np.abs(got - ref).max()) / float(np.abs(ref).max())
    assert top1 >= 0.9 and err <= 6e-2, (top1, err)


def test_a_phi3_name_does_not_switch_on_llamacpp_name_workarounds(tmp_path, tiny_tokenizer):
    from edgedistill.export.arch import gguf_model_name
    assert gguf_model_name("my-Phi-3-student") == "my-phi_3-student" and gguf_model_name("phi3") == "phi_3"
    d = make_tiny("phi3", tmp_path / "Phi3-mini-student", tiny_tokenizer)
    write_gguf(d, tmp_path / "p.gguf", "f16")
    with LlamaCppModel(tmp_path / "p.gguf", n_ctx=64) as lm:  # llama.cpp refuses this vocabulary under a phi3 name
        assert lm.tokenize("<|im_start|> x") == tiny_tokenizer.encode("<|im_start|> x", add_special_tokens=False)


def test_phi3_longrope_is_refused(tmp_path, tiny_tokenizer):
    d = make_tiny("phi3", tmp_path / "p", tiny_tokenizer)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 4,
                              "short_factor": [1.0] * 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"rope_type='longrope'.*phi3"):
        write_gguf(d, tmp_path / "x.gguf", "f16")
