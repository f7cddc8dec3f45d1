"""What the launcher prints: the plan before a run, the root cause after a failure."""

from __future__ import annotations

import shlex

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.syntax import Syntax
from rich.text import Text

from sdtrain.console_table import FoldingColumn, FoldingTable
from sdtrain.launch.disk import DISK_ERRORS, describe, unwritable
from sdtrain.launch.drills import hang_injected, injected_by, injected_line, not_injected_note
from sdtrain.launch.failures import merge_reports, only_symptoms, read_reports, root_cause
from sdtrain.launch.hang_report import hang_diagnosis
from sdtrain.launch.memory_check import describe_summary
from sdtrain.launch.node_death import DIED_HINT, node_died
from sdtrain.launch.oom import explain as explain_oom


PLACEMENT_ENDS = 32  # a larger plan's table shows its first and last ranks; --json has them all


def print_plan(console: Console, job) -> None:
    plan, batch = job.plan, job.batch
    # word_wrap: a long value (a data path) wraps; without it rich cuts the line at the console edge
    console.print(Syntax(job.recipe.to_yaml(), "yaml", theme="ansi_dark", background_color="default", word_wrap=True))
    # Paths and data names are the user's: `[` in them must not be read as markup.
    console.print("[bold]batch[/]: " + escape(f"{batch.explain()}  ({batch.global_batch * job.recipe.model.seq_len:,} tokens per step)"))
    sequence = ", sequence parallel" if job.recipe.parallel.sequence_parallel else ""  # only ever with tp > 1
    console.print("[bold]parallel[/]: " + job.layout.explain() + sequence)
    console.print("[bold]data[/]: " + escape(job.data_summary))
    console.print("[bold]model[/]: " + model_size_line(job.recipe.model))
    console.print("[bold]memory[/]: " + escape(describe_summary(job.memory())))
    console.print("[bold]run dir[/]: " + escape(str(job.run_dir) + (f"  (resuming from {job.resume_from})" if job.resume_from else "")))
    # At 80 columns a host name wraps in its cell, never cut to "…" (console_table.py).
    columns = {"rank": "rank", "host": "host", "node": "node_rank", "local rank": "local_rank", "device": "device",
               "pipeline stage": "pipeline_stage", "dp rank": "dp_rank"}
    if job.layout.tp > 1:  # without tensor parallelism every rank is tp rank 0: no news
        columns["tp rank"] = "tp_rank"
    if job.layout.ep > 1:  # without expert parallelism every rank is its own expert group: no news
        columns["expert group"] = "expert_group"
    # One node keeps its rendezvous in private files (listen.py): no address to show, nothing listens.
    rendezvous = ("rendezvous: private file store" if len(plan.nodes) == 1
                  else f"master {plan.master_addr}:{plan.master_port}")
    table = FoldingTable(f"placement: world size {plan.world_size}, {rendezvous}, "
                         f"backend {plan.backend}, runner {plan.launcher}",
                         [FoldingColumn(header, wraps=header == "host") for header in columns])
    placement = plan.placement(job.layout)
    shown = placement if len(placement) <= 2 * PLACEMENT_ENDS else placement[:PLACEMENT_ENDS] + placement[-PLACEMENT_ENDS:]
    for index, row in enumerate(shown):  # the global rank leads: every part of a folded table repeats it
        if len(shown) < len(placement) and index == PLACEMENT_ENDS:
            table.add_row(*["..."] * len(columns))
        table.add_row(*(str(row[key]) for key in columns.values()))
    console.print(table)
    if len(shown) < len(placement):
        console.print(f"ranks {PLACEMENT_ENDS}-{len(placement) - PLACEMENT_ENDS - 1} left out above: "
                      "--dry-run --json lists every rank", markup=False, highlight=False)
    if job.layout.pp > 1:
        print_stages(console, job)
    # Every node's exact command, in one print: one per node took minutes on a 65,536-host plan.
    commands = [Text(f"node {node.node_rank} ({node.host}):", style="bold") + Text("\n" + shlex.join(argv))
                for node, argv in zip(plan.nodes, plan.commands)]
    console.print(Text("\n").join(commands), soft_wrap=True, highlight=False)


def model_size_line(model) -> str:
    """Parameters; of an MoE model also those one token computes with (what FLOPs and MFU count)."""
    from sdtrain.model.size import count_params

    total = count_params(model)
    if not model.moe.num_experts:
        return f"{total:,} parameters"
    moe = model.moe
    return (f"{total:,} parameters in total, {count_params(model, active=True):,} active per token "
            f"(top {moe.top_k} of {moe.num_experts} experts, in 1 of every {moe.every_n_layers} blocks)")


def print_stages(console: Console, job) -> None:
    pipeline = job.recipe.parallel.pipeline
    tensor_parallel = f" x {job.layout.tp} tensor-parallel" if job.layout.tp > 1 else ""
    table = FoldingTable(f"pipeline: {pipeline.stages} stages x {job.layout.dp} data-parallel{tensor_parallel}, "
                         f"schedule {pipeline.schedule}"
                         + (f", {pipeline.virtual_stages} virtual stages" if pipeline.virtual_stages > 1 else "")
                         + f", {job.batch.grad_accum} micro-batches per step",
                         [FoldingColumn(c, wraps=c == "layers") for c in ("stage", "layers", "parameters", "model state / rank")])
    for row in job.stages():
        layers = ", ".join(f"{chunk[0]}-{chunk[-1]}" if len(chunk) > 1 else str(chunk[0]) for chunk in row["layers"])
        table.add_row(str(row["stage"]), layers, f"{row['params']:,}", f"{row['state_bytes_per_rank'] / 2**20:,.1f} MiB")
    console.print(table)


