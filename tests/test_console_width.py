"""Every table sdtrain prints is readable at 80 columns and when piped (rich then assumes
80): no line wider than the console, no value cut to "…" — long values wrap, wide tables
are dealt into parts that repeat the row's key, or stack one row per table."""

import json
import re

from rich.console import Console

from conftest import REPO, sdtrain
from sdtrain.bench.comm_table import comm_table
from sdtrain.bench.table import bench_table
from sdtrain.console_table import FoldingColumn, FoldingTable
from sdtrain.estimate.terms import ALWAYS, STEP_FB, Estimate, Term
from sdtrain.estimate.table import estimate_table
from sdtrain.launch.plan import Node
from sdtrain.launch.preflight import FAIL, PASS, HostReport, preflight_table
from sdtrain.train.metrics import fit_width, step_line
from sdtrain.train.summary import summary_table

HOST = "worker-node-with-a-long-name-0001.cluster.example.internal"


def rendered(renderable, width=80) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def assert_fits(text: str, width=80) -> None:
    for line in text.splitlines():
        assert len(line) <= width and "…" not in line, f"{len(line)}: {line}"


def words(text: str) -> str:
    """The text without table rules and padding: what a reader sees, cell by cell."""
    return " ".join(re.sub(r"[│┃┏┓┗┛┡┩┣┫╇╈┳┻━─┼┬┴┌┐└┘├┤]", " ", text).split())


def bench_row(name, kind, world, **extra):
    row = {"name": name, "kind": kind, "world_size": world, "step_s": 0.123, "tokens_per_s": 123456.7, "mfu": 0.4123,
           "peak_mem_gib": [1.23] * world, "model_state_bytes": [123456789] * world, "comm_bytes_per_step": 987654321}
    return {**row, **extra}


def test_the_bench_table_at_80_columns_keeps_every_number_whole():
    results = {"recipe": "bench-pipeline", "precision": "bf16", "steps": 30, "repeats": 3, "results": [
        bench_row("zero3", "sdtrain", 8, **{"vs_torch-fsdp2": 1.02, "vs_deepspeed-z3": 1.31}),
        bench_row("pipeline-1f1b", "sdtrain", 4, bubble=0.31, bubble_replayed=0.25, bubble_formula=0.2),
        bench_row("deepspeed-moe", "peer", 4, all_to_all_share=0.22, mfu=None, step_s=None)]}
    text = rendered(bench_table(results))
    assert_fits(text)
    for value in ("123,457", "41.2%", "0.310", "0.250", "0.200", "0.220", "117.7", "941.9", "deepspeed-z3 1.31"):
        assert value in text, value
    # every part of the dealt-out table is led by the run's name
    assert text.count("pipeline-1f1b") == text.count("┃ run ") >= 2
    wide = rendered(bench_table(results), width=250)
    assert wide.count("┃ run ") == 1 and "1.23, 1.23, 1.23, 1.23, 1.23, 1.23, 1.23, 1.23" in wide


def test_the_comm_table_at_80_columns():
    rows = [{"op": op, "bytes": 2**30, "iters": 20, "time_us": 1234567.8, "algbw_gbps": 123.456, "busbw_gbps": 234.567,
             "correct": op != "broadcast", "wrong_ranks": [3, 7], "plain_busbw_gbps": 200.0, "vs_plain": 1.17}
            for op in ("all_reduce", "broadcast", "all_to_all")]
    text = rendered(comm_table({"backend": "nccl", "device": "NVIDIA H200", "world_size": 16, "nodes": 2,
                                "repeats": 5, "results": rows}))
    assert_fits(text)
    assert "1,234,567.8" in text and "234.567" in words(text) and "NO (ranks 3, 7)" in words(text)


def test_the_estimate_table_wraps_its_explanations():
    terms = [Term("activations", 13.594 * 2**30, STEP_FB,
                  "12 blocks x 12 values/token/channel, flash attention, x 1 micro-batch(es)"),
             Term("optimizer state", 0.927 * 2**30, ALWAYS, "8Ψ: fp32 Adam moments")]
    text = rendered(estimate_table(Estimate(terms), "the recipe's step on 8 CPU rank(s): every rank"))
    assert_fits(text)
    assert "13.594" in text and "flash attention, x 1 micro-batch(es)" in words(text)


def test_preflight_stacks_each_host_at_80_columns():
    report = HostReport(Node(HOST, (0, 1, 2, 3), 1))
    report.check("ssh", PASS, "reachable in 0.21 s")
    report.check("torch", FAIL, "2.4.1+cu121, the launcher has 2.13.0+cpu", "install the same torch")
    report.check("memory", PASS, "123.4 GiB free / 4 slots = 30.85 GiB per rank; estimate 12.34 GiB fits")
    text = rendered(preflight_table([report]))
    assert_fits(text)
    assert HOST in text and "estimate 12.34 GiB fits" in words(text) and "2.13.0+cpu" in text


