"""Bad inputs end in one clear error, never a traceback: fuzzed recipes (hypothesis: wrong types, unknown keys,
out-of-range and non-finite values, odd strings and YAML) always raise RecipeError naming the field; corrupt or
truncated GGUF / ONNX / safetensors files and a missing tokenizer give one actionable error at the CLI."""
from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgedistill.errors import RecipeError
from edgedistill.recipe import Recipe, load_recipe, parse_recipe

DEFAULTS = Recipe().model_dump(mode="json")
FIELDS = [(section, name) for section, fields in DEFAULTS.items() if isinstance(fields, dict) for name in fields]

odd_text = st.sampled_from(["", "\x00", "../../etc/passwd", "/nonexistent/x.gguf", "~", "a" * 5000, "./x.txt",
                            "q2_k", "2:4", "nan", "-1", "🙂", "smollm2-135m-instruct", "C:\\model"])
values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@st.composite
def mutated_recipes(draw):
    data = yaml.safe_load(yaml.safe_dump(DEFAULTS))  # a deep copy
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value", "unknown_key", "section"]))
        section, name = draw(st.sampled_from(FIELDS))
        if kind != "section" and not isinstance(data[section], dict):
            data[section] = {}
        if kind == "value":
            data[section][name] = draw(values)
            touched.append(f"{section}.{name}")
        elif kind == "unknown_key":
            key = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in data[section]))
            data[section][key] = draw(values)
            touched.append(f"{section}.{key}")
        else:  # a whole section, or the top-level name
            section = draw(st.sampled_from(list(DEFAULTS)))
            data[section] = draw(values | odd_text | st.just(".."))
            touched.append(section)
    return data, touched


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(case=mutated_recipes())
def test_fuzzed_recipe_is_valid_or_a_recipe_error_naming_a_field(tmp_path_factory, case):
    data, touched = case
    try:
        recipe = parse_recipe(data, base_dir=tmp_path_factory.getbasetemp())
    except RecipeError as e:
        msg = str(e)
        assert "recipe field '" in msg or "recipe:" in msg, msg
        assert any(t.split(".")[0] in msg for t in touched), (touched, msg)
        return
    # Accepted: every float the build will use is finite.
    for section in recipe.model_dump().values():
        for v in (section.values() if isinstance(section, dict) else []):
            assert not (isinstance(v, float) and not math.isfinite(v)), recipe


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzzed_recipe_file_bytes_are_a_recipe_error_or_valid(tmp_path_factory, raw):
    p = tmp_path_factory.mktemp("r") / "r.yaml"
    p.write_bytes(raw)
    try:
        load_recipe(p)
    except RecipeError as e:
        assert str(e).startswith(("recipe", "invalid recipe")), e


@pytest.mark.parametrize("value, field", [
    (float("nan"), "distill.lr"), (float("inf"), "distill.lr"), (-float("inf"), "distill.temperature"),
    (float("nan"), "student.keep_ratio"),
])
def test_non_finite_numbers_are_refused(value, field):
    section, name = field.split(".")
    with pytest.raises(RecipeError, match=f"'{field}'"):
        parse_recipe({section: {name: value}})


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", ""])
def test_recipe_name_cannot_leave_the_out_folder(name):
    with pytest.raises(RecipeError, match="'name'"):
        parse_recipe({"name": name})


def test_nul_byte_path_is_a_recipe_error():
    with pytest.raises(RecipeError, match="data.source"):
        parse_recipe({"data": {"source": "./corpus\x00.txt"}})


# ---------------------------------------------------------------- corrupt files, at the CLI
def corrupt_copy(src, dest, how: str):
    import shutil
    shutil.copytree(src, dest)
    st = dest / "model.safetensors"
    if how == "truncated safetensors":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif how == "garbage safetensors":
        st.write_bytes(b"\x00\xff" * 2000)
    elif how == "missing tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (dest / f).unlink()
    elif how == "bad config":
        (dest / "config.json").write_text("{not json")
    return dest


def cli(*args: str):
    from typer.testing import CliRunner

    from edgedistill.cli import app
    result = CliRunner().invoke(app, list(args))
    text = result.output  # stdout and stderr together
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exit_code, text, result.exception)
    assert text.count("error:") == 1 and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("how, words", [
    ("truncated safetensors", "corrupt or truncated"), ("garbage safetensors", "corrupt or truncated"),
    ("missing tokenizer", "tokenizer.json is missing"), ("bad config", "not valid JSON"),
])
def test_export_of_a_broken_model_folder_is_one_clear_error(tmp_path, tiny_model_dir, how, words):
    model = corrupt_copy(tiny_model_dir, tmp_path / "m", how)
    out = tmp_path / "m.gguf"
    assert words in cli("export", str(model), "--to", "gguf:f16", "--out", str(out))
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))  # nothing half-written left behind


@pytest.mark.parametrize("how, words", [
    ("truncated safetensors", "corrupt or truncated"), ("missing tokenizer", "tokenizer"),
])
def test_compress_of_a_broken_model_folder_is_one_clear_error(tmp_path, tiny_model_dir, how, words):
    model = corrupt_copy(tiny_model_dir, tmp_path / "m", how)
    text = cli("compress", str(model), "--method", "q8_0", "--out", str(tmp_path / "c"), "--calib-windows", "2",
               "--calib-seq-len", "64")
    assert words in text and not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory, tiny_model_dir):
    from edgedistill.export.gguf import write_gguf
    out = tmp_path_factory.mktemp("gguf") / "good.gguf"
    write_gguf(tiny_model_dir, out, dtype="f16")
    return out


@pytest.mark.parametrize("how, words", [
    ("truncated", "not within the file bounds"), ("header only", "llama.cpp could not load"),
    ("garbage", "llama.cpp could not load"), ("empty", "llama.cpp could not load"),
])
def test_serve_of_a_corrupt_gguf_is_one_clear_error(tmp_path, good_gguf, how, words):
    data = good_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"truncated": data[: len(data) // 2], "header only": data[:64], "garbage": b"\x13" * 4096,
                     "empty": b""}[how])
    text = cli("serve", str(bad), "--no-ui", "--port", "9")
    assert words in text and "Re-run the export stage" in text


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_corrupt_onnx_is_one_clear_error(tmp_path, how):
    import onnx
    from onnx import TensorProto, helper

    from edgedistill.errors import ExportError
    from edgedistill.export.ort import OnnxModel
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    data = helper.make_model(graph).SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))
    bad = tmp_path / "m.onnx"
    bad.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x08" * 1000)
    with pytest.raises(ExportError, match="onnxruntime refused.*re-run the export stage"):
        OnnxModel(bad)


def test_nothing_in_the_package_unpickles():
    """Model files are safetensors / GGUF / ONNX; the one torch.load (distill checkpoints) is weights_only."""
    import re
    from pathlib import Path

    import edgedistill
    root = Path(edgedistill.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        assert "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
