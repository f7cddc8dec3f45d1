"""`sdtrain plan`: every layout of a recipe over a cluster, predicted and ranked (sdtrain/plan/)."""

from __future__ import annotations

import json
import time

import click
from rich.markup import escape

from sdtrain.cli_options import console, err_console
from sdtrain.errors import UserInputError, printable

DEFAULT_TOP = 10


def global_batch_of(recipe, world: int) -> int:
    """The recipe's global batch: given, or what its micro-batch and accumulation make at `world`."""
    train = recipe.train
    if train.global_batch_size:
        return train.global_batch_size
    from sdtrain.batch import derive_batch
    from sdtrain.parallel.layout import Layout

    return derive_batch(None, train.micro_batch_size, train.grad_accum_steps, Layout.of(recipe, world).dp).global_batch


def cluster_for(recipe, recipe_path: str, flags: dict, cluster_file: str | None, nproc: int | None,
                hostfile: str | None, remeasure: bool):
    from sdtrain.plan.cluster import cluster_from_flags, cluster_from_yaml

    given = cluster_from_flags(flags)
    if sum(x is not None for x in (given, cluster_file, nproc or hostfile)) > 1:
        raise UserInputError("give the cluster one way: the six --gpus ... flags, --cluster FILE, or "
                             "--nproc-per-node / --hostfile to measure this machine")
    if given is not None:
        return given
    if cluster_file:
        return cluster_from_yaml(cluster_file)
    if hostfile:
        from sdtrain.launch.hostfile import read_hostfile

        slots = list(read_hostfile(hostfile).values())
        if len(set(slots)) != 1:
            raise UserInputError(f"hostfile {printable(hostfile)}: the planner needs the same slots on every host, "
                                 f"got {slots}")
        if len(slots) > 1:
            raise UserInputError(f"hostfile {printable(hostfile)} lists {len(slots)} hosts: bandwidth across nodes is "
                                 "not measured from here; describe the cluster with --gpus ... --inter-node-gbps "
                                 "(or --cluster FILE)")
        nproc = slots[0]
    if nproc is None:
        launch_nproc = recipe.launch.nproc_per_node
        nproc = launch_nproc if isinstance(launch_nproc, int) else 1
    from sdtrain.plan.measure import measure_cluster

    err_console.print(f"measuring this machine for {nproc} worker(s) (cached after the first time) ...", highlight=False)
    return measure_cluster(recipe, recipe_path, nproc, remeasure)


def table(rows, cluster, limit: int) -> None:
    from sdtrain.console_table import FoldingColumn, FoldingTable

    columns = ("#", "layout", "step s", "tokens/s", "MFU", "GiB/rank")
    out = FoldingTable(f"sdtrain plan: {cluster.describe()}",
                       [FoldingColumn(c, "left" if c == "layout" else "right") for c in columns], key_columns=2)
    for i, row in enumerate(rows[:limit], 1):
        out.add_row(str(i), row.name, f"{row.time.seconds:.4g}", f"{row.time.tokens_per_s:,.0f}",
                    f"{row.time.mfu:.1%}", f"{row.memory.device_bytes / 2**30:.2f}")
    console.print(out)


@click.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, as launch does.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), help="Plan for this machine with N workers (measured).")
@click.option("-H", "--hostfile", help="Plan for this machine's slots in a one-host hostfile (measured).")
@click.option("--gpus", type=click.IntRange(min=1), help="A cluster given, not measured: its devices ...")
@click.option("--gpus-per-node", type=click.IntRange(min=1), help="... devices per node ...")
@click.option("--device-memory-gib", type=float, help="... memory per device, GiB ...")
@click.option("--peak-tflops", type=float, help="... peak TFLOP/s per device in the recipe's precision ...")
@click.option("--intra-node-gbps", type=float, help="... bus bandwidth inside a node, GB/s ...")
@click.option("--inter-node-gbps", type=float, help="... and across nodes per device, GB/s (all six together).")
@click.option("--cluster", "cluster_file", help="A cluster YAML instead: the six flags' names as keys, and more.")
@click.option("--top", type=click.IntRange(min=1), help=f"Layouts shown (default {DEFAULT_TOP}; --json: all).")
@click.option("--margin", type=click.FloatRange(min=0.0, max=0.9), default=0.10, show_default=True,
              help="Share of each rank's memory a layout must leave free to count as fitting.")