def test_the_summary_wraps_a_long_path_and_many_ranks():
    summary = {"name": "gpt2-124m", "steps": 300, "world_size": 64, "first_step": 200, "final_loss": 3.05,
               "eval_losses": [[0, 5.28], [300, 2.9]], "tokens_per_s": 1234567.0, "mfu": 0.41,
               "peak_mem_gib": [12.34] * 64, "train_s": 12.3, "means": {"moe_dropped": 0.012, "bubble": 0.31},
               "checkpoint": "/very/long/shared/filesystem/path/of/the/team/runs/gpt2-124m/checkpoints/step_300"}
    text = rendered(summary_table(summary))
    assert_fits(text)
    assert "step_300" in words(text).replace(" ", "") and "1,234,567 on 64 ranks" in text
    assert "dropped" in text and "1.2% (mean)" in text and "31.0% (mean)" in text


def test_step_lines_wrap_between_their_parts():
    record = {"step": 1000, "loss": 3.7184, "eval_loss": 3.4998, "lr": 1.82e-3, "grad_norm": 2.32, "step_s": 0.341,
              "tokens_per_s": 1234567, "mfu": 0.412, "moe_dropped": 0.0123, "moe_all_to_all_share": 0.23, "bubble": 0.31}
    lines = fit_width(step_line(record, 10000), 80)
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines), lines
    assert lines[0].startswith("step 1000/10000: loss 3.7184") and lines[1].startswith("    ")
    text = " ".join(lines)
    for part in ("lr 1.82e-03", "gnorm 2.32", "0.341 s/step", "1,234,567 tok/s", "MFU 41.2%", "dropped 1.2%",
                 "all-to-all 23.0%", "bubble 31.0%"):
        assert part in text, part
    plain = {"step": 100, "loss": 3.7184, "lr": 1.82e-3, "grad_norm": 2.32, "step_s": 0.341, "tokens_per_s": 12010}
    assert len(fit_width(step_line(plain, 300), 80)) == 1  # a dense run's line fits on one


def test_a_folding_table_is_one_table_where_it_fits():
    table = FoldingTable("run [red]x[/red]", [FoldingColumn("a"), FoldingColumn("b", wraps=True)])
    table.add_row("x[bold]", "y")  # data, not markup
    text = rendered(table)
    assert text.count("┏") == 1 and "x[bold]" in text and "run [red]x[/red]" in " ".join(text.split())
    table.stack_when_narrow = True
    table.add_row("host[/]", "a value " * 20)
    text = rendered(table, width=40)
    assert_fits(text, 40)
    assert text.count("┌") == 2 and "run [red]x[/red]: host[/]" in text


def test_dry_run_placement_at_80_columns(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{HOST} slots=4\n{HOST.replace('0001', '0002')} slots=4\n")
    result = sdtrain("launch", REPO / "recipes" / "pipeline.yaml", "--hostfile", hostfile, "--dry-run",
                     env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    tables = result.stdout[result.stdout.index("placement"):result.stdout.index("\nnode 0 (")]
    assert_fits(tables)  # the commands after it are one line each, to copy as they are
    assert "worker-node-with-a-long-name-0002.cluste" in tables and "pipeline" in tables
    assert f"master{HOST}:29500" in "".join(words(tables).split())  # two nodes meet at node 0's address


def test_a_one_node_dry_run_says_its_rendezvous_listens_nowhere(tmp_path):
    """One node keeps its rendezvous in private files (listen.py): the title shows no master
    address, where nothing would listen; --json keeps master_addr and master_port (a contract)."""
    args = ("launch", REPO / "recipes" / "quickstart.yaml", "--nproc-per-node", 2, "--run-dir", tmp_path / "run", "--dry-run")
    result = sdtrain(*args, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    tables = words(result.stdout[result.stdout.index("placement"):result.stdout.index("\nnode 0 (")])
    assert tables.startswith("placement: world size 2, rendezvous: private file store, backend gloo"), tables
    assert "master" not in tables
    plan = json.loads(sdtrain(*args, "--json").stdout)
    assert plan["master_addr"] == "127.0.0.1" and isinstance(plan["master_port"], int)


def test_dry_run_recipe_keeps_a_long_data_path_whole(tmp_path):
    """rich's Syntax cuts a line at the console's edge without a mark; the recipe wraps instead."""
    folder = tmp_path / "a-rather-long-folder-name-for-the-team-datasets" / "2026-12-04" / "tokenized-corpus-v2"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text((REPO / "README.md").read_text())
    result = sdtrain("launch", REPO / "recipes" / "quickstart.yaml", "--set", f"data.source={folder / 'train.txt'}",
                     "--dry-run", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    recipe = result.stdout[:result.stdout.index("\nbatch")]
    assert_fits(recipe)
    assert str(folder / "train.txt") in "".join(line.strip() for line in recipe.splitlines())


def test_a_failure_title_too_long_for_its_box_is_printed_whole_above_it():
    """rich cuts a panel title wider than the box to '…': a host name or '(injected)' lost."""
    from sdtrain.launch.report import print_red_panel

    title = f"root cause: rank 3 on {HOST} (local rank 1, pid 4242) exit code 1 (injected)"
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    print_red_panel(console, title, "RuntimeError: fault injected")
    text = console.export_text()
    assert_fits(text)
    assert title in words(text) and "RuntimeError: fault injected" in text
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    print_red_panel(console, "root cause: rank 0", "boom")
    assert console.export_text().splitlines()[0].startswith("╭─ root cause: rank 0 ")  # a short one stays in the box
