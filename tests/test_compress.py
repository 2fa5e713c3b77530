"""compress/: the OBS engine (SparseGPT, GPTQ on GGUF grids, joint), layer-wise calibration, bad input."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from edgedistill.compress.grids import BLOCK, dequantize, quantize
from edgedistill.compress.methods import ObsConfig, obs_compress
from edgedistill.compress.obs import Pruning, compress_weight, inverse_cholesky, reconstruction_error
from edgedistill.errors import CompressError


def correlated_problem(rows=96, cols=256, n=1024, seed=0):
    """A weight and the Hessian of strongly correlated inputs (where OBS compensation matters)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.2 + torch.randn(n, cols, generator=g)
    X[:, 5] = 0.0  # one dead input
    return torch.randn(rows, cols, generator=g), 2 * X.T @ X / n


@pytest.fixture(scope="module")
def calib(tiny_tokenizer) -> list[list[int]]:
    from edgedistill.data.text import load_corpus
    from edgedistill.data.tokens import token_stream, windows
    corpus = load_corpus("stdlib", max_chars=60_000, heldout_fraction=0.1, seed=3)
    return windows(token_stream(tiny_tokenizer, corpus.train, 8 * 64), 64, 8)


def _tiny(model_dir):
    from edgedistill.models import load_causal_lm
    return load_causal_lm(str(model_dir))


def _block_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


# ---------------------------------------------------------------- masks
def test_unstructured_mask_is_exact_per_linear_and_block():
    W, H = correlated_problem(rows=96, cols=320)
    segments = [(0, 64), (64, 96)]  # two linears stacked on one Hessian keep their own masks
    res, err = compress_weight(W, H, "x", pruning=Pruning(sparsity=0.5), segments=segments)
    for r0, r1 in segments:
        for c0 in range(0, 320, 128):
            blk = res.mask[r0:r1, c0:c0 + 128]
            assert int(blk.sum()) == blk.numel() // 2
    assert torch.equal(res.mask, res.weight == 0) or (res.weight[res.mask] == 0).all()
    assert 0 < err < 0.5


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_every_group(n, m):
    W, H = correlated_problem(cols=256)
    res, _ = compress_weight(W, H, "x", pruning=Pruning(n=n, m=m))
    groups = res.mask.reshape(W.shape[0], -1, m).sum(-1)
    assert (groups == n).all()
    assert (res.weight[res.mask] == 0).all()


