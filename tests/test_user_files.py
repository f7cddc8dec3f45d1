"""Files and flags a user hands us are read within bounds (issue 19): a FIFO is refused, not
waited on; a huge file is refused before it is read; nesting, integers and host ranges past
their limits are one line and exit 2, never a RecursionError, an OverflowError or minutes of
work; control characters in echoed input are escaped."""

import importlib
import io
import json
import os
import time
import tracemalloc

import pytest
from conftest import sdtrain
from test_bad_input import fails_after
from sdtrain.errors import UserInputError, printable
from sdtrain.launch.hostfile import HostfileError, expand_hostlist, parse_filter, parse_hostfile, read_hostfile
from sdtrain.migrate.deepspeed import read_config
from sdtrain.plot.run_data import load_run
from sdtrain.recipe import DataConfig, RecipeError, load_recipe
from sdtrain.train.sources import load_corpus
from sdtrain.user_files import MAX_DEPTH, parse_json, parse_yaml, read_text

HUGE_INT = "1" * 5000  # 10**5000 / 9: past Python's 4,300-digit conversion limit


def readers(tmp_path):
    """Each reader of a user's file, given the file's path: (name, the file's place, read it)."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (tmp_path / "text.txt").write_text("some text to tokenize\n" * 50)
    data = {"source": str(tmp_path / "text.txt"), "max_bytes": 1024}  # read whole: f.read(n) allocates n
    tokenized = lambda path: load_corpus(DataConfig(**data, tokenizer=str(path)), 16)  # noqa: E731
    return [
        ("recipe", tmp_path / "r.yaml", load_recipe),
        ("hostfile", tmp_path / "hosts", read_hostfile),
        ("DeepSpeed config", tmp_path / "ds.json", read_config),
        ("metrics file", run / "metrics.jsonl", lambda path: load_run(path.parent)),
    ] + ([("data.tokenizer", tmp_path / "tokenizer.json", tokenized)]  # a FIFO was "does not exist"
         if _imported("tokenizers") else [])


def _imported(name: str) -> bool:
    """An optional extra, imported now if installed, so that a reader's measured memory is its own."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def test_a_fifo_is_refused_at_once_by_every_reader(tmp_path):
    for what, path, read in readers(tmp_path):
        os.mkfifo(path)  # nobody writes: a plain open() would wait forever
        start = time.monotonic()
        with pytest.raises(UserInputError, match=f"{what} .* is a FIFO \\(named pipe\\), not a regular file"):
            read(path)
        assert time.monotonic() - start < 1


def test_a_fifo_recipe_or_hostfile_exits_2_from_the_cli(write_recipe, tmp_path):
    os.mkfifo(tmp_path / "hosts")
    result = sdtrain("launch", write_recipe(), "--hostfile", tmp_path / "hosts", "--dry-run", timeout=60)
    assert result.returncode == 2 and "is a FIFO" in result.stderr and "Traceback" not in result.stderr
    os.mkfifo(tmp_path / "fifo.yaml")
    result = sdtrain("launch", tmp_path / "fifo.yaml", "--dry-run", timeout=60)
    assert result.returncode == 2 and "is a FIFO" in result.stderr and "Traceback" not in result.stderr


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    for what, path, read in readers(tmp_path):
        with path.open("wb") as f:
            f.truncate(2**31)  # sparse: 2 GiB that cost no disk
        tracemalloc.start()
        with pytest.raises(UserInputError, match=f"{what} .* is 2,147,483,648 bytes; a {what} is .* of at most"):
            read(path)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 2**20


def test_a_directory_is_refused_as_reading_it_says(tmp_path):
    with pytest.raises(HostfileError, match="cannot read hostfile .*: Is a directory"):
        read_hostfile(tmp_path)


def deep_yaml(depth: int) -> str:
    return "train: " + "[" * depth + "]" * depth + "\n"


def deep_json(depth: int) -> str:
    return '{"train_batch_size": 8, "x": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100_000])
