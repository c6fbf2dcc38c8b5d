"""Recipes and prompt rendering."""
from pathlib import Path

import pytest

from batchgen.job.config import JobConfig
from batchgen.recipe import (PromptRenderer, PromptTemplateError, RecipeError, RowError,
                             apply_overrides, compile_template, flatten_recipe, load_recipe)
from fake_engine import FakeTokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_make_valid_jobs(name):
    fields = load_recipe(ROOT / "recipes" / name)
    input_name = "openai_batch.jsonl" if "openai" in name else "reviews.jsonl"
    JobConfig(input=str(ROOT / "samples" / input_name), output_dir=Path("/tmp/unused"), **fields)


def test_at_least_the_three_recipes_ship():
    names = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert {"sentiment", "summarise", "openai_batch"} <= names


def test_unknown_keys_are_named():
    with pytest.raises(RecipeError, match="'output.rows'"):
        flatten_recipe({"output": {"rows": 3}})
    with pytest.raises(RecipeError, match="'sampling.temprature'"):
        flatten_recipe({"sampling": {"temprature": 0}})
    with pytest.raises(RecipeError, match="'modle'"):
        flatten_recipe({"modle": "x"})


def test_recipe_maps_sections_and_set_overrides(tmp_path):
    fields = flatten_recipe({"model": "m", "prompt": {"template": "{{ a }}", "chat": False},
                             "sampling": {"temperature": 0, "seed": 3},
                             "output": {"keep": ["a"], "parse_json": {"x": "string"}}})
    assert fields == {"model": "m", "template": "{{ a }}", "chat": False, "seed": 3,
                      "sampling": {"temperature": 0}, "keep": ["a"], "parse_json": {"x": "string"}}
    apply_overrides(fields, ["sampling.top_k=20", "output.rows_per_part=50", "prompt.system=Be brief"])
    assert fields["sampling"]["top_k"] == 20 and fields["rows_per_part"] == 50
    assert fields["system"] == "Be brief"
    with pytest.raises(RecipeError, match="key=value"):
        apply_overrides(fields, ["novalue"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)


def test_templates_are_sandboxed():
    renderer = PromptRenderer(FakeTokenizer(), template="{{ x.__class__.__mro__ }}", chat=False)
    with pytest.raises(RowError):
        renderer.prompt_text({"x": "s"})
    with pytest.raises(PromptTemplateError):
        compile_template("{% for %}")


def test_renderer_row_errors_and_chat():
    renderer = PromptRenderer(FakeTokenizer(), template="Q: {{ q }} ({{ n }})", system="Sys")
    assert renderer.prompt_text({"q": "hi", "n": 3}) == "Q: hi (3)"
    for fields, message in (({"n": 1}, "missing field 'q'"), ({"q": None, "n": 1}, "is null"),
                            ({"q": " ", "n": ""}, None)):
        if message:
            with pytest.raises(RowError, match=message):
                renderer.prompt_text(fields)
    ids = renderer.encode_row({"q": "hi", "n": 3})
    assert FakeTokenizer().decode(ids) == "<system>Sys</><user>Q: hi (3)</><assistant>"
    plain = PromptRenderer(FakeTokenizer(), prompt_column="p", chat=False)
    with pytest.raises(RowError, match="not a string"):
        plain.encode_row({"p": 5})
    with pytest.raises(RowError, match="empty prompt"):
        plain.encode_row({"p": "  "})
    assert plain.encode_row({"p": "a"})[0] == 1  # plain prompts keep the tokenizer's BOS


@pytest.mark.parametrize("data, message", [
    ({"output": {"parse_json": ["sentiment"]}},
     "output.parse_json must be a mapping of column name to type, got list"),
    ({"output": {"parse_json": {"sentiment": ["string"]}}}, "output.parse_json must be a mapping"),
    ({"prompt": {"template": 123}}, "prompt.template must be a string, got int 123"),
    ({"model": 5}, "model must be a string, got int 5"),
    ({"engine": {"device": 0}}, "engine.device must be a string, got int 0"),
    ({"output": {"keep": "id"}}, "output.keep must be a list of column names, got str 'id'"),
    ({"prompt": {"chat": "false"}}, "prompt.chat must be true or false, got str 'false'"),
    ({"engine": {"gpu_memory_utilization": True}},
     "engine.gpu_memory_utilization must be a number, got bool True"),
])
def test_values_of_the_wrong_type_are_named_with_the_type_expected(data, message):
    with pytest.raises(RecipeError, match=f"^r.yaml: {message}"):
        flatten_recipe(data, source="r.yaml")


def test_set_with_a_quoted_boolean_is_refused():
    with pytest.raises(RecipeError, match="prompt.chat must be true or false"):
        apply_overrides({}, ["prompt.chat='false'"])
    fields: dict = {}
    apply_overrides(fields, ["prompt.chat=false"])
    assert fields == {"chat": False}


@pytest.mark.parametrize("kw, message", [
    ({"template": 123}, "template must be a string, got int"),
    ({"keep": "id"}, "keep must be a list of column names"),
    ({"dtype": "float8"}, "dtype must be one of"),
    ({"sampling": {"temperature": "hot"}}, "temperature"),
])
def test_job_config_checks_types_too(tmp_path, kw, message):
    from batchgen.job.config import JobConfigError
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "x"}\n')
    with pytest.raises(JobConfigError, match=message):
        JobConfig(input=str(src), output_dir=tmp_path / "out", **kw)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe b\x00a\x00d\x00", r"not UTF-8 text \(byte 0xff at offset 0\); save it as UTF-8$"),
    (b"prompt:\n\ttemplate: x\n",
     r"not valid YAML: while scanning for the next token: found character '\\t' that cannot "
     r"start any token \(line 2, column 1\)$"),
])
def test_recipe_read_errors_are_one_line_with_the_cause(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key, meant", [
    ("template", "prompt.template"),  # a key outside its section
    ("prompt.temperature", "sampling.temperature"),  # in the wrong section
    ("sampling.max_new_tokens", "sampling.max_tokens"),  # transformers' name
    ("sampling.temprature", "sampling.temperature"),
    ("output.rows_per_parts", "output.rows_per_part"),
    ("input.keep", "output.keep"),
])
def test_an_unknown_key_names_the_key_it_most_resembles(key, meant):
    section, _, name = key.rpartition(".")
    data = {section: {name: 1}} if section else {name: 1}
    with pytest.raises(RecipeError, match=f"unknown key '{key}' \\(did you mean '{meant}'\\?"):
        flatten_recipe(data)


