"""k-quants through llama.cpp's own quantizer, from our f32 GGUF; fallbacks listed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")

from edgedistill.export.gguf import write_gguf  # noqa: E402
from edgedistill.export.llamacpp import LlamaCppModel  # noqa: E402


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tiny_tokenizer):
    from conftest import make_tiny_llama
    # 256 columns: k-quant super-blocks fit, so llama.cpp keeps the nominal types.
    return make_tiny_llama(tmp_path_factory.mktemp("wide"), tiny_tokenizer, hidden=256, layers=2, heads=4,
                           kv_heads=2, ffn=512)


@pytest.mark.parametrize("dtype,main,min_corr", [("q6_k", "Q6_K", 0.99), ("q5_k_m", "Q5_K", 0.98),
                                                 ("q4_k_m", "Q4_K", 0.9)])
def test_kquants_load_and_track_torch(tmp_path, wide_model, dtype, main, min_corr):
    from transformers import AutoModelForCausalLM
    info = write_gguf(wide_model, tmp_path / f"m-{dtype}.gguf", dtype)
    assert info["quantizer"] == "llama.cpp" and info["type"] == dtype
    assert info["tensor_types"].get(main, 0) >= 4, info["tensor_types"]
    ids = list(range(3, 131))
    with LlamaCppModel(tmp_path / f"m-{dtype}.gguf", n_ctx=256) as lm:
        got = lm.logits(ids)
    model = AutoModelForCausalLM.from_pretrained(str(wide_model), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    corr = float(np.corrcoef(got.ravel(), ref.ravel())[0, 1])
    assert corr >= min_corr, corr


def test_kquant_fallbacks_are_listed(tmp_path, tiny_model_dir):
    info = write_gguf(tiny_model_dir, tmp_path / "narrow.gguf", "q4_k_m")  # 64 columns: no 256-wide super-blocks
    assert info["fallback"] and "Q4_K" not in info["tensor_types"]
    assert all(t in {"Q5_0", "Q8_0", "Q4_0", "Q5_1", "Q4_1", "F16", "F32"} for t in info["fallback"].values())