def test_sparsegpt_beats_magnitude_pruning():
    W, H = correlated_problem()
    res, err = compress_weight(W, H, "x", pruning=Pruning(sparsity=0.5))
    thresh = W.abs().flatten().kthvalue(W.numel() // 2).values
    magnitude = torch.where(W.abs() <= thresh, 0.0, W)
    assert err < 0.8 * reconstruction_error(W, magnitude, H)


# ---------------------------------------------------------------- GPTQ
@pytest.mark.parametrize("grid", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_error_not_above_rtn(grid, act_order):
    W, H = correlated_problem(cols=256)
    W[:, 5] = 0.0  # a dead input's weights are dropped by GPTQ; keep RTN comparable
    res, err = compress_weight(W, H, "x", grid=grid, act_order=act_order)
    rtn = reconstruction_error(W, dequantize(quantize(W, grid)), H)
    assert err <= rtn, (err, rtn)
    assert torch.equal(dequantize(res.codes), res.weight)  # the weight is exactly what the codes decode to


def test_joint_sparsity_and_quantization():
    W, H = correlated_problem(cols=256)
    res, err = compress_weight(W, H, "x", grid="q4_0", pruning=Pruning(n=2, m=4))
    assert (res.mask.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()
    assert torch.equal(dequantize(res.codes), res.weight)
    assert (res.codes.codes[res.mask] == 0).all() and (res.weight[res.mask] == 0).all()


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("d", [48, 600, 1100])
def test_hessian_accumulator_matches_2xxt(d, native):
    from edgedistill.compress.obs import HessianAccumulator
    x = torch.randn(3, 200, d, dtype=torch.float64)
    acc = HessianAccumulator(d, "cpu", native=native)
    acc.add(x[0].to(torch.bfloat16))
    acc.add(x[1:].to(torch.bfloat16))
    xb = x.to(torch.bfloat16).double().reshape(-1, d)
    ref = 2 * xb.T @ xb / 600
    assert acc.H.dtype == torch.float32 and acc.tokens == 600
    assert torch.allclose(acc.H.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    assert torch.allclose(acc.H, acc.H.T, rtol=0, atol=1e-6 * ref.abs().max().item())


def _gram_kernel_or_skip():
    from edgedistill.compress.gram import cpu_has_bf16_dot, gram_kernel
    if not cpu_has_bf16_dot():
        pytest.skip("this CPU has no AVX-512 BF16: Hessians take the torch path (tested above)")
    fn = gram_kernel()
    assert fn is not None, "the CPU has AVX-512 BF16 but the bf16 Hessian kernel did not build or failed its check"
    return fn


@pytest.mark.parametrize("n,d,threads", [(1, 5, 1), (2, 16, 2), (101, 70, 2), (257, 200, 3), (1000, 97, 1),
                                         (3, 130, 4)])
def test_gram_bf16_kernel_matches_float64(n, d, threads):
    """Odd row counts (a zero partner row), features off the 16/48-wide tiles, more threads than row pairs; both
    triangles written; beta scales the previous value."""
    from edgedistill.compress.gram import gram_bf16_
    _gram_kernel_or_skip()
    g = torch.Generator().manual_seed(n * d)
    x = (torch.randn(n, d, generator=g) * torch.rand(d, generator=g) * 5).to(torch.bfloat16)
    ref = x.double().T @ x.double()
    out = torch.full((d, d), float("nan"))
    assert gram_bf16_(out, x, 2.0, 0.0, threads)  # beta 0: the NaNs are not read
    tol = 1e-6 * ref.abs().max().item() + 1e-30
    assert torch.allclose(out.double(), 2 * ref, rtol=0, atol=2 * tol)
    assert torch.equal(out, out.T)
    assert gram_bf16_(out, x, 1.0, 0.5, threads)
    assert torch.allclose(out.double(), 2 * ref, rtol=0, atol=3 * tol)


def test_gram_bf16_strided_input_and_mixed_paths():
    """A column slice of a wider tensor (row stride ≠ features), and a Hessian fed once by the kernel (bf16) and
    once by the torch path (fp32 input) sums both."""
    from edgedistill.compress.gram import gram_bf16_
    from edgedistill.compress.obs import HessianAccumulator
    _gram_kernel_or_skip()
    wide = torch.randn(300, 120).to(torch.bfloat16)
    x = wide[:, 10:90]
    out = torch.zeros(80, 80)
    assert gram_bf16_(out, x, 1.0, 0.0)
    ref = x.double().T @ x.double()
    assert torch.allclose(out.double(), ref, rtol=0, atol=1e-6 * ref.abs().max().item())
    acc = HessianAccumulator(80, "cpu")
    acc.add(x[:100])                # kernel
    acc.add(x[100:].float())        # torch panels
    assert torch.allclose(acc.H.double(), 2 * ref / 300, rtol=0, atol=1e-6 * ref.abs().max().item())
    assert torch.equal(acc.H, acc.H.T)


def test_gram_bf16_kernel_off_switch_and_missing_compiler(tmp_path, monkeypatch):
    """EDGEDISTILL_NATIVE=0, or no working C compiler: no kernel, no exception (the torch path serves); a built
    kernel is reused from the cache."""
    from edgedistill.compress import gram
    _gram_kernel_or_skip()
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path))
    monkeypatch.setenv("EDGEDISTILL_NATIVE", "0")
    assert gram._load() is None
    monkeypatch.setenv("EDGEDISTILL_NATIVE", "1")
    monkeypatch.setenv("CC", "false")
    assert gram._load() is None and not list(tmp_path.rglob("*.so"))
    monkeypatch.delenv("CC")
    assert gram._load() is not None
    built = list(tmp_path.rglob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert gram._load() is not None and built[0].stat().st_mtime_ns == stamp


def test_dead_inputs_and_damp_escalation(caplog):
    H = torch.eye(64)
    H[3, 3] = 0.0                  # dead input: handled, not an error
    H[10, 10] = -0.05              # indefinite until dampening reaches 0.1 × mean diagonal
    with caplog.at_level(logging.WARNING, logger="edgedistill.compress"):
        U, dead = inverse_cholesky(H, 0.01, "layers.7.mlp.down_proj")
    assert dead.tolist().count(True) == 1 and bool(dead[3])
    assert torch.isfinite(U).all()
    assert any("layers.7.mlp.down_proj" in r.message and "Cholesky failed" in r.message for r in caplog.records)


def test_cholesky_failure_names_the_layer():
    with pytest.raises(CompressError, match="layers.3.self_attn.q_proj.*not positive definite"):
        inverse_cholesky(-torch.eye(16), 0.01, "layers.3.self_attn.q_proj")


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    ({"pruning": Pruning(sparsity=1.5)}, r"layer 'L'.*sparsity 1.5 must lie in \(0, 1\)"),
    ({"pruning": Pruning(sparsity=0.0 + 1e-9 - 1e-9 - 0.1)}, r"sparsity .* must lie in \(0, 1\)"),
    ({"pruning": Pruning(n=3, m=2)}, r"layer 'L'.*N:M pattern 3:2"),
    ({"grid": "q3_k"}, r"layer 'L'.*unknown grid 'q3_k'"),
    ({"grid": "q4_1", "pruning": Pruning(sparsity=0.5)}, r"layer 'L'.*exact zero"),
    ({}, r"layer 'L'.*nothing to do"),
])
def test_bad_arguments_name_the_layer(kwargs, match):
    W, H = correlated_problem(rows=8, cols=64)
    with pytest.raises(CompressError, match=match):
        compress_weight(W, H, "L", **kwargs)


def test_nm_must_divide_columns():
    W, H = torch.randn(8, 30), torch.eye(30)
    with pytest.raises(CompressError, match=r"layer 'L'.*multiple of 4"):
        compress_weight(W, H, "L", pruning=Pruning(n=2, m=4))


def test_model_without_block_list():
    with pytest.raises(CompressError, match="no block list"):
        obs_compress(torch.nn.Sequential(torch.nn.Linear(4, 4)), [[1, 2]], ObsConfig(sparsity=0.5))


def test_unsupported_module_is_named(calib):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=1024, n_positions=128)).eval()
    with pytest.raises(CompressError, match=r"layer 'layers.0.attn.c_attn' is a Conv1D"):
        obs_compress(model, calib[:2], ObsConfig(sparsity=0.5))