@pytest.mark.parametrize("override, fields", [
    ("sampling.stop=###", {"sampling": {"stop": "###"}}),  # YAML: a comment, so null
    ("prompt.template=# {{ q }}", {"template": "# {{ q }}"}),
    ("prompt.system=Answer: yes or no", {"system": "Answer: yes or no"}),  # YAML: a mapping
    ("input.prompt_column=2023", {"prompt_column": "2023"}),  # YAML: an int
    ("prompt.system=No", {"system": "No"}),  # YAML: a boolean
    ("prompt.system=null", {"system": None}),
    ("prompt.system=", {"system": None}),
    ("sampling.stop=[a, b]", {"sampling": {"stop": ["a", "b"]}}),
    ("prompt.chat=false", {"chat": False}),
])
def test_set_keeps_text_as_typed_where_yaml_would_change_it(override, fields):
    got: dict = {}
    apply_overrides(got, [override])
    assert got == fields


def test_the_readme_recipe_example_makes_a_valid_job(tmp_path):
    import yaml
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = readme.split("## Recipes", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    fields = flatten_recipe(yaml.safe_load(example.replace("...{{ field }}...", "{{ review }}")))
    JobConfig(input=str(ROOT / "samples" / "reviews.jsonl"), output_dir=tmp_path / "out", **fields)
