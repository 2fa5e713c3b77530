"""GGUF export: grids bit-exact with ggml, tokenization and logits identical to transformers under llama.cpp."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from edgedistill.compress import grids  # noqa: E402
from edgedistill.errors import ExportError  # noqa: E402
from edgedistill.export.gguf import pack_blocks, permute_rows, write_gguf  # noqa: E402
from edgedistill.export.llamacpp import LlamaCppModel  # noqa: E402

GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1}

TEXTS = [
    "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # TODO: empty?\n",
    "Digits 0123456789 and 3.14159, 1e-9, 1,000,000 and x2 = y**2",
    "Unicode: naïve café, Ελληνικά, русский, 日本語, emoji 🤖🚀, combining e\u0301",
    "  leading spaces\n\n\n\ttabs\t\tand   runs of   spaces   \r\n trailing  ",
    "special tokens in text: <|im_start|>user\nhello<|im_end|>\n<|endoftext|>after",
    "contractions: it's they're we've I'm you'll he'd 'quoted' ''",
    "", " ", "\n", "a", "<|im_end|>",
]


def _hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def _torch_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def eval_ids(tiny_model_dir) -> list[int]:
    from edgedistill.data.text import load_corpus
    corpus = load_corpus("stdlib", max_chars=30_000, heldout_fraction=0.5, seed=7)
    ids = _hf_tokenizer(tiny_model_dir).encode("\n".join(corpus.heldout), add_special_tokens=False)
    assert len(ids) >= 300
    return ids[:300]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, tiny_untied_model_dir):
    """{(tied|untied, dtype): (gguf path, export info)}, written once for the module."""
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for tag, d in (("tied", tiny_model_dir), ("untied", tiny_untied_model_dir)):
        for dtype in ("f32", "f16", "q8_0"):
            path = out / f"{tag}-{dtype}.gguf"
            files[tag, dtype] = (path, write_gguf(d, path, dtype))
    return files


# ---------------------------------------------------------------- grids vs ggml reference quantizers
def _edge_rows() -> np.ndarray:
    r = np.zeros((8, 64), np.float32)  # row 0: all zeros
    r[1, :32] = np.arange(32) - 15.5          # exact .5 ties after scaling
    r[1, 32:] = 3.0                           # constant block
    r[2, 0], r[2, 1:8] = 127.0, [0.5, 1.5, -2.5, 126.5, -0.5, 2.5, -126.5]  # d == 1: q8_0 ties
    r[2, 8] = np.nextafter(np.float32(0.5), np.float32(0))   # 0.49999997: fp32 floor(x + 0.5) gives 1
    r[2, 32], r[2, 33:40] = -8.0, [-0.5, 0.5, 6.5, 7.5, -7.5, 1.5, -3.5]   # q4_0: d == 1
    r[3, :32], r[3, 32:] = np.linspace(0, 15, 32), np.linspace(-1, 1, 32)  # q4_1: d == 1 / symmetric
    r[4, :32] = -1e-8                         # tiny values, fp16 scale underflows to subnormal
    r[4, 32:] = np.float32(60000.0) * np.sign(np.arange(32) - 16.0)  # +/- same magnitude, huge
    r[5] = np.tile([1.0, -1.0], 32)           # max ties between signs (argmax picks the first)
    r[6, 5] = -1.0                            # one negative value in a zero block
    r[7] = np.float32(1 / 3) * np.arange(64)
    return r


@pytest.mark.parametrize("grid", ["q8_0", "q4_0", "q4_1"])
def test_grids_bit_exact_with_ggml(grid):
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((16, 256)).astype(np.float32) * s for s in (1e-3, 0.05, 1.0, 30.0)]
    data += [rng.uniform(-1, 1, (16, 96)).astype(np.float32), _edge_rows()]
    for w in data:
        ref_bytes = gguf.quants.quantize(w, GGML[grid])
        qc = grids.quantize(torch.from_numpy(w), grid)
        assert np.array_equal(pack_blocks(qc), ref_bytes), f"{grid} block bytes differ from ggml"
        ref = gguf.quants.dequantize(ref_bytes, GGML[grid])
        assert np.array_equal(grids.dequantize(qc).numpy().view(np.uint32), ref.view(np.uint32))


# ---------------------------------------------------------------- tokenization
@pytest.mark.parametrize("tag", ["tied", "untied"])
def test_tokenization_identical_to_transformers(exported, tiny_model_dir, tag):
    tok = _hf_tokenizer(tiny_model_dir)
    path, info = exported[tag, "f16"]
    assert info["pre_tokenizer"] == "gpt-2"
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert fields["tokenizer.ggml.token_type"].contents()[:3] == [int(gguf.TokenType.CONTROL)] * 3
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    with LlamaCppModel(path, n_ctx=256) as lm:
        assert lm.n_vocab == len(tok)
        for text in TEXTS:
            assert lm.tokenize(text) == tok.encode(text, add_special_tokens=False), repr(text)
            assert lm.tokenize(text, add_special=True) == tok.encode(text, add_special_tokens=True), repr(text)


def test_bos_added_when_the_tokenizer_adds_it(tmp_path, tiny_model_dir):
    d = tmp_path / "bos-model"
    shutil.copytree(tiny_model_dir, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    tok = _hf_tokenizer(d)
    assert tok.encode("hi", add_special_tokens=True)[0] == tok.bos_token_id
    write_gguf(d, tmp_path / "bos.gguf", "f16")
    with LlamaCppModel(tmp_path / "bos.gguf", n_ctx=128) as lm:
        for text in TEXTS[:3]:
            assert lm.tokenize(text, add_special=True) == tok.encode(text, add_special_tokens=True)


# ---------------------------------------------------------------- logits
@pytest.mark.parametrize("tag", ["tied", "untied"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_logits_match_torch(exported, tiny_model_dir, tiny_untied_model_dir, eval_ids, tag, dtype):
    model_dir = tiny_model_dir if tag == "tied" else tiny_untied_model_dir
    ref = _torch_logits(model_dir, eval_ids)
    path, info = exported[tag, dtype]
    with LlamaCppModel(path, n_ctx=512, n_batch=128, kv_type="f32" if dtype == "f32" else "f16") as lm:
        got = lm.logits(eval_ids)  # 300 tokens in 128-token batches
    assert got.shape == ref.shape and got.dtype == np.float32
    scale = float(np.abs(ref).max())
    err = float(np.abs(got - ref).max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    if dtype == "f32":
        assert err <= 1e-3 * scale, err
    elif dtype == "f16":
        assert err <= 2e-2 * scale and top1 >= 0.95, (err, top1)
    else:
        assert top1 >= 0.9, top1
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("output.weight" in names) == (tag == "untied")
    assert info["fallback"] == {} and info["bytes"] == path.stat().st_size


# ---------------------------------------------------------------- lossless codes
@pytest.mark.parametrize("grid", ["q8_0", "q4_0", "q4_1"])
def test_codes_written_losslessly(tmp_path, tiny_model_dir, grid):
    from safetensors.torch import load_file
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    # Codes of *perturbed* weights: re-quantizing the checkpoint would not reproduce them.
    codes = {n: grids.quantize(w + 0.02 * torch.randn(w.shape, generator=gen), grid)
             for n, w in weights.items() if w.ndim == 2}
    path = tmp_path / f"codes-{grid}.gguf"
    info = write_gguf(tiny_model_dir, path, grid, codes=codes)
    assert info["tensor_types"][GGML[grid].name] == len(codes)

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    heads = {"self_attn.q_proj": cfg["num_attention_heads"], "self_attn.k_proj": cfg["num_key_value_heads"]}
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight"}
    for n in codes:
        if n.startswith("model.layers."):
            i, rest = n.split(".")[2], ".".join(n.split(".")[3:-1])
            short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down"}[rest]
            gguf_names[n] = f"blk.{i}.{short}.weight"
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for n, qc in codes.items():
        t = tensors[gguf_names[n]]
        assert t.tensor_type == GGML[grid]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        want = grids.dequantize(qc).numpy()
        rest = ".".join(n.split(".")[3:-1])
        if rest in heads:
            want = permute_rows(want, heads[rest])
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), n
        rtn = grids.dequantize(grids.quantize(weights[n], grid)).numpy()
        assert not np.array_equal(got, rtn if rest not in heads else permute_rows(rtn, heads[rest]))
    with LlamaCppModel(path, n_ctx=64) as lm:
        assert np.isfinite(lm.logits(list(range(3, 40)))).all()


def test_unfit_shapes_fall_back_to_f16(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_llama
    d = make_tiny_llama(tmp_path / "odd", tiny_tokenizer, layers=1, ffn=80)  # ffn_down input 80 % 32 != 0
    info = write_gguf(d, tmp_path / "odd.gguf", "q8_0")
    assert info["fallback"] == {"blk.0.ffn_down.weight": "F16"}
    with LlamaCppModel(tmp_path / "odd.gguf", n_ctx=64) as lm:
        ids = list(range(3, 50))
        top1 = (lm.logits(ids).argmax(-1) == _torch_logits(d, ids).argmax(-1)).mean()
    assert top1 >= 0.85


# ---------------------------------------------------------------- refusals
def _edit_json(d: Path, name: str, edit) -> None:
    p = d / name
    obj = json.loads(p.read_text())
    edit(obj)
    p.write_text(json.dumps(obj))


@pytest.mark.parametrize("case", ["arch", "rope", "pre_tokenizer", "normalizer", "dtype"])
def test_unsupported_inputs_raise_export_error(tmp_path, tiny_model_dir, case):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    dtype, expect = "f16", ""
    if case == "arch":
        _edit_json(d, "config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
        expect = "LlamaForCausalLM"
    elif case == "rope":
        _edit_json(d, "config.json", lambda c: c.update(rope_parameters={"rope_theta": 5e5, "rope_type": "llama3",
                                                                          "factor": 8.0}))
        expect = "rope_type"
    elif case == "pre_tokenizer":
        _edit_json(d, "tokenizer.json", lambda t: t["pre_tokenizer"].update(add_prefix_space=True))
        expect = "pre-tokenizer"
    elif case == "normalizer":
        _edit_json(d, "tokenizer.json", lambda t: t.update(normalizer={"type": "NFKC"}))
        expect = "normalizer"
    else:
        dtype, expect = "q2_k", "q8_0"
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError, match=expect):
        write_gguf(d, out, dtype)
    assert not out.exists() and not list(tmp_path.glob(".x.gguf.*"))


def test_bad_codes_raise_export_error(tmp_path, tiny_model_dir):
    qc = grids.quantize(torch.zeros(8, 64), "q8_0")
    with pytest.raises(ExportError, match="shape"):
        write_gguf(tiny_model_dir, tmp_path / "x.gguf", "q8_0", codes={"model.layers.0.mlp.up_proj.weight": qc})
    with pytest.raises(ExportError, match="lacks"):
        write_gguf(tiny_model_dir, tmp_path / "x.gguf", "q8_0", codes={"no.such.weight": qc})


def test_llama_cpp_refusal_surfaces_reason(tmp_path, exported):
    path, _ = exported["tied", "f16"]
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(ExportError, match="llama.cpp refused .*(failed|error)"):
        LlamaCppModel(broken)
    with pytest.raises(ExportError, match="does not exist"):
        LlamaCppModel(tmp_path / "missing.gguf")


# ---------------------------------------------------------------- the real teacher
TEACHER = Path.home() / ".cache/edgedistill/models/smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.skipif(not (TEACHER / "config.json").is_file(), reason="teacher not in ~/.cache/edgedistill/models")
def test_teacher_f16_matches_transformers(tmp_path):
    from edgedistill.data.text import load_corpus
    info = write_gguf(TEACHER, tmp_path / "teacher-f16.gguf", "f16")
    assert info["pre_tokenizer"] == "smollm" and info["fallback"] == {}
    tok = _hf_tokenizer(TEACHER)
    corpus = load_corpus("stdlib", max_chars=200_000, heldout_fraction=0.1, seed=11)
    docs = [d[i:i + 1500] for d in corpus.train + corpus.heldout for i in range(0, min(len(d), 6000), 1500)]
    with LlamaCppModel(tmp_path / "teacher-f16.gguf", n_ctx=512) as lm:
        for text in docs[:40] + TEXTS:
            assert lm.tokenize(text) == tok.encode(text, add_special_tokens=False), repr(text[:80])
        ids = tok.encode("\n".join(corpus.heldout), add_special_tokens=False)[:384]
        got = lm.logits(ids)
    ref = _torch_logits(TEACHER, ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.98