@pytest.mark.parametrize("cfg,match", [
    (ObsConfig(sparsity=1.0), r"compress.sparsity = 1.0"),
    (ObsConfig(pattern="4:2"), r"compress.pattern = '4:2'"),
    (ObsConfig(grid="q5_0"), r"compress.grid = 'q5_0'"),
])
def test_bad_config_names_the_field(tiny_model_dir, calib, cfg, match):
    with pytest.raises(CompressError, match=match):
        obs_compress(_tiny(tiny_model_dir), calib, cfg)


# ---------------------------------------------------------------- whole model, layer-wise
def test_sparsegpt_whole_model_masks_and_quality(tiny_model_dir, calib):
    model = _tiny(tiny_model_dir)
    codes, metrics = obs_compress(model, calib, ObsConfig(pattern="2:4", batch_size=4))
    assert codes == {}
    linears = _block_linears(model)
    assert len(metrics["layers"]) == len(linears) == 4 * 7
    for name, mod in linears.items():
        zero = (mod.weight == 0).reshape(mod.out_features, -1, 4).sum(-1)
        assert (zero >= 2).all(), name  # every group of 4 has (at least; exact zeros may add) 2 zeros
        assert metrics["layers"][name.removeprefix("model.")]["rel_error"] < 1.0
    assert metrics["block_linear_sparsity"] >= 0.5


@pytest.mark.parametrize("grid", ["q8_0", "q4_0", "q4_1"])
def test_gptq_codes_round_trip_into_gguf(tmp_path, tiny_model_dir, tiny_tokenizer, calib, grid):
    gguf = pytest.importorskip("gguf")
    from edgedistill.export.gguf import permute_rows, write_gguf

    model = _tiny(tiny_model_dir)
    codes, metrics = obs_compress(model, calib, ObsConfig(grid=grid, batch_size=4))
    assert len(codes) == 4 * 7 and all(c.grid == grid for c in codes.values())
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    write_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype=grid, codes=codes)
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for hf_name, qc in codes.items():
        _, _, i, *rest = hf_name.split(".")
        short = names[".".join(rest[:-1])]
        t = tensors[f"blk.{i}.{short}.weight"]
        assert t.tensor_type.name == grid.upper()
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(qc.codes.shape)
        want = dequantize(qc).numpy()
        if short in heads:
            want = permute_rows(want, heads[short])
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), hf_name
        weight = dict(model.named_parameters())[hf_name].detach().numpy()
        assert np.array_equal(dequantize(qc).numpy(), weight)  # torch evaluates exactly what the file holds
    assert metrics["max_rel_error"] < 0.2
    assert BLOCK == 32


