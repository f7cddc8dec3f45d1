"""Bad input is exit 2 before anything starts, with a message that names the problem and
quotes at most a bounded excerpt of the input (issue 7, items 5-8)."""

import os
import signal
import tracemalloc
from contextlib import contextmanager

import pytest
from conftest import TINY, sdtrain
from sdtrain.bench.comm_spec import check_memory
from sdtrain.errors import DataError, UserInputError
from sdtrain.launch.exports import read_env_file
from sdtrain.recipe import DataConfig
from sdtrain.train.sources import check_source, load_corpus


def refused(result, *needles):
    """Exit 2, every needle in the message, and no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    text = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    for needle in needles:
        assert needle in text, text
    assert "Traceback" not in text
    return text


# --- data: the launcher decides exactly as the workers do (item 5) ---

def test_data_the_workers_would_refuse_is_refused_before_launch(write_recipe, tmp_path):
    """2 x (seq_len + 1) bytes passed the launcher's old check, then every worker died."""
    seq_len = TINY["model"]["seq_len"]
    text = tmp_path / "short.txt"
    text.write_text("x" * (2 * (seq_len + 1)))
    recipe = write_recipe({"data": {"source": str(text)}})
    refused(sdtrain("launch", recipe, "--run-dir", tmp_path / "run"), "too little for seq_len 32")
    assert not (tmp_path / "run").exists()
    text.write_text("x" * (2 * (seq_len + 2)))  # the smallest corpus that has both windows
    assert load_corpus(DataConfig(source=str(text)), seq_len).val.size == seq_len + 2


