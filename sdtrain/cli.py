"""The `sdtrain` command. Thin: parse arguments, call one function, print its result.

Exit codes: 0 success; 2 bad input (nothing launched); 1 a run that failed; 3 preempted (a
checkpoint saved at the interrupted step: launch again with train.resume auto); 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys

import click
from rich.markup import escape

from sdtrain.cli_options import console, err_console, host_options, launcher_option
from sdtrain.errors import UserInputError



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sdtrain")
def cli() -> None:
    """Distributed training launcher and job runner for PyTorch."""


class LaunchCommand(click.Command):
    """`sdtrain launch train.py --epochs 3`: that the target is a script (or a ds_config, or
    DeepSpeed's flag is there) is the answer, before click's "No such option '--epochs'"."""

    def parse_args(self, ctx, args):
        given = list(args)  # click's parser consumes the list it is handed
        try:
            return super().parse_args(ctx, args)
        except click.UsageError:
            from sdtrain.migrate.launch_target import check_foreign_arguments

            check_foreign_arguments(given)  # UserInputError (exit 2) where it is DeepSpeed's command line
            raise


@cli.command(cls=LaunchCommand)
@click.argument("recipe", required=False)
@click.option("--nproc-per-node", type=int, help="Workers on this node (default: recipe launch.nproc_per_node).")
@host_options
@launcher_option
@click.option("--node-rank", "--node_rank", "node_rank", type=int,
              help="Run only node R of the plan here (every node starts its own launcher, e.g. on Kubernetes).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. train.steps=50.")
@click.option("--run-dir", help="Run directory (default: runs/<recipe name>).")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe, batch arithmetic, placement and commands; launch nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as one JSON object.")
@click.option("--deepspeed", is_flag=False, flag_value="", metavar="[CONFIG]",
              help="DeepSpeed's flag: exit 2 with the `sdtrain import-deepspeed` command that makes a recipe of CONFIG.")
@click.option("--deepspeed_config", "--deepspeed-config", "deepspeed_config", metavar="CONFIG", help="The same.")
def launch(recipe, nproc_per_node, overrides, run_dir, dry_run, as_json, deepspeed, deepspeed_config, **placement) -> None:
    """Train with RECIPE (a YAML file) on this machine's workers, or on the hosts of a hostfile."""
    from sdtrain.migrate.launch_target import check_launch_target

    check_launch_target(recipe, deepspeed, deepspeed_config)  # a script or a ds_config: exit 2 with what to run instead
    from sdtrain.launch.job import plan_job, prepare_run_dir
    from sdtrain.launch.placement import LaunchRequest
    from sdtrain.launch.report import print_failure, print_plan
    from sdtrain.launch.restarts import run_with_restarts
    from sdtrain.launch.supervise import Supervisor
    from sdtrain.train.preempt import PREEMPTED_EXIT, clear_preemption, read_preempted

    if as_json and not dry_run:
        raise UserInputError("--json goes with --dry-run (a real run writes metrics.jsonl instead)")
    job = plan_job(recipe, list(overrides), nproc_per_node, run_dir, LaunchRequest(**placement))
    for warning in job.warnings:
        err_console.print(f"[yellow]warning[/]: {escape(warning)}", highlight=False)
    if job.env_file.notice():
        err_console.print(job.env_file.notice(), markup=False, highlight=False)
    if job.drills:
        from sdtrain.launch.drills import banner

        err_console.print(banner(job.drills), style="bold yellow", markup=False, highlight=False)
    if dry_run:
        if as_json:
            click.echo(json.dumps(job.as_dict(), indent=2))
        else:
            print_plan(console, job)
        return
    moved = prepare_run_dir(job)
    if moved:
        console.print(f"[yellow]{escape(str(job.run_dir))} held an earlier run: moved it to {escape(str(moved))}[/]")
    resume = f", resuming from {job.resume_from}" if job.resume_from else ""
    nodes = f" on {len(job.plan.nodes)} nodes ({job.plan.launcher})" if len(job.plan.nodes) > 1 else ""
    console.print(
        f"[bold]sdtrain[/]: {job.recipe.name}: {job.plan.world_size} worker(s){nodes}, backend {job.plan.backend}, "
        + escape(f"{job.batch.explain()}{resume}\n  run dir {job.run_dir}")
    )
    remote = dict(labels=job.labels(), nodes=job.plan.nodes, stop_by=job.stop_by, run_dir=job.run_dir) if job.remote else {}
    clear_preemption(job.run_dir)
    preempt = preemption_handler(job.run_dir) if job.recipe.checkpoint.on_preempt else None
    outcome, causes = run_with_restarts(
        job, lambda commands: Supervisor(commands, env=job.environment(), on_preempt=preempt, **remote).run(),
        lambda line: err_console.print(escape(line), highlight=False))
    if outcome.ok:
        preempted = read_preempted(job.run_dir)
        if preempted is not None:
            err_console.print(escape(f"preempted: stopped after step {preempted['step']} with a checkpoint at "
                                     f"{preempted['checkpoint']}; launch again with --set train.resume=auto to go on"))
            sys.exit(PREEMPTED_EXIT)
        console.print(f"[green]done[/] in {outcome.wall_s:.1f} s: {escape(str(job.run_dir))}")
        return
    if outcome.interrupted:
        err_console.print(f"[yellow]interrupted ({outcome.interrupted.name}): every worker stopped[/]")
        sys.exit(130)
    print_failure(err_console, job, outcome)
    if len(causes) > 1:
        from sdtrain.launch.restarts import describe_cause

        err_console.print(f"[red]the job failed {len(causes)} times[/] (launch.max_restarts {job.recipe.launch.max_restarts}):")
        for attempt, cause in enumerate(causes):
            err_console.print(escape(f"  attempt {attempt}: {describe_cause(cause)}"), highlight=False)
    err_console.print(f"[red]run failed[/] after {outcome.wall_s:.1f} s; per-rank logs in {escape(str(job.run_dir / 'logs'))}")
    sys.exit(1)


def preemption_handler(run_dir):
    """On the launcher's first SIGTERM/SIGUSR1: ask every worker to checkpoint and stop."""
    import os

    from sdtrain.train.preempt import request_preemption

    def on_preempt(sig) -> None:
        request_preemption(run_dir)
        # os.write: a signal handler must not re-enter a print the main thread is in.
        os.write(2, f"sdtrain: {sig.name}: preemption: every worker finishes its step and saves a checkpoint "
                    "(a second signal stops the job at once)\n".encode())

    return on_preempt


@cli.command()
@host_options
@click.option("--recipe", help="Also check that this recipe's memory estimate per rank fits on every host.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (with --recipe).")
def preflight(recipe, overrides, **hosts) -> None:
    """Check every host of --hostfile before a launch: ssh, versions, devices, master port and address, memory."""
    from sdtrain.launch.job import remote_setup
    from sdtrain.launch.placement import LaunchRequest
    from sdtrain.launch.preflight import preflight_table, run_preflight

    if not hosts["hostfile"]:
        raise UserInputError("preflight checks the hosts of a hostfile: give --hostfile F")
    request = LaunchRequest(**hosts)
    planned = None
    if recipe:
        from sdtrain.estimate.cli import resolved_recipe
        from sdtrain.launch.hostfile import read_hostfile, select_resources

        ranks = sum(len(s) for s in select_resources(read_hostfile(request.hostfile), **request.filters).values())
        planned = resolved_recipe(recipe, list(overrides), ranks)
    reports = run_preflight(request, remote_setup(request), planned)
    console.print(preflight_table(reports))
    hints = [(r.node.host, hint) for r in reports for hint in r.hints]
    for host, hint in hints:
        console.print(f"[red]✗[/] {escape(f'{host}: {hint}')}", highlight=False)
    if hints or any(r.failed for r in reports):
        sys.exit(1)
    console.print(f"[green]all {len(reports)} host(s) ready[/]")


@cli.command()
@click.argument("recipe", required=False)
@click.option("--params", help="Parameter count instead of a recipe: 7.5e9, 7.5B, 350M, 124000000.")
@click.option("--gpus", type=click.IntRange(min=1),
              help="Ranks (data-parallel devices); with a recipe, default its launch.nproc_per_node (or 1).")
@click.option("--precision", type=click.Choice(["mixed", "fp32"]), default="mixed", show_default=True,
              help="For the ZeRO table: mixed: bf16/fp16 weights + fp32 Adam (K=12); fp32: K=8.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, as launch does.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Where the ranks run (default: cuda for backend nccl).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def estimate(recipe, params, gpus, precision, overrides, device, as_json) -> None:
    """Memory per rank: model state for ZeRO stages 0-3 (ZeRO paper, Figure 1) and, for a
    RECIPE, every term of a training step (activations, buffers, the process) at its peak."""
    from sdtrain.parallel.memory import parse_count, per_device_bytes

    if (recipe is None) == (params is None):
        raise UserInputError("estimate needs a RECIPE or --params N (one of them)")
    ranks, active = [], None
    if recipe is not None:
        from sdtrain.estimate.cli import recipe_estimates

        params, gpus, device, ranks = recipe_estimates(recipe, list(overrides), gpus, device)
        active = _active_params(recipe, list(overrides))
    elif gpus is None:
        raise UserInputError("--params needs --gpus N (the data-parallel devices)")
    else:
        params = parse_count(params)
    per_device = per_device_bytes(params, gpus, precision)
    if as_json:
        out = {"params": params, "gpus": gpus, "precision": precision,
               "per_device_bytes": {str(k): round(v) for k, v in per_device.items()}}
        if active is not None:
            out["active_params"] = active
        if ranks:
            out.update(device=device, peak_bytes_per_rank=round(max(e.total for e in ranks)),
                       ranks=[e.as_dict() for e in ranks])
        click.echo(json.dumps(out))
        return
    of_which = f" ({active:,} active per token)" if active is not None else ""
    console.print(f"{params:,} parameters{of_which} on {gpus} device(s), {precision} precision: model state per device")
    for stage, size in per_device.items():
        console.print(f"  ZeRO stage {stage}: {size / 1e9:8.2f} GB")
    if ranks:
        from sdtrain.estimate.table import estimate_table

        for rank in ranks:
            console.print(estimate_table(rank, f"the recipe's step on {gpus} {device.upper()} rank(s): {rank.where}"))


def _active_params(recipe: str, overrides: list[str]) -> int | None:
    """Of an MoE recipe, the parameters one token computes with (None: a dense model)."""
    from sdtrain.model.size import count_params
    from sdtrain.recipe import load_recipe

    model = load_recipe(recipe, overrides).model
    return count_params(model, active=True) if model.moe.num_experts else None


@cli.command()
def env() -> None:
    """Versions of torch, CUDA, NCCL and gloo, and what this machine can run."""
    from sdtrain.environment import describe_environment

    for key, value in describe_environment().items():
        console.print(f"[bold]{key}[/]: {escape(str(value))}")


@cli.command()
@click.argument("checkpoint")
@click.argument("out")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--format", "out_format", type=click.Choice(["safetensors", "hf"]), default="safetensors", show_default=True,
              help="safetensors: one file, sdtrain's names; hf: a folder transformers loads (config.json, weights).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="With --format hf: shard the weights above this.")
def export(checkpoint, out, force, out_format, max_shard_size) -> None:
    """Write the model weights of a (sharded) CHECKPOINT to OUT.safetensors, or with
    --format hf to the folder OUT (GPT2LMHeadModel, LlamaForCausalLM or MixtralForCausalLM)."""
    from sdtrain.errors import printable

    if out_format == "hf":
        from sdtrain.cli_hf import parse_size
        from sdtrain.model.hf_export import export_hf

        written = export_hf(checkpoint, out, force, parse_size(max_shard_size))
        console.print(f"wrote {escape(printable(out))}: {', '.join(written)}", highlight=False)
        return
    from sdtrain.train.export import export_safetensors

    count = export_safetensors(checkpoint, out, force)
    console.print(f"wrote {count} tensors to {escape(printable(out))}")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--out", default="plot.png", show_default=True, help="The PNG (or .svg, .pdf) to write.")
def plot(run_dirs, out) -> None:
    """Loss, eval loss, tokens/s, memory and grad norm of one or more runs, overlaid by name."""
    from sdtrain.plot.backend import save
    from sdtrain.plot.run_data import load_runs
    from sdtrain.plot.runs import notes, runs_figure

    runs = load_runs(list(run_dirs))
    save(runs_figure(runs), out)
    for note in notes(runs):
        err_console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"wrote {escape(out)}: {len(runs)} run(s)", highlight=False)


@cli.group("recipe", invoke_without_command=True)
@click.option("--schema", is_flag=True, help="Print the recipe's JSON Schema (editors validate YAML recipes with it).")
@click.option("--markdown", is_flag=True, help="Print the table of recipe keys (the README's), made from the schema.")
@click.pass_context
def recipe_group(ctx, schema, markdown) -> None:
    """The recipe schema: every key, its type, default and meaning. `recipe show RECIPE` resolves one."""
    if ctx.invoked_subcommand is not None:
        if schema or markdown:
            raise UserInputError("--schema and --markdown print the schema; they do not go with a subcommand")
        return
    if schema and markdown:
        raise UserInputError("give --schema or --markdown, not both")
    if schema:
        from sdtrain.recipe import Recipe

        click.echo(json.dumps({"$schema": "https://json-schema.org/draft/2020-12/schema", **Recipe.model_json_schema()},
                              indent=2))
    elif markdown:
        from sdtrain.recipe_doc import markdown as key_table

        click.echo(key_table(), nl=False)
    else:
        click.echo(ctx.get_help())


@recipe_group.command("show")
@click.argument("path", metavar="RECIPE")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. train.steps=50.")
def recipe_show(path, overrides) -> None:
    """Print RECIPE with every key, defaults filled in, as YAML (derived batch sizes: `launch --dry-run`)."""
    from sdtrain.recipe import check_expert_layout, load_recipe

    resolved = load_recipe(path, list(overrides), layout_checked_at_launch=True)
    nproc = resolved.launch.nproc_per_node  # an integer is the world size of a launch on this machine
    check_expert_layout(resolved, nproc if isinstance(nproc, int) else None)
    click.echo(resolved.to_yaml(), nl=False)
    train = resolved.train
    if None in (train.global_batch_size, train.micro_batch_size, train.grad_accum_steps):
        click.echo("# the batch sizes left null follow from the world size: `sdtrain launch RECIPE --dry-run` derives them")


@cli.command("import-deepspeed")
@click.argument("config")
@click.option("--out", help="Write the recipe to this file (default: print it; the account goes to stderr).")
@click.option("--lenient", is_flag=True, help="Write the recipe even where a key left out changes what training computes.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Set a recipe key the config leaves open, e.g. train.micro_batch_size=8 for an HF 'auto' batch.")
def import_deepspeed_command(config, out, lenient, force, overrides) -> None:
    """A recipe from a DeepSpeed CONFIG (ds_config.json), with an account of every key."""
    from sdtrain.errors import printable
    from sdtrain.migrate.deepspeed import import_deepspeed, write_recipe

    if out and not force and os.path.lexists(out):  # said before the account, and nothing is overwritten
        raise UserInputError(f"{printable(out)} already exists; pass --force to overwrite it, or choose another name")
    result = import_deepspeed(config, list(overrides))
    report = console if out else err_console  # without --out, stdout is the recipe alone
    for line in result.report_lines():
        report.print(escape(line), highlight=False, soft_wrap=True)
    blocking = result.changes_numerics
    if blocking and not lenient:
        raise UserInputError(printable(
            f"{len(blocking)} key(s) of {config} would change what training computes and cannot be carried over "
            f"({', '.join(d.ds_key for d in blocking)}); nothing written. --lenient writes the recipe without them"))
    text = result.to_yaml(config)
    if not out:
        click.echo(text, nl=False)
        return
    write_recipe(out, text, force)
    console.print(f"wrote {escape(printable(out))}; {escape(result.next_line(out))}", highlight=False, soft_wrap=True)


@cli.group()
def checkpoint() -> None:
    """Inspect checkpoints."""


@checkpoint.command()
@click.argument("path")
def verify(path) -> None:
    """Check every file of the checkpoint at PATH (a checkpoints/step_<N> folder or a run
    directory): exit 0 if it is whole and safe to load, 2 naming each bad file if not."""
    from sdtrain.errors import printable
    from sdtrain.train.checkpoint_verify import checkpoint_problems
    from sdtrain.train.export import resolve_checkpoint

    resolved = resolve_checkpoint(path)
    problems = checkpoint_problems(resolved)
    for problem in problems:
        err_console.print(f"[red]✗[/] {escape(printable(problem))}", highlight=False)  # paths are the user's
    if problems:
        sys.exit(2)
    console.print(f"[green]verified[/]: {escape(printable(resolved))}", highlight=False)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except UserInputError as exc:
        # "1:x:" stays text. A message of several lines sets a command to copy on a line of its own
        # (launch_target.py): unwrapped, so the terminal's width never breaks it in two.
        message = str(exc)
        err_console.print(f"[bold red]error[/]: {escape(message)}", highlight=False, emoji=False, soft_wrap="\n" in message)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


from sdtrain.cli_bench import bench  # noqa: E402  (its commands take the options above)
from sdtrain.cli_hf import recipe_from_hf  # noqa: E402
from sdtrain.cli_generate import generate  # noqa: E402
from sdtrain.cli_plan import plan  # noqa: E402

cli.add_command(bench)
recipe_group.add_command(recipe_from_hf)
cli.add_command(generate)
cli.add_command(plan)

if __name__ == "__main__":
    main()