# ---------------------------------------------------------------- structured
def test_structured_pruning_gives_a_smaller_model_that_exports(tmp_path, tiny_model_dir, tiny_tokenizer, calib):
    pytest.importorskip("llama_cpp")
    from edgedistill.compress.structured import structured_prune
    from edgedistill.export.gguf import write_gguf
    from edgedistill.export.llamacpp import LlamaCppModel
    from edgedistill.models import load_causal_lm

    model = _tiny(tiny_model_dir)
    before = sum(p.numel() for p in model.parameters())
    model, metrics = structured_prune(model, calib, ffn_sparsity=0.5, heads_sparsity=0.5, batch_size=4)
    model.save_pretrained(tmp_path / "s")
    tiny_tokenizer.save_pretrained(tmp_path / "s")
    small = load_causal_lm(str(tmp_path / "s"))
    cfg = small.config
    assert (cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim) == (64, 1, 2, 16)
    assert sum(p.numel() for p in small.parameters()) == metrics["params_after"] < before
    assert all(m["rel_error"] < 1.0 for m in metrics["layers"].values())
    ids = calib[0]
    with torch.no_grad():
        ref = small(torch.tensor([ids])).logits[0].numpy()
        pruned_in_memory = model(torch.tensor([ids])).logits[0].numpy()
    assert np.allclose(ref, pruned_in_memory, atol=1e-4)
    write_gguf(tmp_path / "s", tmp_path / "s.gguf", dtype="f32")
    with LlamaCppModel(tmp_path / "s.gguf", n_ctx=128, kv_type="f32") as lm:
        got = lm.logits(ids)
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_structured_beats_dropping_without_compensation(tiny_model_dir, calib):
    """The OBS update must help: same neurons removed, compensated vs. just cut."""
    from edgedistill.compress.obs import remove_column_groups
    W, H = correlated_problem(rows=64, cols=128)
    kept, Wc, err = remove_column_groups(W, H, torch.arange(128).unsqueeze(1), 64, "L")
    cut = W.clone()
    cut[:, [j for j in range(128) if j not in kept]] = 0.0
    cut[:, 5] = 0.0
    assert len(kept) == 64 and err < reconstruction_error(W, cut, H)


# ---------------------------------------------------------------- recipe and CLI
def test_recipe_rejects_bad_compress_fields():
    from edgedistill.errors import RecipeError
    from edgedistill.recipe import parse_recipe
    with pytest.raises(RecipeError, match="compress.sparsity"):
        parse_recipe({"compress": {"method": "sparsegpt", "sparsity": 1.5}})
    with pytest.raises(RecipeError, match="compress.pattern"):
        parse_recipe({"compress": {"method": "sparsegpt", "pattern": "half"}})
    with pytest.raises(RecipeError, match="compress.method"):
        parse_recipe({"compress": {"method": "awq"}})
    with pytest.raises(RecipeError, match="compress.grid is q4_0 but export.gguf"):
        parse_recipe({"compress": {"method": "gptq"}})
    with pytest.raises(RecipeError, match="exact zero|q4_1"):
        parse_recipe({"compress": {"method": "sparsegpt", "grid": "q4_1"}, "export": {"gguf": ["q4_1"]}})
    assert parse_recipe({"compress": {"method": "gptq"}, "export": {"gguf": ["q4_0"]}}).compress.grid == "q4_0"
    assert parse_recipe({}).compress.method == "q8_0"


def test_cli_compress_structured(tmp_path, tiny_model_dir):
    import json

    from typer.testing import CliRunner

    from edgedistill.cli import app
    res = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "structured", "--sparsity", "0.5",
                                   "--calib-windows", "4", "--calib-seq-len", "64", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "c" / "compress_metrics.json").read_text())
    assert metrics["params"] < metrics["params_before"] and metrics["ffn_kept"] == 64
    assert metrics["ppl_after"] > 1.0 and metrics["ppl_before"] > 1.0
    assert (tmp_path / "c" / "model" / "config.json").is_file()
    bad = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "sparsegpt", "--pattern", "4:2",
                                   "--calib-windows", "2", "--calib-seq-len", "64", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "4:2" in bad.output


def test_batched_and_looped_pruning_solves_agree():
    """The GPU path (one batched triangular solve per sub-block) equals the CPU path (forward substitution)."""
    from edgedistill.compress.obs import inverse_cholesky, sweep
    W, H = correlated_problem(rows=64, cols=192)
    U, _ = inverse_cholesky(H, 0.01, "x")
    for pruning in (Pruning(sparsity=0.5), Pruning(n=2, m=4)):
        a = sweep(W, U, pruning=pruning, batched_solve=True, nm_tables=False)
        b = sweep(W, U, pruning=pruning, batched_solve=False, nm_tables=False)
        assert torch.equal(a.mask, b.mask)
        assert torch.allclose(a.weight, b.weight, atol=1e-4 * W.abs().max().item())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2), (1, 4)])
