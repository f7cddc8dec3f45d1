"""What the launcher prints: the plan before a run, the root cause after a failure."""

from __future__ import annotations

import shlex

from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from sdtrain.launch.failures import root_cause


def print_plan(console: Console, job) -> None:
    plan, batch = job.plan, job.batch
    console.print(Syntax(job.recipe.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    console.print(f"[bold]batch[/]: {batch.explain()}  ({batch.global_batch * job.recipe.model.seq_len:,} tokens per step)")
    console.print(f"[bold]data[/]: {job.data_summary}")
    console.print(f"[bold]run dir[/]: {job.run_dir}" + (f"  (resuming from {job.resume_from})" if job.resume_from else ""))
    table = Table(title=f"placement: world size {plan.world_size}, master {plan.master_addr}:{plan.master_port}, backend {plan.backend}")
    for column in ("host", "local rank", "global rank", "device", "pipeline stage", "expert group"):
        table.add_column(column)
    for row in plan.placement():
        table.add_row(row["host"], str(row["local_rank"]), str(row["rank"]), str(row["device"]),
                      str(row["pipeline_stage"]), str(row["expert_group"]))
    console.print(table)
    for node, argv in zip(plan.nodes, plan.commands):
        console.print(f"[bold]node {node.node_rank} ({node.host})[/]:")
        console.print(shlex.join(argv), soft_wrap=True, highlight=False, markup=False)


def print_failure(console: Console, reports: list[dict]) -> None:
    failures = [f for report in reports for f in report["failures"]]
    if not failures:
        console.print("[bold red]the job failed[/] but no rank left a report; see the logs/ folder of the run directory")
        return
    cause = root_cause(failures)
    # A Python traceback says it all; a rank killed by a signal left none, its log may say more.
    body = cause["traceback"] or cause["error"]
    if not body and cause["log_tail"]:
        body = f"(no traceback) last lines of logs/rank{cause['rank']}.log:\n" + cause["log_tail"]
    title = f"root cause: rank {cause['rank']} on {cause['host']} (local rank {cause['local_rank']}, pid {cause['pid']}) {cause['exit']}"
    console.print(Panel(Text(body.strip() or "(no output)"), title=escape(title), title_align="left", border_style="red"))
    others = [f for f in failures if f is not cause]
    for f in sorted(others, key=lambda f: f["rank"]):
        first_line = (f["error"] or "").strip().splitlines()[:1]
        line = f"  also stopped: rank {f['rank']} on {f['host']} {f['exit']}" + (f": {first_line[0]}" if first_line else "")
        console.print(line, markup=False, highlight=False)
