"""Device profiles, fit arithmetic, the choice of file, and the devices build stage on a tiny model."""
from __future__ import annotations

import json

import pytest

from edgedistill.devices.fit import RUNTIMES, Candidate, ModelShape, choose, fit_candidate
from edgedistill.devices.profiles import DeviceProfile, known_devices, load_profile
from edgedistill.errors import DeviceError, RecipeError
from edgedistill.recipe import parse_recipe

SHIPPED = {"raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "android-phone-8gb", "iphone-15-pro", "laptop-x86-16gb", "host"}


def test_every_shipped_profile_loads():
    assert set(known_devices()) == SHIPPED
    for name in SHIPPED - {"host"}:
        p = load_profile(name)
        assert p.name == name and 0 < p.budget_gb <= p.ram_gb and p.memory_bandwidth_gbs > 0 and p.compute_gflops > 0
        assert set(p.runtimes) <= set(RUNTIMES) and p.runtimes["llama.cpp"]


def test_host_is_measured(monkeypatch):
    from edgedistill.devices import profiles
    monkeypatch.setattr(profiles, "measure_bandwidth", lambda: 12.5)
    monkeypatch.setattr(profiles, "measure_compute", lambda threads: 99.0)
    monkeypatch.setattr(profiles, "measure_decode_rates", lambda threads: {"q8_0": 2.5})
    profiles.measure_host.cache_clear()
    try:
        p = load_profile("host")
    finally:
        profiles.measure_host.cache_clear()
    assert p.memory_bandwidth_gbs == 12.5 and p.compute_gflops == 99.0 and p.decode_rates == {"q8_0": 2.5}
    assert 0 < p.budget_gb < p.ram_gb
    assert load_profile("host", measure=False).memory_bandwidth_gbs == 0


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(DeviceError, match="unknown device 'toaster'.*raspberry-pi-5-8gb"):
        load_profile("toaster")
    with pytest.raises(RecipeError, match="devices.targets.*toaster.*known devices"):
        parse_recipe({"devices": {"targets": ["host", "toaster"]}})


# ---------------------------------------------------------------- arithmetic
SHAPE = ModelShape.from_config({"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 512,
                                "num_hidden_layers": 10, "intermediate_size": 1536, "vocab_size": 32000,
                                "tie_word_embeddings": True})
PROFILE = DeviceProfile(name="test", ram_gb=4, budget_gb=1.0, memory_bandwidth_gbs=20.0, compute_gflops=100.0,
                        default_context=1024, min_decode_tps=5,
                        runtimes={"llama.cpp": ["f16", "q8_0", "q4_0"], "onnxruntime": ["fp32"]})


def test_shape_counts_parameters_like_torch():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shape = ModelShape.from_config(cfg.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.head_dim == 16 and not shape.tied


def test_fit_arithmetic_by_hand():
    c = Candidate("export/m-q8_0.gguf", "llama.cpp", "q8_0", file_bytes=300_000_000, weight_read_bytes=250_000_000)
    f = fit_candidate(c, SHAPE, PROFILE)
    kv_tok = 2 * 10 * 2 * 64 * 2                      # K and V, layers, kv heads, head_dim, f16
    assert f.kv_cache_mb == pytest.approx(kv_tok * 1024 / 1e6)
    act = 512 * (32000 + 1536 + 4 * 512) * 4          # one 512-token prefill chunk of fp32 activations
    assert f.overhead_mb == pytest.approx((RUNTIMES["llama.cpp"].overhead_bytes + act) / 1e6)
    assert f.total_mb == pytest.approx(300 + f.kv_cache_mb + f.overhead_mb)
    assert f.fits == (f.total_mb <= 1000) and f.supported
    matvec = 100e9 * RUNTIMES["llama.cpp"].matvec_efficiency
    assert f.decode_tps == pytest.approx(1 / (250e6 / 20e9 + 2 * SHAPE.matmul_params() / matvec))
    flops_full = 2 * SHAPE.matmul_params() + 4 * 10 * 8 * 64 * 1024
    assert f.decode_tps_full_context == pytest.approx(1 / ((250e6 + kv_tok * 1024) / 20e9 + flops_full / matvec))
    flops = 2 * SHAPE.matmul_params() + 4 * 10 * 8 * 64 * 256
    assert f.prefill_tps == pytest.approx(100e9 * RUNTIMES["llama.cpp"].prefill_efficiency / flops)
    # A longer context only costs KV cache.
    g = fit_candidate(c, SHAPE, PROFILE, context=4096)
    assert g.kv_cache_mb == pytest.approx(4 * f.kv_cache_mb) and g.total_mb > f.total_mb


def test_a_measured_decode_rate_replaces_bandwidth_and_gemm_for_its_type():
    measured = PROFILE.model_copy(update={"decode_rates": {"q4_0": 3.0}})
    q4 = Candidate("m-q4_0.gguf", "llama.cpp", "q4_0", 150_000_000, 140_000_000)
    kv_tok = 2 * 10 * 2 * 64 * 2
    f = fit_candidate(q4, SHAPE, measured)
    assert f.decode_tps == pytest.approx(3.0e9 / SHAPE.matmul_params())
    attention = 4 * 10 * 8 * 64 * 1024
    matvec = 100e9 * RUNTIMES["llama.cpp"].matvec_efficiency
    assert f.decode_tps_full_context == pytest.approx(
        1 / (SHAPE.matmul_params() / 3.0e9 + kv_tok * 1024 / 20e9 + attention / matvec))
    q8 = Candidate("m-q8_0.gguf", "llama.cpp", "q8_0", 250_000_000, 250_000_000)  # no rate: the formula
    assert fit_candidate(q8, SHAPE, measured).decode_tps == fit_candidate(q8, SHAPE, PROFILE).decode_tps


def test_host_decode_rates_come_from_llamacpp_on_a_synthetic_model():
    from edgedistill.devices.kernels import measure_decode_rates
    rates = measure_decode_rates(1, types=("q8_0",), tokens=4)
    assert set(rates) == {"q8_0"} and 0.05 < rates["q8_0"] < 500


def test_budget_and_support_decide_fit():
    big = Candidate("a.gguf", "llama.cpp", "f16", 900_000_000, 900_000_000)
    assert not fit_candidate(big, SHAPE, PROFILE).fits
    odd = Candidate("b.onnx", "onnxruntime", "int8", 10_000_000, 10_000_000)
    assert not fit_candidate(odd, SHAPE, PROFILE).supported


def _fit(path, fmt, size, ppl=None, tps_bytes=None):
    return fit_candidate(Candidate(path, "llama.cpp", fmt, size, tps_bytes or size, ppl), SHAPE, PROFILE)


def test_choice_prefers_the_fastest_of_equally_good_files():
    f16, q8, q4 = _fit("f16", "f16", 400e6, 10.00), _fit("q8", "q8_0", 200e6, 10.05), _fit("q4", "q4_0", 110e6, 11.0)
    assert choose([f16, q8, q4]).path == "q8"          # q4_0 is > 1% worse; q8_0 is within 1% and faster
    assert choose([f16, q8, q4], ppl_tolerance=0.2).path == "q4"
    assert choose([f16, q8, q4], ppl_tolerance=0.0).path == "f16"
    # Without perplexities: the most precise file that is fast enough.
    assert choose([_fit("f16", "f16", 400e6), _fit("q8", "q8_0", 200e6)]).path == "f16"
    slow = _fit("slow", "f16", 400e6, 10.0, tps_bytes=int(10e9))
    assert not slow.fast_enough and choose([slow, _fit("q8", "q8_0", 200e6, 10.5)]).path == "q8"
    assert choose([_fit("huge", "f16", 2e9, 10.0)]) is None


# ---------------------------------------------------------------- on a build folder
@pytest.fixture(scope="module")
def build_dir(tmp_path_factory, tiny_model_dir):
    """A minimal build folder: student + export stage with two GGUFs and eval perplexities."""
    import shutil

    from edgedistill.artifacts import file_record
    from edgedistill.export.gguf import write_gguf
    out = tmp_path_factory.mktemp("devbuild")
    shutil.copytree(tiny_model_dir, out / "student")
    outputs = []
    for t in ("f16", "q8_0"):
        p = out / "export" / f"student-{t}.gguf"
        p.parent.mkdir(exist_ok=True)
        write_gguf(out / "student", p, t)
        outputs.append(file_record(out, p))
    ppl = {"export/student-f16.gguf": 100.0, "export/student-q8_0.gguf": 100.5}
    (out / "manifest.json").write_text(json.dumps({"stages": {"export": {"outputs": outputs},
                                                              "eval": {"metrics": {"ppl": ppl}}}}))
    return out


def test_fit_build_and_place(build_dir):
    from edgedistill.devices.plan import fit_build, place_for_device
    rep = fit_build(build_dir, "raspberry-pi-5-8gb")
    assert rep["choice"]["path"] == "export/student-q8_0.gguf" and len(rep["fits"]) == 2
    assert rep["fits"][0]["format"] == "f16" and rep["fits"][1]["format"] == "q8_0"
    dest = place_for_device(build_dir, rep)
    assert sorted(p.name for p in dest.iterdir()) == ["device.json", "student-q8_0.gguf"]
    placed, src = dest / "student-q8_0.gguf", build_dir / "export/student-q8_0.gguf"
    assert placed.stat().st_ino == src.stat().st_ino or placed.read_bytes() == src.read_bytes()
    assert json.loads((dest / "device.json").read_text())["choice"]["path"] == rep["choice"]["path"]


def test_nothing_fits_names_every_file(build_dir):
    from edgedistill.devices.plan import fit_build
    tiny = PROFILE.model_copy(update={"budget_gb": 0.001})
    with pytest.raises(DeviceError, match="no exported file fits test.*student-f16.gguf.*needs .* MB"):
        fit_build(build_dir, tiny)


def test_cli_devices(build_dir):
    from typer.testing import CliRunner

    from edgedistill.cli import app
    r = CliRunner().invoke(app, ["devices", "list"])
    assert r.exit_code == 0 and all(n in r.output for n in SHIPPED)
    r = CliRunner().invoke(app, ["devices", "fit", str(build_dir), "--device", "iphone-15-pro"])
    assert r.exit_code == 0 and "chosen for iphone-15-pro: export/student-q8_0.gguf" in r.output
    r = CliRunner().invoke(app, ["devices", "fit", str(build_dir), "--device", "toaster"])
    assert r.exit_code == 2 and "known devices" in r.output


def test_onnx_candidate_counts_the_gathered_table_out(tmp_path):
    from edgedistill.devices.fit import onnx_candidate
    emb = SHAPE.vocab * SHAPE.hidden * 4
    for name, size, read in (("m.onnx", emb + 1000, emb + 1000), ("m-int8.onnx", emb + 500, 500)):
        p = tmp_path / name
        p.write_bytes(b"\0" * size)
        c = onnx_candidate([p], f"export/{name}", SHAPE)
        assert (c.runtime, c.file_bytes, c.weight_read_bytes) == ("onnxruntime", size, read)
        assert c.format == ("int8" if "int8" in name else "fp32")
