"""ONNX export (dynamo) of tiny Llamas, checked against torch through onnxruntime."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from edgedistill.errors import ExportError
from edgedistill.export.onnx import GRAPHS, verify_against_torch, describe_onnx, export_onnx, load_causal_lm
from edgedistill.export.ort import OnnxModel

TOL = 1e-4


def _torch_logits(model_dir, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


@pytest.fixture(scope="module", params=[("tied", None, None), ("untied", 18, True)],
                ids=["tied", "untied-opset18-external"])
def exported(request, tmp_path_factory):
    kind, opset, external = request.param
    model_dir = request.getfixturevalue("tiny_model_dir" if kind == "tied" else "tiny_untied_model_dir")
    out = tmp_path_factory.mktemp(f"onnx-{kind}") / "model.onnx"
    out.write_bytes(b"an older export")                     # replaced in place
    out.with_name("model.onnx.data").write_bytes(b"stale")  # removed, or replaced by this export's data
    res = export_onnx(model_dir, out, opset=opset, external_data=external)
    return SimpleNamespace(model_dir=model_dir, out=out, opset=opset, external=bool(external), res=res)


def test_export_result_describes_files_and_signature(exported):
    out, opset, external, res = exported.out, exported.opset, exported.external, exported.res
    data = out.with_name("model.onnx.data")
    assert res["files"] == ([out, data] if external else [out])
    assert res["bytes"] == sum(p.stat().st_size for p in res["files"]) > 100_000
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in res["files"])  # no temp/stale
    assert (out.stat().st_size < data.stat().st_size) if external else out.stat().st_size > 100_000
    assert res["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    vocab = onnx.load(str(out), load_external_data=False).graph.output[0].type.tensor_type.shape.dim[2].dim_value
    assert res["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", vocab]}]
    assert res["opset"] == describe_onnx(out)["opset"] == (opset or res["opset"]) >= 18
    onnx.checker.check_model(str(out), full_check=True)


def test_ort_logits_match_torch_across_lengths(exported):
    model_dir, out = exported.model_dir, exported.out
    ort_model = OnnxModel(out, threads=1)
    rng = np.random.default_rng(0)
    # The export traced (2, 8): lengths 1, 7 and 64 check rotary and the causal mask are not baked in.
    for batch, seq in [(1, 1), (1, 7), (2, 64), (2, 1), (3, 5)]:
        ids = rng.integers(0, ort_model.n_vocab, size=(batch, seq), dtype=np.int64)
        want = _torch_logits(model_dir, ids)
        got = ort_model.logits(ids)
        assert got.shape == want.shape == (batch, seq, ort_model.n_vocab)
        assert np.abs(got - want).max() < TOL, (batch, seq, np.abs(got - want).max())
    single = ids[0].tolist()
    assert ort_model.logits(single).shape == (5, ort_model.n_vocab)
    np.testing.assert_allclose(ort_model.logits(single), ort_model.logits(ids)[0], atol=1e-5)


def test_causal_mask_hides_the_future(exported):
    out = exported.out
    ort_model = OnnxModel(out)
    ids = np.arange(1, 33, dtype=np.int64)
    changed = ids.copy()
    changed[20] += 1
    full, prefix, other = ort_model.logits(ids), ort_model.logits(ids[:10]), ort_model.logits(changed)
    assert np.abs(full[:10] - prefix).max() < 1e-5
    assert np.abs(full[:20] - other[:20]).max() < 1e-5      # positions before the change are untouched
    assert np.abs(full[20:] - other[20:]).max() > 1e-3      # positions from the change on see it


def test_corrupt_and_truncated_files_raise_export_error(exported, tmp_path):
    out = exported.out
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \x00\xff" * 100)
    for bad in (truncated, garbage):
        with pytest.raises(ExportError, match="onnxruntime refused"):
            OnnxModel(bad)
    with pytest.raises(ExportError, match="does not exist"):
        OnnxModel(tmp_path / "missing.onnx")


def test_model_file_alone_loads_only_when_self_contained(exported, tmp_path):
    lone = tmp_path / exported.out.name
    lone.write_bytes(exported.out.read_bytes())  # any .data file is left behind
    if exported.external:
        with pytest.raises(ExportError, match="onnxruntime refused"):
            OnnxModel(lone)
    else:
        assert OnnxModel(lone).logits([1, 2, 3]).shape[0] == 3


def test_bad_tokens_raise_export_error(exported):
    out = exported.out
    ort_model = OnnxModel(out)
    with pytest.raises(ExportError, match="token ids must lie"):
        ort_model.logits([0, ort_model.n_vocab])
    with pytest.raises(ExportError, match="non-empty"):
        ort_model.logits([])


def test_export_of_a_non_model_folder_raises_export_error(tmp_path):
    with pytest.raises(ExportError, match="could not load a causal LM"):
        export_onnx(tmp_path, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_verification_rejects_a_graph_that_disagrees_with_torch(exported):
    model_dir, out = exported.model_dir, exported.out
    spec = GRAPHS["logits"]
    model = load_causal_lm(model_dir)
    module = spec.wrap(model)
    verify_against_torch(module, out, spec, spec.probes(model))  # the real pair agrees

    class Perturbed(torch.nn.Module):
        def forward(self, input_ids):
            return module(input_ids) * 1.01

    with pytest.raises(ExportError, match="differs from torch"):
        verify_against_torch(Perturbed(), out, spec, spec.probes(model))


def test_unsupported_opset_raises_export_error(tiny_model_dir, tmp_path):
    with pytest.raises(ExportError, match="opset 7 is not supported"):
        export_onnx(tiny_model_dir, tmp_path / "x.onnx", opset=7)