@pytest.mark.parametrize("name, line", [("big.txt", None), ("big.jsonl", '{"text": "%s"}\n')])
def test_max_bytes_bounds_what_is_read(tmp_path, name, line):
    """A 1 GiB file with max_bytes 4096 costs kilobytes, not a gigabyte (sparse: no disk used)."""
    path = tmp_path / name
    with path.open("wb") as f:
        if line:
            f.write((line % ("y" * 5000)).encode() * 4)
        f.truncate(2**30)
    tracemalloc.start()
    corpus = load_corpus(DataConfig(source=str(path), max_bytes=4096), seq_len=16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert corpus.train.size + corpus.val.size <= 4096
    assert peak < 4 * 2**20


def test_a_line_longer_than_the_bound_is_refused(tmp_path):
    path = tmp_path / "one-line.jsonl"
    path.write_text('{"text": "' + "z" * (4 * 4096 + 2**20 + 10) + '"}\n')
    with pytest.raises(DataError, match="one-line.jsonl:1: the line is longer than"):
        check_source(DataConfig(source=str(path), max_bytes=4096), 16, 256)


# --- data.source that is not a regular file (issue 19) ---

@contextmanager
def fails_after(seconds: int):
    """A hang becomes a test failure: SIGALRM interrupts a blocked open() or read()."""
    def hung(signum, frame):
        raise AssertionError(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("layout", ["corpus.txt", "corpus.jsonl", "tokens.bin", "folder/part.txt", "bins/train.bin"])
def test_a_fifo_as_data_is_refused_not_waited_on(tmp_path, layout):
    """Nobody writes to the FIFO: a plain open() would wait forever, on the launcher and every rank."""
    fifo = tmp_path / layout
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    source = fifo if fifo.parent == tmp_path else fifo.parent
    with fails_after(10), pytest.raises(DataError, match=f"{fifo.name} is a FIFO \\(named pipe\\), not a regular file"):
        check_source(DataConfig(source=str(source)), 16, 1000)


def test_a_device_as_data_is_refused_not_read(tmp_path):
    """/dev/zero would be read to max_bytes of zeros and trained on without a word."""
    with pytest.raises(DataError, match="data.source /dev/zero is a character device, not a regular file"):
        check_source(DataConfig(source="/dev/zero", format="text"), 16, 256)


def test_a_fifo_as_data_exits_2_from_launch(write_recipe, tmp_path):
    os.mkfifo(tmp_path / "corpus.txt")
    recipe = write_recipe({"data": {"source": str(tmp_path / "corpus.txt")}})
    refused(sdtrain("launch", recipe, "--run-dir", tmp_path / "run", timeout=60),
            "corpus.txt is a FIFO (named pipe), not a regular file")
    assert not (tmp_path / "run").exists()


# --- files that are not UTF-8 (item 7) ---

def test_non_utf8_recipe(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(b"name: tiny\n# caf\xe9\n")
    refused(sdtrain("launch", recipe, "--dry-run"), "latin1.yaml line 2 is not UTF-8", "0xe9")


def test_non_utf8_hostfile(write_recipe, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_bytes(b"w0 slots=1\nw\xff1 slots=1\n")
    refused(sdtrain("launch", write_recipe(), "--hostfile", hostfile, "--dry-run"), "hosts line 2 is not UTF-8")


def test_non_utf8_env_file(tmp_path):
    env_file = tmp_path / ".sdtrain_env"
    env_file.write_bytes(b"A=1\nB=\xc3\n")
    with pytest.raises(UserInputError, match=r"\.sdtrain_env line 2 is not UTF-8"):
        read_env_file(env_file)


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"ok\n" * 40 + b"bad \xff byte\n" + b"ok\n" * 40, "notes.txt line 41 is not UTF-8"),
    ("d.jsonl", b'{"text": "ok"}\n{"text": "\xfe"}\n', "d.jsonl line 2 is not UTF-8"),
])
def test_non_utf8_data(write_recipe, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    recipe = write_recipe({"data": {"source": str(tmp_path / name)}, "model": {"seq_len": 8}})
    refused(sdtrain("launch", recipe, "--dry-run"), message)


def test_max_bytes_cutting_a_character_in_two_is_not_an_error(tmp_path):
    path = tmp_path / "utf8.txt"
    path.write_text("é" * 3000)  # 2 bytes each: 4095 falls inside one
    corpus = load_corpus(DataConfig(source=str(path), max_bytes=4095), seq_len=16)
    assert corpus.train.size + corpus.val.size == 4094


# --- YAML that expands without bound, huge excerpts (item 7) ---

def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]  # 9^9 values
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    refused(sdtrain("launch", recipe, "--dry-run", timeout=30), "expands to more than 10,000 values")


def test_messages_quote_a_bounded_excerpt(write_recipe):
    recipe = write_recipe({"name": "x" * 100_000})
    text = refused(sdtrain("launch", recipe, "--dry-run"), "name:", "...")
    assert len(text) < 2000


def test_oversized_recipe(tmp_path):
    recipe = tmp_path / "huge.yaml"
    recipe.write_text("# padding\n" * 200_000)
    refused(sdtrain("launch", recipe, "--dry-run"), "a recipe is YAML of at most")


# --- values of the wrong kind (item 8) ---

@pytest.mark.parametrize("override, message", [
    ("train.steps=true", "train.steps: Input should be a valid integer (got True)"),
    ("train.lr=.inf", "train.lr: Input should be a finite number"),
    ("train.lr=.nan", "train.lr: Input should be a finite number"),
    ("train.seed=18446744073709551616", "train.seed: Input should be less than or equal to 9223372036854775807"),
    ("checkpoint.at_end=1", "checkpoint.at_end: Input should be a valid boolean"),
    ("log.every=2.5", "log.every: Input should be a valid integer"),
])
def test_values_of_the_wrong_kind(write_recipe, override, message):
    refused(sdtrain("launch", write_recipe(), "--set", override, "--dry-run"), message)


def test_scientific_notation_is_a_number(write_recipe):
    """YAML 1.1 reads 3e-4 as a string; strict numbers would refuse it, so the loader reads a float."""
    recipe = write_recipe({"train": {"lr": "LR"}})
    recipe.write_text(recipe.read_text().replace("LR", "3e-4"))
    result = sdtrain("launch", recipe, "--dry-run", "--json", "--set", "train.peak_flops=1e12")
    assert result.returncode == 0, result.stderr
    assert '"lr": 0.0003' in result.stdout and '"peak_flops": 1000000000000.0' in result.stdout


def test_absurd_worker_counts(write_recipe):
    refused(sdtrain("launch", write_recipe(), "--nproc-per-node", "100000", "--dry-run"), "at most 1024")
    result = sdtrain("launch", write_recipe({"train": {"global_batch_size": 128}}), "--nproc-per-node", "64", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "64 CPU workers on" in " ".join(result.stderr.split())


# --- markup characters in user strings (item 8) ---

def test_brackets_in_paths_are_printed_not_parsed(write_recipe, tmp_path):
    odd = tmp_path / "run [/] [bold]x[/bold]"
    result = sdtrain("launch", write_recipe(), "--run-dir", odd, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "[bold]x[/bold]" in result.stdout
    result = sdtrain("launch", write_recipe({"train": {"steps": 2}, "checkpoint": {"at_end": True}}), "--run-dir", odd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (odd / "summary.json").is_file() and "[bold]x[/bold]" in result.stdout


@pytest.mark.parametrize("addr", ["-oProxyCommand=x", "a b", "host,other"])
def test_master_addr_must_be_a_host(write_recipe, addr):
    refused(sdtrain("launch", write_recipe(), "--master-addr", addr, "--dry-run"), "--master-addr")



# --- bench comm sizes that cannot fit (issue 19) ---

def test_comm_sizes_past_memory_exit_2_before_launch():
    """16G buffers on 8 gloo ranks are ~900 GiB: refused at once, not an OOM kill minutes in."""
    result = sdtrain("bench", "comm", "--sizes", "1K,16G", "--nproc", "8", "--backend", "gloo", timeout=60)
    text = refused(result, "--sizes up to 16G: 8 rank(s) on this machine hold about 7 buffers", "GiB available")
    assert "use --sizes up to" in text


def test_comm_memory_check_names_the_largest_size_that_fits():
    check_memory([2**30], ranks=2, available_bytes=14 * 2**30)  # 14 GiB needed, 14 there: fits
    with pytest.raises(UserInputError, match="14.0 GiB, and this machine has 13.0 GiB available; use --sizes up to 512M"):
        check_memory([2**20, 2**30], ranks=2, available_bytes=13 * 2**30)
    with pytest.raises(UserInputError, match="use fewer ranks"):
        check_memory([2**10], ranks=1024, available_bytes=2**20)