def test_nm_closed_form_group_solves_equal_the_column_loop(n, m):
    """The N:M fast path (per-group solve tables, the code a GPU replays from a CUDA graph) picks the same masks
    as the sequential sub-block loop and leaves the same weights, across several outer blocks (cols > 128,
    and a partial last block)."""
    from edgedistill.compress.obs import _nm_sweep, inverse_cholesky, sweep
    W, H = correlated_problem(rows=48, cols=328 - 328 % m)
    U, _ = inverse_cholesky(H, 0.01, "x")
    fast = sweep(W, U, pruning=Pruning(n=n, m=m))
    loop = sweep(W, U, pruning=Pruning(n=n, m=m), nm_tables=False, batched_solve=False)
    assert torch.equal(fast.mask, loop.mask)
    assert torch.allclose(fast.weight, loop.weight, atol=1e-4 * W.abs().max().item())
    groups = fast.mask.reshape(48, -1, m).sum(-1)
    assert bool((groups == n).all()) and bool((fast.weight[fast.mask] == 0).all())
    # through the graph wrapper's static buffers (ops replayed eagerly: no GPU here), the same mask and weights
    from edgedistill.compress.obs import _GraphedNMBlock
    Wt = W.T.float().contiguous()
    Wt[:, :] -= Wt.mean()  # any change of values must flow through the buffers, not be baked into them
    direct, via = Wt.clone(), Wt.clone()
    wrapper = _GraphedNMBlock(replay="eager")
    mask_direct = _nm_sweep(direct, U, n, m, 128)
    mask_via = _nm_sweep(via, U, n, m, 128, wrapper)
    assert len(wrapper._runners) == 2  # one per block shape: 128 columns, and the partial last block
    assert torch.equal(mask_direct, mask_via)
    assert torch.allclose(direct, via, atol=1e-5 * W.abs().max().item())  # contiguous U copy: other BLAS rounding


# ---------------------------------------------------------------- OWL per-block sparsity
def test_owl_profile_mean_bounds_and_order():
    from edgedistill.compress.owl import owl_profile
    ratios = [0.010, 0.050, 0.020, 0.030, 0.010]
    s = owl_profile(ratios, 0.5, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.5, abs=1e-12)
    assert all(0.42 - 1e-12 <= x <= 0.58 + 1e-12 for x in s) and min(s) == pytest.approx(0.42)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)  # more outliers → less sparsity
    assert owl_profile([0.02] * 3, 0.6, 0.1) == [0.6] * 3
    with pytest.raises(CompressError, match="owl_lambda"):
        owl_profile(ratios, 0.9, 0.2)


