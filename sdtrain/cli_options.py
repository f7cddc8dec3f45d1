"""What several `sdtrain` commands share: the consoles, DeepSpeed's host and launcher flags,
and writing a bench's results."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def host_options(command):
    """Which hosts and slots, and how to reach them: DeepSpeed's flags (its spellings with
    underscores work too)."""
    options = [
        click.option("-H", "--hostfile", help="Hostfile: 'HOST slots=N' lines, in rank order (DeepSpeed's format)."),
        click.option("-i", "--include", default="", help="Only these hosts/slots: HOST[:SLOT,SLOT][@HOST...]."),
        click.option("-e", "--exclude", default="", help="All but these hosts/slots: HOST[:SLOT,SLOT][@HOST...]."),
        click.option("--num-nodes", "--num_nodes", "num_nodes", type=int, help="Use the first N hosts."),
        click.option("--num-gpus", "--num_gpus", "num_gpus", type=int, help="Use the first N slots of each host."),
        click.option("--master-addr", "--master_addr", "master_addr", help="Rendezvous address (default: the first host)."),
        click.option("--master-port", "--master_port", "master_port", type=click.IntRange(1024, 65535),
                     help="Rendezvous port (default: recipe launch.master_port, a free port, or 29500 on a remote master)."),
        click.option("--ssh-port", "--ssh_port", "ssh_port", type=click.IntRange(1, 65535), help="ssh port of the hosts."),
        click.option("--ssh-options", default="", metavar="'OPTS'", help="Extra ssh arguments, e.g. '-i ~/.ssh/id_train'."),
        click.option("--allow-env-file-var", "allow_env_file_vars", multiple=True, metavar="NAME",
                     help="Let .sdtrain_env set NAME though it chooses which code runs (PYTHON*, LD_*, PATH, "
                          "NCCL_*_PLUGIN...: launch/env_guard.py) or is a drill (SDTRAIN_INJECT_*); refused otherwise."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


RUNNER_NAMES = ("local", "ssh", "pdsh", "slurm", "mpirun")
# DeepSpeed's --launcher values: `openmpi` is our mpirun; the MPI flavours it starts with one
# mpirun for every node have no runner here (sdtrain starts one node agent per node).
DEEPSPEED_RUNNERS = {"openmpi": "mpirun"}
DEEPSPEED_ONLY = ("mvapich", "mpich", "impi")


def _runner(ctx, param, value):
    if value is None or value in RUNNER_NAMES:
        return value
    if value in DEEPSPEED_RUNNERS:
        return DEEPSPEED_RUNNERS[value]
    if value in DEEPSPEED_ONLY:
        raise click.BadParameter(f"{value} is a DeepSpeed runner sdtrain lacks: use ssh or pdsh (or mpirun for OpenMPI)")
    raise click.BadParameter(f"{value!r}: choose one of {', '.join(RUNNER_NAMES)} (or DeepSpeed's openmpi = mpirun)")


def launcher_option(command):
    return click.option("--launcher", callback=_runner, metavar="|".join(RUNNER_NAMES),
                        help="How nodes are started (default: local, or ssh with a hostfile); openmpi = mpirun.")(command)


def write_results(results: dict, json_file: str | None, plot_file: str | None, figure) -> None:
    """A bench's --json and --plot outputs (`figure` draws the results)."""
    if json_file:
        with open(json_file, "w") as f:
            json.dump(results, f, indent=2)
    if plot_file:
        from sdtrain.plot.backend import save

        save(figure(results), plot_file)
        console.print(f"plot: {escape(plot_file)}", highlight=False)
