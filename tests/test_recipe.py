import pytest
import yaml

from edgedistill.errors import RecipeError
from edgedistill.recipe import Recipe, load_recipe, parse_recipe


def test_defaults_are_the_default_build():
    r = Recipe()
    assert r.teacher.model == "smollm2-135m-instruct"
    assert r.student.keep_ratio <= 0.5
    assert r.export.gguf == ["f16", "q8_0"] and r.export.onnx


def test_quick_only_shrinks():
    r = Recipe()
    q = r.quick()
    assert q.distill.steps < r.distill.steps and q.eval.windows <= r.eval.windows
    assert q.teacher == r.teacher and r.distill.steps == Recipe().distill.steps


@pytest.mark.parametrize("data, field, words", [
    ({"distill": {"stepz": 3}}, "distill.stepz", "unknown key"),
    ({"distill": {"steps": "many"}}, "distill.steps", "integer"),
    ({"distill": {"steps": 0}}, "distill.steps", "greater than or equal to 1"),
    ({"student": {"keep_ratio": 0.9}}, "student.keep_ratio", "less than or equal to 0.5"),
    ({"export": {"gguf": ["q2_k"]}}, "export.gguf.0", "f32"),
    ({"bogus": 1}, "bogus", "unknown key"),
    ({"student": {"init": "model"}}, "student", "student.model is empty"),
])
def test_bad_recipe_names_the_field(data, field, words):
    with pytest.raises(RecipeError) as ei:
        parse_recipe(data)
    msg = str(ei.value)
    assert f"'{field}'" in msg and words in msg


def test_missing_files_fail_up_front(tmp_path):
    with pytest.raises(RecipeError, match="data.source.*does not exist"):
        parse_recipe({"data": {"source": "./nope.txt"}}, base_dir=tmp_path)
    with pytest.raises(RecipeError, match="teacher.model.*does not exist"):
        parse_recipe({"teacher": {"model": "./missing-model"}}, base_dir=tmp_path)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_yaml_errors_are_clear(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("distill: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(p)


def test_relative_paths_resolve_against_the_recipe(tmp_path):
    (tmp_path / "corpus.txt").write_text("x" * 20_000)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"name": "mine", "data": {"source": "corpus.txt"}}))
    r = load_recipe(p)
    assert r.name == "mine" and r.data.source == str((tmp_path / "corpus.txt").resolve())
