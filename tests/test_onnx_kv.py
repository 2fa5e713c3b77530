"""ONNX with a KV cache: incremental decoding equals the full forward; generation; int8/int4; the export CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgedistill.errors import ExportError
from edgedistill.export.ort import OnnxModel, Sampling, sample_next


@pytest.fixture(scope="module")
def kv(tmp_path_factory, tiny_model_dir):
    from edgedistill.export.onnx import export_onnx
    out = tmp_path_factory.mktemp("onnx-kv") / "model.onnx"
    info = export_onnx(tiny_model_dir, out, graph="kv_cache")
    return out, info


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text_ids(tiny_model_dir) -> np.ndarray:
    from transformers import AutoTokenizer

    from edgedistill.data.text import load_corpus
    corpus = load_corpus("stdlib", max_chars=30_000, heldout_fraction=0.5, seed=5)
    ids = AutoTokenizer.from_pretrained(str(tiny_model_dir)).encode("\n".join(corpus.heldout))
    return np.array(ids[:200], np.int64)


def test_signature_has_dynamic_cache_axes(kv, hf):
    _, info = kv
    n = hf.config.num_hidden_layers
    names = [i["name"] for i in info["inputs"]]
    assert names == ["input_ids"] + [f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value")]
    assert [o["name"] for o in info["outputs"]][:3] == ["logits", "present.0.key", "present.0.value"]
    assert info["inputs"][1]["shape"] == ["batch", 2, "past", 16]
    assert info["outputs"][1]["shape"][0] == "batch" and "past" in str(info["outputs"][1]["shape"][2])


def test_incremental_decoding_equals_full_forward(kv, hf, text_ids):
    m = OnnxModel(kv[0], threads=1)
    assert m.has_cache
    ids = np.stack([text_ids[:60], text_ids[60:120]])  # batch of 2
    full, _ = m.step(ids)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(full - ref).max() < 1e-4
    # Prefill 20, then 10 single tokens, then a chunk of 30: positions and masks must line up.
    out, cache = m.step(ids[:, :20])
    parts = [out]
    for t in range(20, 30):
        out, cache = m.step(ids[:, t:t + 1], cache)
        parts.append(out)
    out, cache = m.step(ids[:, 30:], cache)
    parts.append(out)
    inc = np.concatenate(parts, axis=1)
    assert inc.shape == full.shape and np.abs(inc - full).max() < 1e-4
    assert cache[0].shape == (2, 2, 60, 16)


def test_greedy_generation_matches_transformers(kv, hf, text_ids):
    m = OnnxModel(kv[0], threads=1)
    prompt = text_ids[:12]
    got = list(m.generate(prompt.tolist(), 24))
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(prompt[None]), max_new_tokens=24, do_sample=False,
                           pad_token_id=0)[0, 12:].tolist()
    assert got == want
    assert list(m.generate(prompt.tolist(), 24, stop_ids=[got[3]]))[-1] == got[3]


def test_sampling_is_seeded_and_respects_top_k():
    logits = np.array([0.0, 5.0, 4.9, -3.0, 4.8])
    rng = np.random.default_rng(0)
    assert sample_next(logits, Sampling(), rng) == 1
    draws = [sample_next(logits, Sampling(temperature=1.0, top_k=2), rng) for _ in range(200)]
    assert set(draws) == {1, 2}
    draws = [sample_next(logits, Sampling(temperature=1.0, top_p=0.5), rng) for _ in range(50)]
    assert set(draws) <= {1, 2}


def test_sampled_generation_is_reproducible(kv, text_ids):
    m = OnnxModel(kv[0], threads=1)
    s = Sampling(temperature=1.0, top_p=0.95, seed=3)
    a, b = list(m.generate(text_ids[:8].tolist(), 16, s)), list(m.generate(text_ids[:8].tolist(), 16, s))
    assert a == b and a != list(m.generate(text_ids[:8].tolist(), 16))


@pytest.mark.parametrize("kind,min_top1", [("int8", 0.95), ("int4", 0.6)])
def test_quantized_graphs_agree_with_fp32(kv, tmp_path, text_ids, kind, min_top1):
    from edgedistill.export.onnx_quant import quantize_onnx
    dst = tmp_path / f"model-{kind}.onnx"
    info = quantize_onnx(kv[0], dst, kind)
    assert info["quantized_matmuls"] == 4 * 7 + 1  # every projection and the (tied) output head
    assert info["bytes"] < kv[0].stat().st_size
    ref, q = OnnxModel(kv[0], threads=1), OnnxModel(dst, threads=1)
    assert q.has_cache
    top1 = float((ref.logits(text_ids).argmax(-1) == q.logits(text_ids).argmax(-1)).mean())
    assert top1 >= min_top1, top1
    assert len(list(q.generate(text_ids[:5].tolist(), 8))) == 8


def test_bad_quantization_inputs(tmp_path, kv):
    from edgedistill.export.onnx_quant import quantize_onnx
    with pytest.raises(ExportError, match="expected one of"):
        quantize_onnx(kv[0], tmp_path / "x.onnx", "int3")
    with pytest.raises(ExportError, match="does not exist"):
        quantize_onnx(tmp_path / "none.onnx", tmp_path / "x.onnx", "int8")


def test_export_cli(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from edgedistill.cli import app
    from edgedistill.export.cli import parse_target
    assert parse_target("gguf") == ("gguf", "f16") and parse_target("onnx") == ("onnx", "fp32")
    assert parse_target("GGUF:Q4_K_M") == ("gguf", "q4_k_m") and parse_target("onnx:int4") == ("onnx", "int4")
    for bad, msg in [("tflite", "gguf or onnx"), ("gguf:q3_k", "q4_k_m"), ("onnx:int2", "int8")]:
        with pytest.raises(ExportError, match=msg):
            parse_target(bad)
    r = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--to", "gguf:q8_0", "--out", str(tmp_path / "m.gguf")])
    assert r.exit_code == 0 and "GGUF q8_0" in r.output and (tmp_path / "m.gguf").is_file()
    r = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--to", "onnx:int8", "--out", str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "q.onnx"]
    assert OnnxModel(tmp_path / "q.onnx").has_cache
    r = CliRunner().invoke(app, ["export", str(tmp_path), "--to", "gguf", "--out", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "no config.json" in r.output


def test_onnx_serve_backend(kv, tiny_model_dir):
    from edgedistill.errors import ServeError
    from edgedistill.serve.backend import Prompt, generate
    from edgedistill.serve.events import SamplingParams
    from edgedistill.serve.onnx_backend import OnnxBackend
    b = OnnxBackend(kv[0], tiny_model_dir, n_ctx=256)
    user = Prompt(messages=({"role": "user", "content": "def add(a, b):"},))
    greedy = SamplingParams(max_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    text, fin = generate(b, user, greedy)
    assert fin.finish_reason in ("stop", "length") and fin.completion_tokens <= 6 and fin.prompt_tokens > 5
    assert (text, fin) == generate(b, user, greedy)
    sampled = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=4)
    assert generate(b, user, sampled) == generate(b, user, sampled)
    # A stop string cuts the text and never leaks into it.
    if len(text) > 2:
        cut, fin2 = generate(b, user, SamplingParams(max_tokens=6, temperature=0.0, seed=0, stop=(text[1:3],)))
        assert cut == text[:text.find(text[1:3])] and fin2.finish_reason == "stop"
    with pytest.raises(ServeError, match="context window"):
        b.start(Prompt(messages=({"role": "user", "content": "x " * 400},)), greedy, lambda ev: None)
    b.close()
