"""The end-of-run summary: summary.json's whole-run numbers and the table rank 0 prints.

A resumed run is one run in several launches. Its metrics.jsonl holds every logged step up
to now (the lines past the checkpoint are dropped on resume), so the eval losses are read from
all of it, after the step-0 baseline the resumed checkpoint carries. Throughput, the rank count
and the means (step time, and the strategy's shares: MoE dropped tokens and all-to-all time,
the pipeline bubble) are this launch's own: an earlier launch may have run on another layout,
where all of them differ, so the summary says which steps they cover.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

# metrics.jsonl keys whose mean over this launch's logged steps goes into summary.json and the table:
# (key, label, as a percentage?)
RUN_MEANS = (
    ("step_s", "step time", False),
    ("moe_dropped", "MoE dropped tokens", True),
    ("moe_all_to_all_share", "all-to-all share", True),
    ("bubble", "pipeline bubble", True),
)


def whole_run_evals(history: list[dict], this_launch: list, baseline: float | None = None) -> list:
    """(step, eval loss) over the whole run: the step-0 baseline (this launch's, or the one the
    resumed checkpoint carries), the earlier launches' from metrics.jsonl, then this launch's."""
    mine = [tuple(e) for e in this_launch]
    earlier = [(r["step"], r["eval_loss"]) for r in history if isinstance(r.get("eval_loss"), (int, float))]
    if baseline is not None:
        earlier.insert(0, (0, baseline))
    steps = {step for step, _ in mine}
    return sorted([e for e in earlier if e[0] not in steps] + mine, key=lambda e: e[0])


def run_means(records: list[dict]) -> dict:
    """Mean of each RUN_MEANS key over the logged steps that carry it (keys no step has are left
    out). Give it this launch's records only: step time and the shares depend on the layout."""
    means = {}
    for key, _, _ in RUN_MEANS:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if values:
            means[key] = round(sum(values) / len(values), 4)
    return means


def summary_table(summary: dict) -> Table:
    """Two columns, label and value; a value wraps inside its cell rather than being cut."""
    table = Table(title=Text(f"run {summary['name']}: {summary['steps']} steps", style="table.title"), show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in summary_rows(summary):
        table.add_row(label, Text(value))  # a value may be a user's path: `[` is not markup there
    return table


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    evals = summary["eval_losses"]
    if not evals:
        eval_text = "-"
    elif len(evals) == 1:
        eval_text = f"{evals[0][1]:.4f} (step {evals[0][0]})"
    else:
        eval_text = f"{evals[0][1]:.4f} (step {evals[0][0]}) -> {evals[-1][1]:.4f} (step {evals[-1][0]})"
    ranks = summary["world_size"]
    throughput = f"{summary['tokens_per_s']:,.0f} on {ranks} rank{'s' if ranks != 1 else ''}"
    rows = [
        ("final loss", _number(summary["final_loss"])),
        ("eval loss", eval_text),
    ]
    first = summary.get("first_step", 0)
    if first:  # this launch's speed, ranks, time and means: an earlier one may have had another layout
        rows.append(("resumed", f"at step {first}: speed, time and means are of steps {first + 1}-{summary['steps']}"))
    rows += [
        ("tokens/s", throughput),
        ("MFU", f"{100 * summary['mfu']:.1f}%" if summary["mfu"] is not None else "- (no peak known for this device)"),
    ]
    means = summary.get("means", {})
    for key, label, percent in RUN_MEANS:
        if key in means:
            rows.append((label, f"{100 * means[key]:.1f}% (mean)" if percent else f"{means[key]:.3f} s (mean)"))
    if summary.get("loss_scale") is not None:  # fp16
        rows.append(("fp16 loss scale", f"{summary['loss_scale']:g} at the end; "
                                        f"{summary['overflow_steps']} step(s) skipped for an overflow"))
    rows += [
        ("peak memory / rank", ", ".join(f"{m:.2f}" for m in summary["peak_mem_gib"]) + " GiB"),
        ("train time", f"{summary['train_s']:.1f} s"),
        ("checkpoint", summary["checkpoint"] or "-"),
    ]
    return rows


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "- (not finite)"