@click.option("--json", "as_json", is_flag=True, help="Print the layouts as a JSON list.")
@click.option("--explain", "explain_name", metavar="LAYOUT", help="Print one layout's terms, e.g. pp2-tp1-dp2-z3-mb4-ac0.")
@click.option("--write", "write_out", metavar="OUT.yaml", help="Write the first layout (or --explain's) as a recipe.")
@click.option("--force", is_flag=True, help="Overwrite --write's file if it exists.")
@click.option("--verify", "verify_k", type=click.IntRange(min=1), help="Launch the top K and a few more; predicted beside measured.")
@click.option("--verify-steps", type=click.IntRange(min=3), default=6, show_default=True, help="Steps of each verify run.")
@click.option("--verify-rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="Launch every verified layout this many times, round after round (as bench alternates); "
                   "each keeps its fastest step and largest peak.")
@click.option("--verify-dir", default="runs/plan-verify", show_default=True, help="Where the verify runs go.")
@click.option("--remeasure", is_flag=True, help="Measure this machine again instead of reading the cache.")
def plan(recipe, overrides, nproc_per_node, hostfile, cluster_file, top, margin, as_json, explain_name, write_out,
         force, verify_k, verify_steps, verify_rounds, verify_dir, remeasure, **flags) -> None:
    """Every layout of RECIPE's model and global batch over a cluster (pp x tp x dp x ep, ZeRO
    stage, offload, micro-batch, activation checkpointing, pipeline schedule), with memory per
    rank from the estimate and a predicted step time; ranked by tokens/s among those that fit.
    The cluster is this machine, measured (cached), unless given by flags or --cluster."""
    from sdtrain.plan.candidate import parse_name
    from sdtrain.plan.rank import find, plan_layouts
    from sdtrain.recipe import load_recipe

    base = load_recipe(recipe, list(overrides), layout_checked_at_launch=True)
    cluster = cluster_for(base, recipe, flags, cluster_file, nproc_per_node, hostfile, remeasure)
    global_batch = global_batch_of(base, cluster.gpus)
    chosen_name = parse_name(explain_name, global_batch).name if explain_name else None
    started = time.perf_counter()
    rows = plan_layouts(base, cluster, global_batch, margin)
    elapsed = time.perf_counter() - started
    fitting = [r for r in rows if r.fits]
    chosen = find(rows, chosen_name) if chosen_name else (fitting[0] if fitting else None)
    if chosen_name and chosen is None:
        raise UserInputError(f"--explain {chosen_name}: no such layout of {cluster.gpus} ranks (pp x tp x dp must be "
                             f"{cluster.gpus}); `sdtrain plan {printable(recipe)}` lists them")
    if write_out:
        from sdtrain.plan.write import write_recipe

        if chosen is None:
            raise UserInputError(f"no layout fits {cluster.describe()}: nothing to write; add ranks or memory")
        write_recipe(chosen, cluster, recipe, write_out, force)
        err_console.print(f"wrote {escape(printable(write_out))}: layout {chosen.name}", highlight=False)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in (rows[:top] if top else rows)]))
    elif explain_name:
        from sdtrain.plan.explain import explain

        click.echo(explain(chosen, cluster, margin))
    elif not verify_k:
        refused = len(rows) - sum(r.time is not None for r in rows)
        table(fitting, cluster, top or DEFAULT_TOP)
        console.print(f"{len(rows)} layouts in {elapsed:.2f} s: {len(fitting)} fit with a {margin:.0%} margin, "
                      f"{len(rows) - len(fitting) - refused} do not fit, {refused} cannot run as laid out "
                      "(--json gives each reason)", highlight=False)
        if not fitting:
            raise UserInputError("no layout fits: add ranks or memory, or a smaller model or global batch")
    if verify_k:
        from sdtrain.plan.verify import report, verify

        results = verify(rows, cluster, verify_k, recipe, verify_dir, verify_steps, verify_rounds)
        click.echo(report(results))