def test_nesting_past_the_limit_is_one_line(tmp_path, depth):
    (tmp_path / "r.yaml").write_text(deep_yaml(depth))
    with pytest.raises(RecipeError, match=f"r.yaml line 1: nested deeper than {MAX_DEPTH} levels"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "ok.yaml").write_text("{}")
    with pytest.raises(RecipeError, match=f"--set train.lr line 1: nested deeper than {MAX_DEPTH} levels"):
        load_recipe(tmp_path / "ok.yaml", ["train.lr=" + "[" * depth + "]" * depth])
    (tmp_path / "ds.json").write_text(deep_json(depth))
    with pytest.raises(UserInputError, match=f"ds.json: nested deeper than {MAX_DEPTH} levels"):
        read_config(tmp_path / "ds.json")
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "x": ' + "[" * depth + "]" * depth + "}\n")
    with pytest.raises(UserInputError, match=f"metrics.jsonl line 2: nested deeper than {MAX_DEPTH} levels"):
        load_run(run)


def test_nesting_within_the_limit_parses():
    assert parse_yaml(deep_yaml(MAX_DEPTH - 1), "r") == {"train": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))}
    assert parse_json(deep_json(MAX_DEPTH - 1), "j")["train_batch_size"] == 8


def test_an_integer_past_the_limit_is_one_line(tmp_path):
    (tmp_path / "r.yaml").write_text(f"train:\n  steps: {HUGE_INT}\n")
    with pytest.raises(RecipeError, match="r.yaml line 2: an integer of 5,000 digits is past the limit of 32"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "ok.yaml").write_text("{}")
    with pytest.raises(RecipeError, match="--set train.seed line 1: an integer of 5,000 digits"):
        load_recipe(tmp_path / "ok.yaml", [f"train.seed={HUGE_INT}"])
    with pytest.raises(RecipeError, match="an integer of 5,002 digits"):  # hexadecimal is an integer too
        load_recipe(tmp_path / "ok.yaml", [f"train.seed=0x{HUGE_INT}"])
    (tmp_path / "ds.json").write_text(f'{{"train_batch_size": {HUGE_INT}}}')
    with pytest.raises(UserInputError, match="ds.json: an integer of 5,000 digits"):
        read_config(tmp_path / "ds.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(f'{{"step": {HUGE_INT}}}\n')
    with pytest.raises(UserInputError, match="metrics.jsonl line 1: an integer of 5,000 digits"):
        load_run(run)
    with pytest.raises(HostfileError, match="slots must be an integer from 1 to 1024"):
        parse_hostfile(f"w0 slots={HUGE_INT}\n")
    with pytest.raises(HostfileError, match="is not a non-negative integer below 1024"):
        parse_filter(f"w0:{HUGE_INT}", "--include")


def test_the_cli_says_one_line_for_a_huge_integer_and_deep_nesting(tmp_path):
    (tmp_path / "r.yaml").write_text(f"train:\n  steps: {HUGE_INT}\n")
    result = sdtrain("launch", tmp_path / "r.yaml", "--dry-run")
    assert result.returncode == 2 and "past the limit" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "ds.json").write_text(deep_json(100_000))
    result = sdtrain("import-deepspeed", tmp_path / "ds.json")
    assert result.returncode == 2 and "nested deeper" in result.stderr and "Traceback" not in result.stderr


def test_a_huge_host_range_is_refused_before_it_is_expanded():
    start = time.monotonic()
    with pytest.raises(HostfileError, match=r"'gpu\[0-99999999\]' names 100,000,000 hosts; a job runs on at most"):
        expand_hostlist("gpu[0-99999999]")
    with pytest.raises(HostfileError, match="names 1,000,000 hosts"):  # two small ranges multiply
        expand_hostlist("r[1-1000]n[1-1000]")
    assert time.monotonic() - start < 1
    with pytest.raises(HostfileError, match="is not a range like 01-16"):
        expand_hostlist(f"gpu[1-{HUGE_INT}]")
    with pytest.raises(HostfileError, match="'9-1' is not a range"):
        expand_hostlist("gpu[9-1]")
    assert expand_hostlist("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]
    assert expand_hostlist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]