def test_owl_whole_model_spares_the_block_with_outliers(tiny_model_dir, calib):
    model = _tiny(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make block 2 hold many outlier weights: 3% of each of its linears scaled ×40
        for mod in model.model.layers[2].modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.view(-1)
                w[torch.randperm(w.numel(), generator=g)[: w.numel() * 3 // 100]] *= 40.0
    _, metrics = obs_compress(model, calib, ObsConfig(sparsity=0.5, sparsity_profile="owl", owl_lambda=0.1,
                                                      device="cpu"))
    prof = metrics["sparsity_profile"]
    ratios, planned = prof["outlier_ratios"], prof["block_sparsity"]
    assert max(range(4), key=lambda i: ratios[i]) == 2 and min(range(4), key=lambda i: planned[i]) == 2
    assert sum(planned) / 4 == pytest.approx(0.5, abs=1e-9)
    actual = []
    for blk in model.model.layers:
        ws = [m.weight for m in blk.modules() if isinstance(m, torch.nn.Linear)]
        actual.append(sum(int((x == 0).sum()) for x in ws) / sum(x.numel() for x in ws))
    assert actual == pytest.approx(planned, abs=2e-3)  # each block pruned to its own target
    assert sum(actual) / 4 == pytest.approx(0.5, abs=2e-3)
    assert actual[2] == min(actual) and actual[2] < 0.5 - 0.05


def test_owl_bad_input_names_the_field(tiny_model_dir, calib):
    from edgedistill.errors import RecipeError
    from edgedistill.recipe import parse_recipe
    with pytest.raises(RecipeError, match="sparsity_profile 'owl' needs method 'sparsegpt' with pattern"):
        parse_recipe({"compress": {"method": "sparsegpt", "pattern": "2:4", "sparsity_profile": "owl"}})
    with pytest.raises(RecipeError, match="owl_lambda"):
        parse_recipe({"compress": {"method": "sparsegpt", "sparsity": 0.9, "owl_lambda": 0.2,
                                   "sparsity_profile": "owl"}})
    assert parse_recipe({"compress": {"method": "sparsegpt", "sparsity_profile": "owl"}}).compress.owl_threshold == 5.0
    with pytest.raises(CompressError, match="needs compress.pattern 'unstructured'"):
        obs_compress(_tiny(tiny_model_dir), calib, ObsConfig(pattern="2:4", sparsity_profile="owl", device="cpu"))


def test_cli_compress_owl(tmp_path, tiny_model_dir):
    import json

    from typer.testing import CliRunner

    from edgedistill.cli import app
    res = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--method", "sparsegpt", "--sparsity", "0.5",
                                   "--sparsity-profile", "owl", "--owl-lambda", "0.1", "--owl-threshold", "4",
                                   "--calib-windows", "4", "--calib-seq-len", "64", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    prof = json.loads((tmp_path / "c" / "compress_metrics.json").read_text())["sparsity_profile"]
    assert prof["kind"] == "owl" and prof["threshold"] == 4.0 and prof["lambda"] == 0.1
    assert sum(prof["block_sparsity"]) / 4 == pytest.approx(0.5, abs=1e-9)


def test_qat_passthrough_checks_codes_against_weights(tmp_path, tiny_model_dir):
    from edgedistill.compress.rtn import save_codes
    from edgedistill.compress.stage import qat_passthrough
    from edgedistill.distill.qat import export_codes
    model = _tiny(tiny_model_dir)
    save_codes(export_codes(model, "q4_1"), tmp_path / "codes.safetensors")
    codes, metrics = qat_passthrough(model, tmp_path / "codes.safetensors")
    assert metrics["grid"] == "q4_1" and len(codes) == metrics["quantized_tensors"] > 0
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(CompressError, match="model.layers.1.mlp.up_proj.weight' differs"):
        qat_passthrough(model, tmp_path / "codes.safetensors")
    with pytest.raises(CompressError, match="does not exist"):
        qat_passthrough(model, tmp_path / "missing.safetensors")


def test_groups_compressed_side_by_side_match_one_by_one(tiny_model_dir, calib):
    """cpu_threads ≥ 2 runs a block's input groups concurrently, one thread each: same masks, same errors."""
    results = []
    for threads in (1, 2):
        model = _tiny(tiny_model_dir)
        _, metrics = obs_compress(model, calib, ObsConfig(sparsity=0.5, device="cpu", cpu_threads=threads,
                                                          forward_dtype="float32", one_pass=False))
        results.append((metrics, _block_linears(model)))
    (m1, lin1), (m2, lin2) = results
    assert m1["layers"].keys() == m2["layers"].keys() and len(m1["layers"]) == 28
    for name in m1["layers"]:
        assert m2["layers"][name]["rel_error"] == pytest.approx(m1["layers"][name]["rel_error"], rel=0.02, abs=1e-5)
    for name in lin1:
        assert ((lin1[name].weight == 0) != (lin2[name].weight == 0)).float().mean() < 0.01, name
    assert torch.get_num_threads() >= 1


def test_one_pass_compresses_each_group_on_the_inputs_the_compressed_block_makes(tiny_model_dir, calib):
    """One pass ("true sequential", the CPU default): o_proj is compressed on the Hessian of what the already
    compressed q/k/v produce — checked against doing exactly that by hand — and the block's output that feeds
    the next block is the compressed block's."""
    from edgedistill.compress.layerwise import capture_block_inputs
    from edgedistill.compress.obs import HessianAccumulator, Pruning, compress_weight
    cfg = dict(sparsity=0.5, device="cpu", forward_dtype="float32")
    one = _tiny(tiny_model_dir)
    _, m1 = obs_compress(one, calib, ObsConfig(**cfg, one_pass=True))
    two = _tiny(tiny_model_dir)
    _, m2 = obs_compress(two, calib, ObsConfig(**cfg, one_pass=False))
    assert m1["one_pass"] and "one_pass" not in m2 and m1["layers"].keys() == m2["layers"].keys()
    assert m1["block_linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    l1, l2 = _block_linears(one), _block_linears(two)
    attn = "model.layers.0.self_attn."
    for n in ("q_proj", "k_proj", "v_proj"):  # both read the embeddings: the same Hessian up to summation order
        assert ((l1[attn + n].weight == 0) != (l2[attn + n].weight == 0)).float().mean() < 0.01
    # By hand: block 0 with one-pass's q/k/v, its o_proj input's Hessian, the same OBS solve.
    ref = _tiny(tiny_model_dir)
    block = ref.model.layers[0]
    for n in ("q_proj", "k_proj", "v_proj"):
        getattr(block.self_attn, n).weight.data.copy_(l1[attn + n].weight)
    inputs = capture_block_inputs(ref, calib, len(calib), torch.device("cpu"), torch.float32)
    acc = HessianAccumulator(block.self_attn.o_proj.in_features, "cpu")
    h = block.self_attn.o_proj.register_forward_pre_hook(lambda mod, args: acc.add(args[0]))
    with torch.no_grad():
        block(inputs.hidden[0], **inputs.kwargs[0])
    h.remove()
    res, _ = compress_weight(block.self_attn.o_proj.weight.data.float(), acc.H, "o_proj", pruning=Pruning(sparsity=0.5),
                             damp=0.01, segments=[(0, block.self_attn.o_proj.out_features)])
    assert torch.allclose(res.weight, l1[attn + "o_proj"].weight, atol=1e-5)
    assert not torch.allclose(l2[attn + "o_proj"].weight, l1[attn + "o_proj"].weight, atol=1e-3)


def test_one_pass_gptq_codes_and_sparsegpt_nm(tiny_model_dir, calib):
    """The one-pass path serves every shape-keeping method: GPTQ codes equal the weights they replace, 2:4 masks."""
    from edgedistill.compress.grids import dequantize
    model = _tiny(tiny_model_dir)
    codes, _ = obs_compress(model, calib, ObsConfig(grid="q4_0", one_pass=True))
    lin = _block_linears(model)
    assert len(codes) == len(lin)
    for name, c in codes.items():
        assert torch.equal(dequantize(c).to(lin[name.removesuffix(".weight")].weight.dtype),
                           lin[name.removesuffix(".weight")].weight.data), name
    model = _tiny(tiny_model_dir)
    obs_compress(model, calib, ObsConfig(pattern="2:4", one_pass=True))
    for name, mod in _block_linears(model).items():
        assert ((mod.weight == 0).reshape(mod.out_features, -1, 4).sum(-1) >= 2).all(), name


def test_pruned_errors_loop_is_the_textbook_forward_substitution():
    """The two-ops-per-column loop gives bit for bit what the column loop of the paper gives."""
    from edgedistill.compress.obs import _pruned_errors
    g = torch.Generator().manual_seed(3)
    A = torch.randn(16, 16, generator=g)
    U = torch.linalg.cholesky(torch.linalg.inv(A @ A.T + 16 * torch.eye(16)), upper=True)
    W = torch.randn(16, 300, generator=g)
    mask = torch.rand(16, 300, generator=g) < 0.5
    R, E, m = W.clone(), torch.empty_like(W), mask.to(W.dtype)
    for c in range(16):  # the loop as it was written before (and as the paper reads)
        torch.mul(R[c], m[c], out=E[c]).div_(U[c, c])
        R[c + 1:].addr_(U[c, c + 1:], E[c], alpha=-1.0)
    out = _pruned_errors(W, U, mask, batched=False)
    assert torch.equal(out, E) and torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    torch.testing.assert_close(_pruned_errors(W, U, mask, batched=True), E, rtol=1e-5, atol=1e-6)


def test_calibration_attention_in_query_blocks_matches_sdpa_and_restores_the_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgedistill.compress.attention import NAME, QUERY_BLOCK, calibration_attention
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=6, num_key_value_heads=2, attn_implementation="sdpa"))
    block = model.model.layers[0]
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])
    h = block.register_forward_pre_hook(grab, with_kwargs=True)
    ids = torch.randint(0, 128, (2, 2 * QUERY_BLOCK + 37))  # a ragged last query block
    model(input_ids=ids, use_cache=False)
    h.remove()
    hidden = seen.pop("hidden")
    seen.pop("hidden_states", None)
    with torch.no_grad():
        ref = block(hidden, **seen)
        with calibration_attention(block):
            assert model.config._attn_implementation == NAME
            out = block(hidden, **seen)
            # a padding mask is not plain causal attention: transformers' own SDPA path takes it
            mask = torch.zeros(2, 1, ids.shape[1], ids.shape[1])
            mask[:, :, :, :5] = float("-inf")
            mask = mask + torch.full_like(mask, float("-inf")).triu(1)
            mask[:, :, :5, 0] = 0.0  # no fully masked rows
            masked = block(hidden, **{**seen, "attention_mask": mask})
        assert model.config._attn_implementation == "sdpa"
        masked_ref = block(hidden, **{**seen, "attention_mask": mask})
    ref, out = (x[0] if isinstance(x, tuple) else x for x in (ref, out))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    masked, masked_ref = (x[0] if isinstance(x, tuple) else x for x in (masked, masked_ref))
    torch.testing.assert_close(masked, masked_ref)


