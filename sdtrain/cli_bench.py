"""`sdtrain bench`: strategies and peers side by side, and `sdtrain bench comm`."""

from __future__ import annotations

import sys

import click
from rich.markup import escape

from sdtrain.cli_options import console, err_console, host_options, launcher_option, write_results
from sdtrain.errors import UserInputError


class BenchGroup(click.Group):
    """`sdtrain bench comm ...` is the collective bench; anything else is the strategy bench,
    as it always was (`sdtrain bench [RECIPE] [options]`), so no existing command changes."""

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.commands:
            args = ["strategies", *args]
        return super().parse_args(ctx, args)


@click.group(cls=BenchGroup)
def bench() -> None:
    """Measure: strategies and peers on a recipe (`sdtrain bench [RECIPE]`), or collectives (`sdtrain bench comm`)."""


@bench.command("strategies")
@click.argument("recipe", default="recipes/quickstart.yaml")
@click.option("--strategies", default="single,ddp", show_default=True,
              help="Comma-separated: single, ddp (= zero0), zero0, zero1, zero2, zero3; pipelines "
                   "pp<P>-<schedule>[-tp<T>][-zero<S>], e.g. pp2-1f1b, pp2-gpipe, pp2-interleaved, pp4-1f1b-zero1; "
                   "expert parallelism on an MoE recipe, ep<N>[-zero<S>], e.g. ep1, ep2, ep4; tensor parallelism "
                   "(sequence parallel unless -nosp), tp<T>[-nosp][-zero<S>], e.g. tp2, tp2-nosp, tp4-zero1.")
@click.option("--peers", default="",
              help="Comma-separated, run in the same invocation: torch, fsdp2, deepspeed, deepspeed-pipe, deepspeed-moe, "
                   "deepspeed-nvme (DeepSpeed's own NVMe offload, compared with zero3-nvme[-params]), "
                   "dtensor-tp (PyTorch's tensor parallelism over every worker, compared with tp<world>); eager, compile (one device); "
                   "plain (a llama recipe's model written plainly in PyTorch, in a DDP loop).")
@click.option("--nproc", default="2", show_default=True, help="Worker counts to measure at, e.g. 2,4.")
@click.option("--steps", default=30, show_default=True, help="Steps per run (the first 5 are warm-up).")
@click.option("--repeats", default=2, show_default=True, help="Alternating rounds; each entry keeps its best.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key.")
@click.option("--json", "json_file", help="Also write the results to this JSON file.")
@click.option("--plot", "plot_file", metavar="FILE.png", help="Also draw the table as bars, peers beside each strategy.")
@click.option("--allow-env-file-var", "allow_env_file_vars", multiple=True, metavar="NAME",
              help="As launch's: let .sdtrain_env set NAME for sdtrain's runs though it is guarded.")
def bench_strategies(recipe, strategies, peers, nproc, steps, repeats, overrides, json_file, plot_file,
                     allow_env_file_vars) -> None:
    """Measure strategies (and peers) on RECIPE side by side: tokens/s, memory, traffic, ratios.
    (`sdtrain bench comm --help`: the collective-communication bench.)"""
    from sdtrain.bench.run import run_bench
    from sdtrain.bench.table import bench_table

    split = lambda text: [item.strip() for item in text.split(",") if item.strip()]  # noqa: E731
    try:
        worlds = [int(n) for n in split(nproc)]
    except ValueError:
        raise UserInputError(f"--nproc {nproc!r}: give worker counts like 2 or 2,4") from None
    if not worlds or min(worlds) < 1:
        raise UserInputError(f"--nproc {nproc!r}: give worker counts like 2 or 2,4")
    if plot_file:
        from sdtrain.plot.backend import figure_class

        figure_class()  # no matplotlib: say so now, not after the whole bench has run
    from sdtrain.bench.entry_failure import BenchEntryFailed

    try:
        results = run_bench(recipe, split(strategies), split(peers), worlds, steps, repeats, list(overrides),
                            allow_env_file_vars, lambda text: err_console.print(text, style="bold yellow", markup=False,
                                                                                highlight=False))
    except BenchEntryFailed as exc:  # the failed run's root cause, as `sdtrain launch` ends one: exit 1
        err_console.print(f"[bold red]bench failed[/]: {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    console.print(bench_table(results))
    for note in results["notes"]:
        console.print(f"note: {note}", markup=False)
    from sdtrain.plot.bench import bench_figure

    write_results(results, json_file, plot_file, bench_figure)


@bench.command("comm")
@click.option("--nproc", type=click.IntRange(min=1), help="Workers on this machine (default: one per GPU, else 2).")
@host_options
@launcher_option
@click.option("--backend", type=click.Choice(["auto", "gloo", "nccl"]), default="auto", show_default=True,
              help="auto: NCCL on GPUs, gloo on CPU.")
@click.option("--ops", default="all", show_default=True, help="Comma-separated: " + ", ".join(
    ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv"]) + ", or all.")
@click.option("--sizes", default="1K..64M:4", show_default=True,
              help="Bytes per rank's buffer: 1K,64M or ranges 1K..1G (x2 steps), 1K..1G:4 (x4 steps).")
@click.option("--iters", type=click.IntRange(min=0), default=0, show_default=True,
              help="Timed runs per loop; 0: enough to move about 256 MB, 5 to 100.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed loops; the best is kept.")
@click.option("--json", "json_file", help="Also write the results to this JSON file.")
@click.option("--plot", "plot_file", metavar="FILE.png", help="Also draw bus bandwidth against size, one line per op.")
def bench_comm(nproc, launcher, backend, ops, sizes, iters, repeats, json_file, plot_file, **hosts) -> None:
    """Time and check collectives (as nccl-tests: algorithm and bus bandwidth) on the job's hosts."""
    from sdtrain.bench.comm import CommBenchFailed, run_comm_bench
    from sdtrain.bench.comm_spec import parse_ops, parse_sizes
    from sdtrain.bench.comm_table import comm_table, verdict
    from sdtrain.launch.placement import LaunchRequest

    op_list, size_list = parse_ops(ops), parse_sizes(sizes)  # bad input: exit 2 before anything starts
    if plot_file:
        from sdtrain.plot.backend import figure_class

        figure_class()  # no matplotlib: say so before the workers start
    try:
        result = run_comm_bench(LaunchRequest(launcher=launcher, **hosts), nproc, backend, op_list, size_list, iters, repeats)
    except CommBenchFailed as exc:
        err_console.print(f"[red]comm bench failed[/]: {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    console.print(comm_table(result))
    summary = verdict(result)
    if summary:
        console.print(summary, markup=False, highlight=False)
    from sdtrain.plot.comm import comm_figure

    write_results(result, json_file, plot_file, comm_figure)
    wrong = [f"{row['op']} {row['bytes']} bytes" for row in result["results"] if not row["correct"]]
    if wrong:
        err_console.print(f"[red]wrong results[/]: {escape(', '.join(wrong))}", highlight=False)
        sys.exit(1)
