"""The recipe reference cannot drift: the README's table is the schema's, `recipe --schema`
is the JSON Schema that validates recipes, `recipe show` is the recipe with every default."""

import json

import yaml

from conftest import REPO, sdtrain
from sdtrain.recipe import Recipe, load_recipe
from sdtrain.recipe_doc import markdown, readme_table, rows


def test_readme_table_is_the_schema():
    assert readme_table((REPO / "README.md").read_text()) == markdown(), (
        "the README's recipe-key table differs from the schema: run "
        "`.venv/bin/python -m sdtrain.recipe_doc README.md` and commit the table")


def test_every_recipe_key_is_described():
    undescribed = [row["key"] for row in rows() if not row["description"].strip()]
    assert not undescribed, f"give these fields a description= in sdtrain/recipe.py: {undescribed}"
    assert {row["key"] for row in rows()} >= {"train.steps", "parallel.zero.reduce_bucket_mb", "log.every", "name"}


def test_schema_command_prints_the_json_schema(tmp_path):
    result = sdtrain("recipe", "--schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["$schema"].endswith("2020-12/schema") and schema["additionalProperties"] is False
    assert schema["properties"].keys() == Recipe.model_json_schema()["properties"].keys()
    train = schema["$defs"]["TrainConfig"]
    assert train["additionalProperties"] is False  # an editor flags a typo as sdtrain does
    assert train["properties"]["steps"]["minimum"] == 1 and train["properties"]["steps"]["description"]


def test_markdown_command_prints_the_table():
    result = sdtrain("recipe", "--markdown")
    assert result.returncode == 0 and result.stdout == markdown()


def test_show_prints_every_key_resolved(write_recipe):
    recipe = write_recipe({"train": {"lr": 1e-3}})
    result = sdtrain("recipe", "show", recipe, "--set", "train.steps=7", "--set", "parallel.zero_stage=2")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown == load_recipe(recipe, ["train.steps=7", "parallel.zero_stage=2"]).model_dump(mode="json")
    assert shown["train"]["steps"] == 7 and shown["train"]["lr"] == 1e-3
    assert shown["parallel"]["zero"]["reduce_bucket_mb"] == 25.0 and shown["launch"]["timeout_s"] == 300  # defaults
    assert "--dry-run` derives them" in result.stdout  # grad_accum_steps follows from the world size


def test_show_and_schema_bad_input_exit_2(write_recipe, tmp_path):
    assert sdtrain("recipe", "show", tmp_path / "missing.yaml").returncode == 2
    result = sdtrain("recipe", "show", write_recipe({"train": {"stpes": 1}}))
    assert result.returncode == 2 and "did you mean 'steps'" in result.stderr
    assert sdtrain("recipe", "show", write_recipe(), "--set", "train.nope=1").returncode == 2
    assert sdtrain("recipe", "--schema", "--markdown").returncode == 2
