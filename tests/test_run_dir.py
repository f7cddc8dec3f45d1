"""The run directory: a user's folder is never moved, and a disk that refuses (full,
read-only) is named as the cause — exit 2 before a run, exit 1 during one — with nothing
half-made left behind."""

import errno
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import sdtrain
from test_failures import LONG, start_launch, wait_for_training


def test_a_users_folder_is_refused_untouched(write_recipe, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("my work\n")
    recipe = write_recipe({"train": {"steps": 2}})
    for extra in (["--dry-run"], []):
        result = sdtrain("launch", recipe, "--run-dir", project, *extra)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "is not empty and holds no sdtrain run" in result.stderr and "train.py" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "recipe.yaml"]  # not renamed
    assert [p.name for p in project.iterdir()] == ["train.py"]
    assert (project / "train.py").read_text() == "my work\n"


def test_the_working_directory_is_never_moved(write_recipe, tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    result = sdtrain("launch", write_recipe({"train": {"steps": 2}}), "--run-dir", ".", cwd=tmp_path)
    assert result.returncode == 2 and "holds no sdtrain run" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine\n"
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(tmp_path.name + ".")]


def test_a_file_as_run_dir_is_bad_input(write_recipe, tmp_path):
    target = tmp_path / "somefile"
    target.write_text("x")
    result = sdtrain("launch", write_recipe(), "--run-dir", target, "--dry-run")
    assert result.returncode == 2 and "is a file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_earlier_run_from_before_the_marker_is_still_moved_aside(tmp_path):
    from sdtrain.launch.rundir import move_aside

    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: old\n")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    moved = move_aside(run_dir)
    assert moved is not None and (moved / "recipe.yaml").is_file() and not run_dir.exists()


@pytest.fixture
def small_fs(tmp_path):
    """A filesystem of its own, a few hundred KB: root ignores file permissions, so only a
    mount makes a directory really full or read-only. Skipped where mounting is not allowed."""
    mounts = []

    def mount(options: str):
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "sdtrain-test", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {result.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder):
    """Write until the filesystem is full."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    assert os.statvfs(folder).f_bavail == 0


def test_a_read_only_run_dir_is_bad_input_before_anything_starts(write_recipe, small_fs):
    point = small_fs("ro,size=256k")
    result = sdtrain("launch", write_recipe({"train": {"steps": 2}}), "--run-dir", point / "run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Read-only file system (EROFS)" in result.stderr and str(point / "run") in result.stderr
    assert "Traceback" not in result.stderr


def test_a_full_disk_is_bad_input_and_puts_the_earlier_run_back(write_recipe, small_fs):
    point = small_fs("size=256k")
    earlier = point / "run"
    (earlier / "logs").mkdir(parents=True)
    (earlier / ".sdtrain_run_id").write_text("old\n")
    (earlier / "metrics.jsonl").write_text('{"step": 1}\n')
    fill(point)
    result = sdtrain("launch", write_recipe({"train": {"steps": 2}}), "--run-dir", earlier)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "No space left on device (ENOSPC)" in result.stderr and "cannot prepare the run directory" in result.stderr
    assert sorted(p.name for p in point.iterdir()) == ["filler", "run"]  # no half-made run, nothing renamed
    assert (earlier / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_new_run_dir_on_a_full_disk_leaves_nothing_behind(write_recipe, small_fs):
    point = small_fs("size=256k")
    fill(point)
    result = sdtrain("launch", write_recipe({"train": {"steps": 2}}), "--run-dir", point / "new" / "run")
    assert result.returncode == 2 and "No space left on device (ENOSPC)" in result.stderr
    assert sorted(p.name for p in point.iterdir()) == ["filler"]


def test_a_disk_that_fills_during_the_run_is_named_as_the_cause(write_recipe, small_fs):
    point = small_fs("size=2m")
    run_dir = point / "run"
    launcher = start_launch(write_recipe(LONG), run_dir)
    wait_for_training(launcher, run_dir)
    filled_at = time.monotonic()
    fill(point)
    out, err = launcher.communicate(timeout=90)
    assert launcher.returncode == 1, out + err
    assert "cause: the run directory" in err and "No space left on device (ENOSPC)" in err
    assert "run failed after" in err  # the launcher itself did not crash
    assert "JSONDecodeError" not in err
    for report in (run_dir / "failures").glob("*"):
        json.loads(report.read_text())  # whole, or not there at all
    assert time.monotonic() - filled_at < 60
