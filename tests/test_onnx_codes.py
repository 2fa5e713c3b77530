"""ONNX int8 / int4 weights from compress/'s codes: the MatMulNBits weights decode (in onnxruntime itself)
to exactly what the codes decode to, and the quantized graph computes what torch computes from the codes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgedistill.compress.grids import dequantize
from edgedistill.compress.rtn import quantize_model
from edgedistill.export.onnx_quant import _module_of, quantize_onnx
from edgedistill.export.ort import OnnxModel


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, tiny_model_dir):
    from edgedistill.export.onnx import export_onnx
    out = tmp_path_factory.mktemp("onnx-codes") / "model.onnx"
    export_onnx(tiny_model_dir, out, graph="kv_cache", external_data=False)
    return out


def _codes(tiny_model_dir, grid):
    """The tiny model with every weight replaced by its dequantized codes, the codes, and the original
    (fp32) embedding table: the ONNX graph gathers from that one (onnxruntime quantizes MatMuls, not Gathers)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    embed = model.get_input_embeddings().weight.detach().clone()
    codes, _ = quantize_model(model, grid)
    return model, codes, embed


def decode_in_onnxruntime(node, inits: dict) -> np.ndarray:
    """The [K, N] weight a MatMulNBits node holds, as onnxruntime decodes it: identity @ W in fp32."""
    import onnxruntime as ort

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n = attrs["K"], attrs["N"]
    one = helper.make_node("MatMulNBits", ["A", *node.input[1:]], ["Y"], domain="com.microsoft",
                           **{**attrs, "accuracy_level": 0})
    graph = helper.make_graph([one], "decode", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
                              [inits[i] for i in node.input[1:] if i])
    m = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 20),
                                                               helper.make_opsetid("com.microsoft", 1)])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"A": np.eye(k, dtype=np.float32)})[0]


@pytest.mark.parametrize("grid,kind", [("q8_0", "int8"), ("q4_0", "int4"), ("q4_1", "int4")])
def test_onnx_weights_are_the_codes(tmp_path, tiny_model_dir, fp32_onnx, grid, kind):
    model, codes, embed = _codes(tiny_model_dir, grid)
    out = tmp_path / f"m-{kind}.onnx"
    info = quantize_onnx(fp32_onnx, out, kind, codes=codes)
    # every block linear (4 layers x 7) and the tied head (the embedding's codes)
    assert info["from_codes"] == 4 * 7 + 1 and info["from_codes_grids"] == {grid: 29}
    assert info["quantized_matmuls"] == 29  # every constant weight; the attention MatMuls stay fp32
    graph = onnx.load(str(out))
    inits = {i.name: i for i in graph.graph.initializer}
    checked = 0
    for node in graph.graph.node:
        if node.op_type != "MatMulNBits" or not node.name.endswith("_codes"):
            continue
        module = _module_of(node)
        qc = codes.get(f"{module}.weight") or codes["model.embed_tokens.weight"]
        got = decode_in_onnxruntime(node, inits)
        want = dequantize(qc).numpy().T
        if grid == "q4_1":  # q·d + m through a float zero point: (q + m/d)·d, within float rounding
            np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(want).max())
        else:  # bit for bit (a signed zero compares equal to zero)
            assert np.array_equal(got, want), module
        checked += 1
    assert checked == 29
    # the whole graph computes what torch computes from the codes
    ids = np.arange(3, 131, dtype=np.int64)
    with torch.no_grad():
        ref = model(inputs_embeds=embed[torch.tensor(ids)][None]).logits[0].numpy()
    got = OnnxModel(out).logits(ids)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    err = float(np.abs(got - ref).max()) / float(np.abs(ref).max())
    assert top1 >= 0.95 and err < 3e-2, (top1, err)


def test_codes_of_another_width_or_tensor_are_left_to_onnxruntime(tmp_path, tiny_model_dir, fp32_onnx):
    _, codes, _ = _codes(tiny_model_dir, "q8_0")
    info = quantize_onnx(fp32_onnx, tmp_path / "m.onnx", "int4", codes=codes)
    assert info["from_codes"] == 0 and info["quantized_matmuls"] == 29
    _, q4, _ = _codes(tiny_model_dir, "q4_0")
    wrong = {name: q4["model.layers.0.mlp.up_proj.weight"] for name in ("model.layers.0.mlp.gate_proj.weight",)}
    info = quantize_onnx(fp32_onnx, tmp_path / "m2.onnx", "int4", codes=wrong)
    assert info["from_codes"] == 0  # another tensor's codes are refused by the closeness check


def test_export_cli_takes_a_codes_file(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from edgedistill.cli import app
    from edgedistill.compress.rtn import save_codes
    from edgedistill.export.cli import export_model

    _, codes, _ = _codes(tiny_model_dir, "q8_0")
    save_codes(codes, tmp_path / "quant_codes.safetensors")
    info = export_model(tiny_model_dir, "onnx:int8", tmp_path / "m.onnx", codes_file=tmp_path / "quant_codes.safetensors")
    assert info["from_codes"] == 29
    r = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--to", "onnx:int8", "--out", str(tmp_path / "x.onnx"),
                                 "--codes", str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 2 and "--codes" in r.output and "does not exist" in r.output