@pytest.mark.parametrize("n", [100, 576, 1000])
def test_lower_inverse_by_halves(n):
    from edgedistill.compress.obs import lower_inverse
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(A @ A.T / n + torch.eye(n, dtype=torch.float64))
    inv = lower_inverse(L.float(), leaf=128)
    assert torch.equal(inv, torch.tril(inv))
    torch.testing.assert_close(inv.double(), torch.linalg.inv(L), rtol=1e-4, atol=1e-5)


def test_compiled_column_loop_equals_the_torch_sub_block_loop():
    """CPU unstructured sweeps run each outer block's column loop through numba; the torch sub-block loop (the
    fallback without numba) gives the same masks and weights up to rounding."""
    from edgedistill.compress.obs import _pruned_block_kernel, inverse_cholesky, reconstruction_error, sweep
    assert _pruned_block_kernel() is not None  # numba is a dependency: the fast path is what runs here
    W, H = correlated_problem(rows=96, cols=320)
    U, _ = inverse_cholesky(H, 0.01, "x")
    segments = [(0, 32), (32, 96)]
    a = sweep(W, U, pruning=Pruning(sparsity=0.5), segments=segments, jit=True)
    b = sweep(W, U, pruning=Pruning(sparsity=0.5), segments=segments, jit=False)
    assert (a.mask == b.mask).float().mean() > 0.999
    for r0, r1 in segments:  # exactly half of each linear's slice of every outer block
        assert a.mask[r0:r1, :128].sum() == (r1 - r0) * 64
    assert torch.allclose(a.weight, b.weight, atol=1e-4 * W.abs().max().item())
    ea, eb = reconstruction_error(W, a.weight, H), reconstruction_error(W, b.weight, H)
    assert abs(ea - eb) <= 1e-3 * eb


