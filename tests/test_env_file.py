"""`.sdtrain_env` applies to a local run as it does to remote nodes."""

import os

from conftest import sdtrain


def test_env_file_reaches_the_workers_of_a_local_run(write_recipe, tmp_path):
    assert "SDTRAIN_INJECT_FAULT" not in os.environ  # set only in the file below
    (tmp_path / ".sdtrain_env").write_text("# a drill\nexport SDTRAIN_INJECT_FAULT=0:1\n")
    recipe = write_recipe({"train": {"steps": 4}})
    result = sdtrain("launch", recipe, "--run-dir", tmp_path / "run", cwd=tmp_path, env={"HOME": str(tmp_path)},
                     timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fault injected by SDTRAIN_INJECT_FAULT=0:1" in result.stderr


def test_a_bad_env_file_is_bad_input_for_a_local_run_too(write_recipe, tmp_path):
    (tmp_path / ".sdtrain_env").write_text("NOT A LINE\n")
    result = sdtrain("launch", write_recipe(), "--dry-run", cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert result.returncode == 2 and ".sdtrain_env line 1" in result.stderr
