"""Recipe validation: typos, types, ranges, overrides and batch arithmetic, all exit 2."""

import time

import pytest
from pydantic import BaseModel, ValidationError

from conftest import sdtrain
from sdtrain.batch import derive_batch
from sdtrain.errors import RecipeError
from sdtrain.divisors import divisors
from sdtrain.recipe import ModelConfig, Recipe, apply_override, enum_values, expert_layout_problem, load_recipe, parse_yaml


def test_defaults_and_overrides(write_recipe):
    recipe = load_recipe(write_recipe(), ["train.steps=7", "train.precision=bf16", "model.bias=false"])
    assert recipe.train.steps == 7 and recipe.train.precision == "bf16" and recipe.model.bias is False
    assert recipe.model.n_layers == 2  # from the file


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"train": {"stpes": 5}}, "unknown key train.stpes (did you mean 'steps'?)"),
        ({"modle": {"n_layers": 2}}, "unknown key modle (did you mean 'model'?)"),
        ({"model": {"n_layer": 2}}, "unknown key model.n_layer (did you mean 'n_layers'?)"),
        ({"train": {"steps": "many"}}, "train.steps: Input should be a valid integer"),
        ({"train": {"steps": 0}}, "train.steps: Input should be greater than or equal to 1"),
        ({"train": {"precision": "fp8"}}, "train.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        ({"model": {"d_model": 30, "n_heads": 4}}, "d_model 30 is not divisible by n_heads 4"),
        ({"parallel": {"zero_stage": 5}}, "parallel.zero_stage: Input should be less than or equal to 3"),
        ({"parallel": {"zero": {"overlap": True}}}, "unknown key parallel.zero.overlap (did you mean 'overlap_comm'?)"),
        ({"train": {"warmup_steps": 50}}, "warmup_steps 50 exceeds steps 10"),
    ],
)
def test_bad_recipe_is_refused_with_its_path(write_recipe, extra, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(extra))
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=0.1", "--set train.lrr: unknown key (did you mean 'lr'?)"),
        ("trian.lr=0.1", "--set trian: unknown key (did you mean 'train'?)"),
        ("train.lr", "must look like dotted.key=value"),
        ("train.lr.x=1", "lr is a value, not a section"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ],
)
def test_bad_override_is_refused(write_recipe, override, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(), [override])
    assert expected in str(err.value)


def test_batch_any_two_determine_the_third():
    assert derive_batch(32, 4, None, 2).grad_accum == 4
    assert derive_batch(32, None, 2, 2).micro_batch == 8
    assert derive_batch(None, 4, 3, 2).global_batch == 24
    assert derive_batch(32, None, None, 4).as_dict() == {"global": 32, "micro": 8, "grad_accum": 1, "data_parallel": 4}
    assert derive_batch(24, 3, 4, 2).per_rank == 12


@pytest.mark.parametrize(
    "args, expected",
    [
        ((30, 4, None, 2), "global_batch_size 30 is not divisible by micro_batch_size 4 x data_parallel 2 = 8; "
                           "with micro_batch_size 4 use global_batch_size 24 or 32; "
                           "or keep global_batch_size 30 with micro_batch_size in [1, 3, 5, 15]"),
        ((32, 4, 2, 2), "global_batch_size 32 != micro_batch_size 4 x grad_accum_steps 2 x data_parallel 2 = 16"),
        ((10, None, 3, 2), "global_batch_size 10 is not divisible by grad_accum_steps 3 x data_parallel 2 = 6"),
        ((None, None, 2, 2), "set global_batch_size or micro_batch_size"),
        ((9, 3, None, 2), "global_batch_size must be a multiple of data_parallel 2"),
    ],
)
def test_inconsistent_batch_shows_the_arithmetic(args, expected):
    with pytest.raises(RecipeError) as err:
        derive_batch(*args)
    assert expected in str(err.value)


