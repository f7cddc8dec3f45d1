"""`sdtrain plot` and `sdtrain bench --plot`: figures checked through their axes and legends
before they are saved, and the PNGs the real command writes."""

import json

import pytest
import yaml

from conftest import sdtrain
from sdtrain.errors import UserInputError
from sdtrain.plot.bench import bench_figure
from sdtrain.plot.comm import comm_figure
from sdtrain.plot.run_data import load_runs
from sdtrain.plot.runs import runs_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder, steps=10, extra=None, eval_every=5, recipe=True):
    """A run directory as the trainer leaves it: metrics.jsonl and the resolved recipe.yaml."""
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 5.0 / step, "lr": 1e-3, "grad_norm": 1.0 / step, "tokens_per_s": 1000.0 + step,
               "mfu": None, "mem_gib": 0.5, "elapsed_s": float(step)}
        if step % eval_every == 0:
            row["eval_loss"] = 5.5 / step
        row.update(extra or {})
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if recipe:
        (folder / "recipe.yaml").write_text(yaml.safe_dump({"name": folder.name, "model": {"seq_len": 32},
                                                            "train": {"global_batch_size": 8}}))
    return folder


def axes_by_title(figure):
    return {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}


def legend_labels(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_runs_figure_has_every_panel_and_every_run_named(tmp_path):
    write_run(tmp_path / "zero2")
    write_run(tmp_path / "ddp", steps=6)
    figure = runs_figure(load_runs([tmp_path / "zero2", tmp_path / "ddp"]))
    axes = axes_by_title(figure)
    assert set(axes) == {"loss against step", "loss against tokens", "throughput", "memory", "gradient norm"}
    assert legend_labels(axes["loss against step"]) == ["zero2", "zero2 eval", "ddp", "ddp eval"]
    assert axes["loss against tokens"].get_xlabel() == "tokens" and axes["loss against step"].get_xlabel() == "step"
    assert axes["throughput"].get_ylabel() == "tokens/s" and legend_labels(axes["throughput"]) == ["zero2", "ddp"]
    assert legend_labels(axes["memory"]) == ["zero2", "ddp"] and legend_labels(axes["gradient norm"]) == ["zero2", "ddp"]
    # Tokens are steps x global batch x seq_len (8 x 32) from each run's recipe.yaml.
    line = axes["loss against tokens"].get_lines()[0]
    assert list(line.get_xdata())[:2] == [256, 512]


def test_bubble_and_all_to_all_panels_appear_when_a_run_has_them(tmp_path):
    """The keys the trainer itself writes (pipeline.py's log_metrics, expert_parallel.py's moe_metrics)."""
    write_run(tmp_path / "pipe", extra={"bubble": 0.25, "bubble_formula": 0.2, "bubble_per_stage": [0.2, 0.3]})
    write_run(tmp_path / "moe", extra={"moe_all_to_all_share": 0.1, "moe_dropped": 0.02, "moe_aux_loss": 1.0})
    write_run(tmp_path / "peer", extra={"a2a_share": 0.3})  # another tool's name for it
    write_run(tmp_path / "plain")
    axes = axes_by_title(runs_figure(load_runs([tmp_path / "peer", tmp_path / "plain"])))
    assert legend_labels(axes["all-to-all share"]) == ["peer"]
    axes = axes_by_title(runs_figure(load_runs([tmp_path / name for name in ("pipe", "moe", "peer", "plain")])))
    assert legend_labels(axes["pipeline bubble"]) == ["pipe"] and legend_labels(axes["MoE dropped tokens"]) == ["moe"]
    assert legend_labels(axes["all-to-all share"]) == ["moe"]
    assert "bubble" in axes["pipeline bubble"].get_ylabel()
    assert list(axes["pipeline bubble"].get_lines()[0].get_ydata())[:1] == [0.25]  # `bubble`, not its formula


def test_plot_command_writes_a_png(tmp_path):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", recipe=False)  # no recipe.yaml: on the step axes only, with a note
    out = tmp_path / "runs.png"
    result = sdtrain("plot", tmp_path / "a", tmp_path / "b", "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 10_000
    assert "b: no recipe.yaml" in result.stderr


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.mkdir(), "has no metrics.jsonl"),
    (lambda p: None, "is not a run directory"),
    (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("")), "is empty"),
    (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text('{"step": 1}\n{oops\n')), "line 2 is not JSON"),
])
def test_run_dirs_without_metrics_exit_2(tmp_path, make, expected):
    run = tmp_path / "run"
    make(run)
    result = sdtrain("plot", run, "--out", tmp_path / "x.png")
    assert result.returncode == 2 and expected in result.stderr.replace("\n", " ")
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_one_line_and_exit_2(tmp_path):
    """A Python where `import matplotlib` fails (a package of that name that raises first on the path)."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    write_run(tmp_path / "a")
    result = sdtrain("plot", tmp_path / "a", "--out", tmp_path / "x.png", env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert result.returncode == 2
    assert result.stderr.strip() == "error: plots need matplotlib: pip install 'sdtrain[plot]'"


BENCH = {
    "recipe": "bench-20m", "precision": "fp32", "steps": 15, "repeats": 2, "notes": [],
    "results": [
        {"name": "single", "kind": "sdtrain", "world_size": 1, "zero_stage": 0, "tokens_per_s": 1200.0, "peak_mem_gib": [0.9]},
        {"name": "zero2", "kind": "sdtrain", "world_size": 2, "zero_stage": 2, "tokens_per_s": 900.0, "peak_mem_gib": [0.6, 0.61]},
        {"name": "zero3", "kind": "sdtrain", "world_size": 2, "zero_stage": 3, "tokens_per_s": 800.0, "peak_mem_gib": [0.5, 0.5]},
        {"name": "fsdp2-keep", "kind": "peer", "world_size": 2, "zero_stage": 2, "tokens_per_s": 790.0, "peak_mem_gib": [0.7, 0.7]},
        {"name": "fsdp2-reshard", "kind": "peer", "world_size": 2, "zero_stage": 3, "tokens_per_s": 700.0, "peak_mem_gib": [0.6, 0.6]},
        {"name": "deepspeed-z2", "kind": "peer", "world_size": 2, "zero_stage": 2, "tokens_per_s": 720.0, "peak_mem_gib": [0.8, 0.8]},
        {"name": "deepspeed-z3", "kind": "peer", "world_size": 2, "zero_stage": 3, "tokens_per_s": 640.0, "peak_mem_gib": [0.7, 0.7]},
    ],
}


def test_bench_figure_puts_peers_beside_each_strategy():
    top, bottom = bench_figure(BENCH).axes
    assert [t.get_text() for t in top.get_xticklabels()] == ["single\n1 rank", "zero2\n2 ranks", "zero3\n2 ranks"]
    assert legend_labels(top) == ["sdtrain", "fsdp2", "deepspeed"] == legend_labels(bottom)
    assert top.get_ylabel() == "tokens/s" and "memory" in bottom.get_ylabel()
    heights = [bar.get_height() for bar in top.patches]
    assert heights == [1200.0, 900.0, 790.0, 720.0, 800.0, 700.0, 640.0]  # each strategy, then its peers
    assert [bar.get_height() for bar in bottom.patches][:2] == [0.9, 0.61]  # the largest rank's peak


def test_bench_plot_needs_matplotlib_before_it_runs(tmp_path, write_recipe):
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    result = sdtrain("bench", write_recipe(), "--plot", tmp_path / "b.png", env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert result.returncode == 2 and "pip install 'sdtrain[plot]'" in result.stderr


def test_unknown_plot_format_exits_2(tmp_path):
    write_run(tmp_path / "a")
    result = sdtrain("plot", tmp_path / "a", "--out", tmp_path / "x.nope")
    assert result.returncode == 2 and "cannot write" in result.stderr


def test_load_runs_names_apart_runs_of_the_same_name(tmp_path):
    write_run(tmp_path / "one" / "run")
    write_run(tmp_path / "two" / "run")
    assert [r.name for r in load_runs([tmp_path / "one" / "run", tmp_path / "two" / "run"])] == ["one/run", "two/run"]
    with pytest.raises(UserInputError):
        load_runs([tmp_path / "three"])


def test_comm_figure_has_a_line_per_op_and_the_plain_loop():
    rows = [{"op": op, "bytes": size, "busbw_gbps": 0.1 * size / 1024} for op in ("all_reduce", "broadcast")
            for size in (1024, 4096)]
    for row in rows[:2]:
        row["plain_busbw_gbps"] = row["busbw_gbps"] * 1.1
    (ax,) = comm_figure({"backend": "gloo", "world_size": 2, "nodes": 1, "results": rows}).axes
    assert legend_labels(ax) == ["all_reduce", "all_reduce, plain torch.distributed loop", "broadcast"]
    assert ax.get_xlabel() == "message size, bytes per rank" and ax.get_ylabel() == "bus bandwidth, GB/s"
    assert list(ax.get_lines()[0].get_xdata()) == [1024, 4096]