# A node whose runner ended with this code, and no failure report, most likely failed here.
_EXIT_HINTS = {
    255: "ssh could not connect or log in: `ssh HOST true` must work without a password prompt "
         "(sdtrain preflight --hostfile F checks every host)",
    127: "a command was not found on the node: the launcher's Python must exist at the same path on every node",
    126: "a command could not be run on the node (permissions?)",
}


def print_failure(console: Console, job, outcome) -> None:
    for error in outcome.errors:
        print_red_panel(console, "the launcher stopped the job", error)
    # Every process that writes there fails when the run directory cannot be written; the
    # directory itself says why in one line, which no traceback of theirs puts first.
    disk = unwritable(job.run_dir)
    disk = disk if disk is not None and disk.errno in DISK_ERRORS else None
    if disk is not None:
        print_red_panel(console, f"cause: the run directory {job.run_dir} cannot be written",
                        f"{describe(disk)}\n{DISK_ERRORS[disk.errno]}")
    from_files, notes = read_reports(job.run_dir / "failures")
    for note in notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    hosts = {n.node_rank: n.host for n in job.plan.nodes} if job.remote else None
    reports = merge_reports(from_files, outcome.reports, hosts)
    if any(report.get("hang") for report in reports) and print_hang(console, job):
        return  # the watchdog stopped the ranks: their SIGKILLs are its doing, not the cause
    reported = {report["node_rank"] for report in reports}
    silent = [(node, code, tail) for i, (node, code, tail) in enumerate(_node_outcomes(job, outcome))
              if i in outcome.failed_first and node.node_rank not in reported]
    failures = [f for report in reports for f in report["failures"]]
    dead_cause = None  # a node that died mid-run: the other ranks' errors are what its death did to them
    for node, code, tail in silent:
        if disk is not None and not tail:
            continue  # a local node's output went to the terminal already; the disk says why
        hint = _EXIT_HINTS.get(code, "its last lines say why")
        body = "\n".join(tail) or "(no output)"
        title = node_died(node, code, job.run_dir)
        if title is None:
            title = f"node {node.node_rank} ({node.host}) failed before any rank reported: exit code {code}"
        else:
            hint = DIED_HINT
            if dead_cause is None and disk is None and only_symptoms(failures):
                dead_cause, title = node, f"root cause: {title}"
        print_red_panel(console, title, f"{hint}\n\n{body}")
    if not failures:
        if not (silent or outcome.errors or disk):
            console.print("[bold red]the job failed[/] but no rank left a report; see the logs/ folder of the run directory")
        return
    if dead_cause is not None:
        print_also_stopped(console, failures)
        return
    cause = root_cause(failures)
    # A Python traceback says it all; a rank killed by a signal left none, its log may say more.
    body = cause["traceback"] or cause["error"]
    if not body and cause["log_tail"]:
        body = f"(no traceback) last lines of logs/rank{cause['rank']}.log:\n" + cause["log_tail"]
    title = f"{'first failure' if disk else 'root cause'}: rank {cause['rank']} on {cause['host']} (local rank {cause['local_rank']}, pid {cause['pid']}) {cause['exit']}"
    if cause.get("oom"):  # named as what it is, with the numbers and the changes that fit
        title += ": out of memory" if cause["oom"]["certain"] else ": likely out of memory"
        body = explain_oom(job, cause["oom"]) + "\n\n" + body
    drill = injected_by(cause, job.drills)
    if drill is not None:  # a drill's failure never reads as a real one
        title += " (injected)"
        body = injected_line(drill) + "\n\n" + body
    print_red_panel(console, title, body.strip() or "(no output)")
    if job.drills and drill is None:
        console.print(not_injected_note(job.drills), markup=False, highlight=False)
    print_also_stopped(console, [f for f in failures if f is not cause])


def print_red_panel(console: Console, title: str, body: str) -> None:
    """A failure in a red box. A title too long for the box's top edge (a host name, a path, a
    drill's "(injected)") goes whole on the line above it: rich would cut it to '…'."""
    heading = Text(title, style="bold red")  # the user's paths and host names: text, never markup
    if cell_len(title) + 6 > console.width:  # the corners, the rule and a space each side
        console.print(heading)
        heading = None
    console.print(Panel(Text(body), title=heading, title_align="left", border_style="red"))


def print_also_stopped(console: Console, failures: list[dict]) -> None:
    for f in sorted(failures, key=lambda f: f["rank"]):
        first_line = (f["error"] or "").strip().splitlines()[:1]
        line = f"  also stopped: rank {f['rank']} on {f['host']} {f['exit']}" + (f": {first_line[0]}" if first_line else "")
        console.print(line, markup=False, highlight=False)


def print_hang(console: Console, job) -> bool:
    """The hang diagnosis as the root cause; False if no node left what it took."""
    diagnosis = hang_diagnosis(job.run_dir, job.plan.world_size)
    if diagnosis is None:
        return False
    cause, lines = diagnosis
    drill = hang_injected(cause, lines, job.drills)
    body = "\n".join(lines) + f"\n\nfull stacks and each rank's last collectives: {job.run_dir / 'hang'}"
    if drill is not None:
        cause += " (injected)"
        body = injected_line(drill) + "\n\n" + body
    print_red_panel(console, f"root cause: {cause}", body)
    return True


def _node_outcomes(job, outcome):
    """(node, exit code of its command, last stderr lines) for the nodes started here."""
    nodes = job.plan.nodes if job.node_rank is None else [job.plan.nodes[job.node_rank]]
    tails = outcome.stderr_tails or [[] for _ in nodes]
    return list(zip(nodes, outcome.exit_codes, tails))