def test_cli_exits_2_and_launches_nothing(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    result = sdtrain("launch", write_recipe({"train": {"stpes": 3}}), "--run-dir", run_dir)
    assert result.returncode == 2
    assert "did you mean 'steps'" in result.stderr
    assert not run_dir.exists()

    result = sdtrain("launch", write_recipe(), "--nproc-per-node", "3", "--run-dir", run_dir)
    assert result.returncode == 2
    assert "global_batch_size 8 is not divisible by micro_batch_size 2 x data_parallel 3 = 6" in result.stderr
    assert not run_dir.exists()

    result = sdtrain("launch", tmp_path / "missing.yaml")
    assert result.returncode == 2 and "does not exist" in result.stderr

    result = sdtrain("launch", write_recipe(), "--set", "train.steps=abc", "--run-dir", run_dir)
    assert result.returncode == 2 and "train.steps: Input should be a valid integer" in result.stderr

    result = sdtrain("launch", write_recipe(), "--json")
    assert result.returncode == 2 and "--json goes with --dry-run" in result.stderr


def test_not_yaml_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(bad)


# --- every documented enum value works unquoted (issue 19: YAML 1.1 reads `off` as false) ---

def enum_fields(model=Recipe, prefix=""):
    """(dotted path, value) for every string value of every enum field of the schema."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from enum_fields(annotation, f"{prefix}{name}.")
        for value in enum_values(annotation):
            yield f"{prefix}{name}", value


ENUM_CASES = sorted(set(enum_fields()))


def errors_at(raw: dict, path: str) -> list[str]:
    """Messages about `path` itself; other checks (interleaved needs virtual_stages) may fail."""
    try:
        Recipe.model_validate(raw)
    except ValidationError as exc:
        where = tuple(path.split("."))
        return [e["msg"] for e in exc.errors() if tuple(map(str, e["loc"]))[: len(where)] == where]
    return []


def nested(path: str, text: str) -> str:
    """`a.b.c` and `v` -> YAML `a:\n  b:\n    c: v\n` (the value unquoted, as a user writes it)."""
    parts = path.split(".")
    return "".join("  " * depth + f"{part}:\n" for depth, part in enumerate(parts[:-1])) + \
        "  " * (len(parts) - 1) + f"{parts[-1]}: {text}\n"


def test_the_walk_finds_the_enums():
    assert ("launch.memory_check", "off") in ENUM_CASES and ("parallel.pipeline.schedule", "1f1b") in ENUM_CASES
    assert ("launch.nproc_per_node", "auto") in ENUM_CASES and ("parallel.pipeline.partition", "uniform") in ENUM_CASES


@pytest.mark.parametrize("path, value", ENUM_CASES, ids=[f"{p}={v}" for p, v in ENUM_CASES])
def test_every_enum_value_works_unquoted_in_a_recipe_and_in_set(path, value):
    from_file = parse_yaml(nested(path, value), "recipe")
    from_set: dict = {}
    apply_override(from_set, f"{path}={value}")
    for raw in (from_file, from_set):
        assert errors_at(raw, path) == [], (raw, errors_at(raw, path))
        try:
            node = Recipe.model_validate(raw)
        except ValidationError:
            continue  # refused for another field's sake (interleaved wants virtual_stages), not this value's
        for part in path.split("."):
            node = getattr(node, part)
        assert node == value


def test_memory_check_off_unquoted(write_recipe):
    recipe = write_recipe()
    recipe.write_text(recipe.read_text().replace("launch:\n", "launch:\n  memory_check: off\n"))
    assert load_recipe(recipe).launch.memory_check == "off"
    assert load_recipe(write_recipe(), ["launch.memory_check=off"]).launch.memory_check == "off"
    assert load_recipe(write_recipe(), ["launch.memory_check=no"]).launch.memory_check == "off"
    with pytest.raises(RecipeError, match="launch.memory_check: Input should be 'error', 'warn' or 'off' "
                                          r"\(got True\); YAML reads an unquoted on, off, yes"):
        load_recipe(write_recipe(), ["launch.memory_check=on"])  # no enum value reads as true
    with pytest.raises(RecipeError, match="checkpoint.at_end: Input should be a valid boolean"):
        load_recipe(write_recipe(), ["checkpoint.at_end=warn"])  # booleans stay booleans


# --- expert parallelism: only suggestions that pass every other check (issue 19) ---

def test_expert_parallel_suggestions_fit_the_world_size():
    assert "use expert_parallel in [1, 3]" in expert_layout_problem(3, 2)  # world unknown: the experts decide
    problem = expert_layout_problem(3, 2, world=2)
    assert "use expert_parallel in [1]" in problem  # 3 divides the experts but not 2 ranks
    problem = expert_layout_problem(8, 4, world=6, stages=1)
    assert "does not divide the data-parallel size 6" in problem and "use expert_parallel in [1, 2]" in problem
    assert "use expert_parallel in [1, 2, 4]" in expert_layout_problem(8, 8, world=8, stages=2)
    assert expert_layout_problem(8, 4, world=8, stages=2) is None
    for experts, ep, world, stages in [(3, 2, 2, 1), (12, 8, 12, 2), (6, 4, 4, 1), (16, 3, 8, 1)]:
        fits = eval(expert_layout_problem(experts, ep, world, stages).split("use expert_parallel in ")[1].split("]")[0] + "]")
        assert fits and all(expert_layout_problem(experts, choice, world, stages) is None for choice in fits)


def test_launch_suggests_an_expert_parallel_that_launches(write_recipe, tmp_path):
    recipe = write_recipe({"model": {"moe": {"num_experts": 3}}, "parallel": {"expert_parallel": 2}})
    result = sdtrain("launch", recipe, "--nproc-per-node", "2", "--dry-run", "--run-dir", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    text = " ".join(result.stderr.split())
    assert "use expert_parallel in [1] (those that also divide the data-parallel size 2)" in text, text


def test_recipe_show_checks_the_expert_layout_for_its_nproc(write_recipe, tmp_path):
    """An integer launch.nproc_per_node is the world size: recipe show refuses as launch does."""
    recipe = write_recipe({"model": {"moe": {"num_experts": 3}}, "parallel": {"expert_parallel": 2},
                           "launch": {"nproc_per_node": 2}})
    shown = sdtrain("recipe", "show", recipe)
    assert shown.returncode == 2, shown.stdout
    assert "use expert_parallel in [1] (those that also divide" in " ".join(shown.stderr.split())  # was [1, 3]
    launched = sdtrain("launch", recipe, "--dry-run", "--run-dir", tmp_path / "run")
    assert " ".join(launched.stderr.split()) == " ".join(shown.stderr.split())
    auto = write_recipe({"model": {"moe": {"num_experts": 3}}, "parallel": {"expert_parallel": 2},
                         "launch": {"nproc_per_node": "auto"}}, name="auto.yaml")
    assert "use expert_parallel in [1, 3]" in " ".join(sdtrain("recipe", "show", auto).stderr.split())  # world unknown


def test_every_divisor_is_suggested():
    """The divisors used to stop at 64: 128 experts never had expert_parallel 128 suggested."""
    assert "use expert_parallel in [1, 2, 4, 8, 16, 32, 64, 128]" in expert_layout_problem(128, 3)
    assert divisors(128) == [1, 2, 4, 8, 16, 32, 64, 128] and divisors(1) == [1] and divisors(36)[-3:] == [12, 18, 36]
    assert divisors(97 * 89) == [1, 89, 97, 97 * 89]


def test_suggestions_for_huge_numbers_come_at_once():
    """The suggestions used to try every integer up to the typed one: 10**12 never answered."""
    start = time.monotonic()
    with pytest.raises(RecipeError, match="micro_batch_size in \\[50000000000, .*, 500000000000\\]"):
        derive_batch(10**12, 3, None, 2)
    with pytest.raises(RecipeError, match="grad_accum_steps in \\[1, 2, 4, 5, 8, 10\\]"):
        derive_batch(10**12, None, 3, 2)
    with pytest.raises(ValidationError, match="pick n_heads from \\[1, 2, 3"):
        ModelConfig(d_model=6 * 10**15, n_heads=7)
    assert "use expert_parallel in [1, 2" in expert_layout_problem(2 * 10**15, 7)
    assert time.monotonic() - start < 1