def test_a_huge_slurm_nodelist_exits_2(write_recipe):
    result = sdtrain("launch", write_recipe(), "--launcher", "slurm", "--dry-run", timeout=60,
                     env={"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "gpu[0-99999999]", "SLURM_NNODES": "100000000"})
    assert result.returncode == 2 and "names 100,000,000 hosts" in " ".join(result.stderr.split()), result.stderr


# --- control characters in echoed input ---

ESC = "\x1b[2J\x1b[31m"  # clear the screen, then red


def test_printable_escapes_what_a_terminal_would_act_on():
    assert printable("a\x1b[31mb\nc\u202ed\x00 é") == "a\\x1b[31mb\\nc\\u202ed\\x00 é"


def test_control_characters_in_keys_hosts_and_paths_are_escaped(tmp_path, write_recipe):
    cases = []
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(), [f"train.st{ESC}eps=1"])
    cases.append(str(err.value))
    (tmp_path / "k.yaml").write_text('train:\n  "st\\e[2Jeps": 1\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(tmp_path / "k.yaml")
    cases.append(str(err.value))
    hosts = parse_hostfile("w0 slots=2\n")
    from sdtrain.launch.hostfile import select_resources

    with pytest.raises(HostfileError) as err:
        select_resources(hosts, include=f"w{ESC}1")
    cases.append(str(err.value))
    with pytest.raises(HostfileError) as err:
        parse_hostfile(f"w{ESC}0 slots=1\n")
    cases.append(str(err.value))
    with pytest.raises(UserInputError) as err:
        read_text(tmp_path / f"missing{ESC}", "recipe", 1024)
    cases.append(str(err.value))
    for message in cases:
        assert "\x1b" not in message and "\\x1b[2J" in message, message


def test_the_cli_prints_no_escape_sequence(write_recipe):
    result = sdtrain("launch", write_recipe(), "--set", f"train.st{ESC}eps=1", "--dry-run")
    assert result.returncode == 2 and "\x1b" not in result.stderr and "train.st\\x1b[2J" in result.stderr


# --- a run directory's metrics.jsonl, read again on resume (MetricsLog._truncate_after) ---

def _resume_metrics(run_dir, first_step: int = 5):
    from rich.console import Console

    from sdtrain.train.metrics import MetricsLog

    out = io.StringIO()
    MetricsLog(run_dir, Console(file=out, width=200), 10, first_step, tensorboard=False).close()
    return out.getvalue()


def test_a_fifo_or_huge_metrics_file_is_refused_on_resume(tmp_path):
    """read_text used to wait on a FIFO forever, and read a huge file whole."""
    os.mkfifo(tmp_path / "metrics.jsonl")
    with fails_after(30), pytest.raises(UserInputError, match="metrics file .* is a FIFO .*; move it out of the run"):
        _resume_metrics(tmp_path)
    os.unlink(tmp_path / "metrics.jsonl")
    with (tmp_path / "metrics.jsonl").open("wb") as f:
        f.truncate(2**31)  # sparse
    tracemalloc.start()
    with pytest.raises(UserInputError, match="metrics file .* is 2,147,483,648 bytes, past the"):
        _resume_metrics(tmp_path)
    assert tracemalloc.get_traced_memory()[1] < 2**20
    tracemalloc.stop()


def test_metrics_lines_are_read_within_bounds_on_resume(tmp_path):
    """A line of megabytes is dropped unread, and a file of broken lines is a few notes, not one per line."""
    records = [json.dumps({"step": step, "loss": 1.0}) for step in range(1, 9)]
    broken = ["{" * 5_000_000, *records[:6], *(["not json"] * 1000), *records[6:], '{"step": 9, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(broken))
    tracemalloc.start()
    notes = " ".join(_resume_metrics(tmp_path).split())
    assert tracemalloc.get_traced_memory()[1] < 4 * 2**20  # the 5 MB line never held whole
    tracemalloc.stop()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert notes.count("is not a whole metrics record") == 3 and "line 1 is not" in notes
    assert "999 more lines that are not metrics records: dropped" in notes