def test_calibration_rms_norm_in_one_pass_matches_transformers_and_keeps_other_formulas():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from edgedistill.compress.rmsnorm import _CHECKED, calibration_rms_norms

    class OffsetRMSNorm(LlamaRMSNorm):  # Gemma's form, weight applied as (1 + w): not the formula the kernel computes
        def forward(self, hidden_states):
            h = hidden_states.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (h * (1.0 + self.weight.float())).to(hidden_states.dtype)

    torch.manual_seed(0)
    block = torch.nn.ModuleDict({"a": LlamaRMSNorm(160, eps=1e-5), "b": OffsetRMSNorm(160, eps=1e-5)})
    for m in block.values():
        m.weight.data = torch.rand(160) + 0.5
    block = block.to(torch.bfloat16)
    x = (torch.randn(4, 300, 160) * 3).to(torch.bfloat16)
    _CHECKED.clear()
    with torch.no_grad():
        ref = {k: m(x) for k, m in block.items()}
        with calibration_rms_norms(block):
            assert all("forward" in vars(m) for m in block.values())
            out = {k: m(x) for k, m in block.items()}
            out2 = {k: m(x) for k, m in block.items()}  # after the class check
        assert all("forward" not in vars(m) for m in block.values())
    for o in (out, out2):
        d = (o["a"].float() - ref["a"].float()).abs()
        assert (d == 0).float().mean() > 0.999 and d.max() <= 2 ** -7 * ref["a"].float().abs().max()
        assert torch.equal(o["b"], ref["b"])  # the other formula ran through its own forward
    assert _CHECKED[LlamaRMSNorm] is True and _CHECKED[OffsetRMSNorm] is False


def test_radix_select_mask_equals_topk():
    from edgedistill.compress.obs import _unstructured_mask
    g = torch.Generator().manual_seed(5)
    Wt = torch.randn(128, 200, generator=g)  # an outer block of Wᵀ: [columns, rows]
    Wt[7] = 0.0  # a dead input: 200 tied zero scores, all among the lowest
    d = torch.rand(128, generator=g) + 0.1
    for segments, sparsity in (([(0, 200)], 0.5), ([(0, 64), (64, 200)], 0.7), ([(0, 200)], 0.001)):
        a = _unstructured_mask(Wt.T, d, sparsity, segments, jit=True)
        b = _unstructured_mask(Wt.T, d, sparsity, segments, jit=False)
        for r0, r1 in segments:
            assert int(a[r0:r1].sum()) == int(b[r0:r1].sum()) == int(128 * (r1 - r0) * sparsity)
        if sparsity > 0.01:
            assert torch.equal(a, b)
        else:  # fewer than the 200 tied zeros: any of them is right
            assert bool((Wt.T[a] == 0).all())


def test_numba_kernels_built_once_when_two_sweeps_start_together():
    """Two groups' sweeps start side by side on threads; their first use of the kernels must not race (it did: one
    thread got the column loop where it asked for the selection)."""
    import threading

    from edgedistill.compress import obs
    obs._KERNELS.clear()
    got, start = [], threading.Barrier(4)

    def use(which):
        start.wait()
        got.append((which, (obs._select_kernel if which == "lowest" else obs._pruned_block_kernel)()))
    threads = [threading.Thread(target=use, args=(w,)) for w in ("lowest", "pruned_block") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(fn is obs._KERNELS[which] for which, fn in got)
    assert obs._KERNELS["lowest"] is not obs._KERNELS["pruned_block"]
