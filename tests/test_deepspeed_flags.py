"""DeepSpeed's launcher flags, typed from habit, mean the same to `sdtrain launch` (the table
in the README's "Coming from DeepSpeed")."""

import json

import pytest

from conftest import sdtrain


def test_deepspeed_spellings_in_one_dry_run(write_recipe, tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=2\n127.0.0.2 slots=2\n127.0.0.3 slots=2\n")
    result = sdtrain("launch", write_recipe(), "--hostfile", tmp_path / "hostfile",
                     "--num_nodes", 2, "--num_gpus", 1, "--master_addr", "127.0.0.1", "--master_port", 29517,
                     "--launcher", "openmpi", "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["launcher"] == "mpirun"  # DeepSpeed's "openmpi"
    assert [(n["host"], n["slots"]) for n in plan["nodes"]] == [("127.0.0.1", [0]), ("127.0.0.2", [0])]
    assert (plan["master_addr"], plan["master_port"]) == ("127.0.0.1", 29517)
    assert plan["nodes"][1]["command"][0] == "mpirun"


def test_include_and_deepspeed_runners_sdtrain_lacks(write_recipe, tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    result = sdtrain("launch", write_recipe(), "-H", tmp_path / "hostfile", "-i", "127.0.0.2:1", "--launcher", "pdsh",
                     "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert [(n["host"], n["slots"]) for n in json.loads(result.stdout)["nodes"]] == [("127.0.0.2", [1])]
    result = sdtrain("launch", write_recipe(), "--launcher", "mvapich", "--dry-run")
    assert result.returncode == 2 and "DeepSpeed runner sdtrain lacks" in result.stderr.replace("\n", " ")


def test_a_ds_config_given_to_launch_names_the_import_command(tmp_path):
    """A ds_config.json handed to launch: one line with the command that converts it, not one
    "unknown key" per DeepSpeed key."""
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                  "checkpoint": {"tag_validation": "Warn"}}))  # a recipe section's name too
    result = sdtrain("launch", config, "--dry-run")
    error = " ".join(result.stderr.split())  # rich wraps long lines
    assert result.returncode == 2 and "unknown key" not in error
    assert f"sdtrain import-deepspeed {config} --out recipe.yaml" in error and "DeepSpeed config" in error


def test_a_training_script_given_to_launch_names_the_quickstart(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import deepspeed\n")
    result = sdtrain("launch", script)
    error = " ".join(result.stderr.split())  # rich wraps long lines
    assert result.returncode == 2 and "Python script" in error and "built-in GPT" in error
    assert "sdtrain launch recipes/quickstart.yaml" in error  # from the repository, as the README's quickstart


RECIPE_COMMANDS = [("estimate", "{}", "--gpus", "8"), ("recipe", "show", "{}"), ("bench", "{}"),
                   ("preflight", "--hostfile", "{hosts}", "--recipe", "{}")]


@pytest.mark.parametrize("command", RECIPE_COMMANDS, ids=lambda c: c[0])
def test_every_command_that_takes_a_recipe_answers_a_ds_config_or_a_script_as_launch_does(tmp_path, command):
    """The answer lives where every recipe load fails (load_recipe), not in each command."""
    (tmp_path / "hosts").write_text("127.0.0.1 slots=1\n")  # preflight reads it before the recipe
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    script = tmp_path / "train.py"
    script.write_text("import deepspeed\n")
    for target, needles in [(config, [f"sdtrain import-deepspeed {config} --out recipe.yaml", "DeepSpeed config"]),
                            (script, ["Python script", "built-in GPT", "sdtrain launch recipes/quickstart.yaml"])]:
        args = [arg.format(target, hosts=tmp_path / "hosts") for arg in command]
        result = sdtrain(*args, timeout=120)
        error = " ".join(result.stderr.split())  # rich wraps long lines
        assert result.returncode == 2 and "unknown key" not in error and "Traceback" not in error, (args, error)
        assert all(needle in error for needle in needles), (args, error)


def test_deepspeed_config_flags_name_the_import_command(tmp_path):
    """`--deepspeed ds.json`, `--deepspeed_config ds.json` and a bare `--deepspeed` (DeepSpeed's
    own switch) are known options that exit 2 with the import command, never "No such option"."""
    config = tmp_path / "ds.json"
    config.write_text("{}")
    for args in (["--deepspeed", config], ["--deepspeed_config", config], ["--deepspeed", "--deepspeed_config", config],
                 [tmp_path / "train.py", "--deepspeed"], ["--deepspeed-config", config]):
        result = sdtrain("launch", *args)
        error = " ".join(result.stderr.split())  # rich wraps long lines
        assert result.returncode == 2 and "No such option" not in error, (args, error)
        assert "sdtrain import-deepspeed" in error and "sdtrain launch recipe.yaml" in error, (args, error)
    assert sdtrain("launch").returncode == 2  # no recipe at all: exit 2 with an example


def test_a_recipe_written_as_json_still_launches(tmp_path):
    from conftest import TINY

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(TINY))
    result = sdtrain("launch", recipe, "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr


def test_a_script_with_its_own_flags_gets_the_script_answer_not_no_such_option(tmp_path):
    """`sdtrain launch train.py --epochs 3 --deepspeed ds.json`, as DeepSpeed's launcher is typed:
    the script and the config are the answer, before click's "No such option '--epochs'"."""
    script, config = tmp_path / "train.py", tmp_path / "ds.json"
    script.write_text("import deepspeed\n")
    config.write_text(json.dumps({"train_batch_size": 8}))
    for args, needle in [([script, "--epochs", 3, "--deepspeed", config], f"sdtrain import-deepspeed {config} --out"),
                         ([script, "--epochs", 3], "Python script"),
                         (["--nproc-per-node", 2, script, "--lr", "1e-4"], "Python script"),
                         ([config, "--epochs", 3], "is a DeepSpeed config")]:
        result = sdtrain("launch", *args)
        error = " ".join(result.stderr.split())
        assert result.returncode == 2 and "No such option" not in error and needle in error, (args, error)
    result = sdtrain("launch", "--epochs", 3)  # nothing of DeepSpeed's: click's own answer stands
    assert result.returncode == 2 and "No such option" in result.stderr


def test_a_script_that_does_not_exist_is_said_to_not_exist(tmp_path):
    result = sdtrain("launch", tmp_path / "nonexist.py")
    error = " ".join(result.stderr.split())
    assert result.returncode == 2 and f"{tmp_path / 'nonexist.py'} does not exist" in error
    assert "is a Python script" not in error and "sdtrain launch recipes/quickstart.yaml" in error


def test_each_command_to_copy_stands_whole_on_a_line_of_its_own(tmp_path):
    """However long the path, the import command is one line a user copies as it is."""
    folder = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns" * 2)
    folder.mkdir()
    config = folder / "ds_config.json"
    config.write_text(json.dumps({"train_batch_size": 8, "bf16": {"enabled": True}}))
    for args in (["launch", config], ["launch", "--deepspeed", config], ["launch", folder / "train.py", "--deepspeed", config],
                 ["recipe", "show", config]):  # the recipe reader's answer too
        result = sdtrain(*args)
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert f"  sdtrain import-deepspeed {config} --out recipe.yaml" in lines, result.stderr
        assert "  sdtrain launch recipe.yaml" in lines, result.stderr
    script = folder / "train.py"
    script.write_text("import deepspeed\n")
    result = sdtrain("estimate", script, "--gpus", 1)
    assert result.returncode == 2 and "  sdtrain launch recipes/quickstart.yaml" in result.stderr.splitlines()


def test_the_launch_target_is_read_once_within_bounds(tmp_path, monkeypatch):
    """A script's shebang and a ds_config's keys come from one bounded read (user_files), never
    a second open of a path that may have changed since."""
    import pathlib

    from sdtrain import user_files
    from sdtrain.migrate.launch_target import not_a_recipe

    script, config = tmp_path / "train", tmp_path / "ds_config.json"
    script.write_bytes(b"#!/usr/bin/env python3\nimport deepspeed\n")
    config.write_bytes(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}}).encode())
    opened = []
    real = user_files.open_regular
    monkeypatch.setattr(user_files, "open_regular", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    for name in ("open", "read_text", "read_bytes"):
        monkeypatch.setattr(pathlib.Path, name, lambda *a, **k: pytest.fail("read outside user_files"))
    assert "is a Python script" in not_a_recipe(str(script))
    assert "is a DeepSpeed config" in not_a_recipe(str(config))
    assert opened == [str(script), str(config)]
