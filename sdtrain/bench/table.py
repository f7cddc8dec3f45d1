"""The bench results as a table. A pipeline row's bubble (its stages' idle share of a step,
measured from the schedule's timeline) stands beside its replay (the schedule run again on each
step's own compute times with free communication: what imbalance and jitter alone leave idle)
and the schedule's formula (equal stages, steady compute); an MoE row's
all-to-all column is the share of its step time spent in dispatch and combine; a
tensor-parallel row's tp column is T (+sp where sequence parallelism is on) and its tp comm
column TP's own bytes per step (in comm/step as well).

At 80 columns the columns are dealt into several tables, each led by the run's name
(console_table.py): no number is ever cut to "…"."""

from __future__ import annotations

from sdtrain.console_table import FoldingColumn, FoldingTable

# (header, wraps): a list of every rank's numbers, or of ratios, may wrap in its cell
COLUMNS = (("run", True), ("world", False), ("step s", False), ("tokens/s", False), ("MFU", False),
           ("bubble", False), ("replayed", False), ("formula", False), ("all-to-all", False), ("tp", False),
           ("peak mem/rank GiB", True), ("model state/rank MiB", False), ("comm/step MiB", False), ("tp comm/step MiB", False),
           ("ratios", True))


def bench_table(results: dict) -> FoldingTable:
    title = (f"sdtrain bench: {results['recipe']}, {results['precision']}, {results['steps']} steps, "
             f"best of {results['repeats']}")
    table = FoldingTable(title, [FoldingColumn(name, "left" if name in ("run", "ratios") else "right", wraps)
                                 for name, wraps in COLUMNS])
    for row in results["results"]:
        ratios = ", ".join(f"{k.removeprefix('vs_')} {v:.2f}" for k, v in row.items() if k.startswith("vs_"))
        state = row["model_state_bytes"]
        comm = row["comm_bytes_per_step"]
        table.add_row(
            row["name"] + (" (peer)" if row["kind"] == "peer" else ""),
            str(row["world_size"]),
            f"{row['step_s']:.3f}" if row["step_s"] else "-",
            f"{row['tokens_per_s']:,.0f}",
            f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-",
            _fraction(row.get("bubble")),
            _fraction(row.get("bubble_replayed")),
            _fraction(row.get("bubble_formula")),
            _fraction(row.get("all_to_all_share")),
            _tensor_parallel(row),
            ", ".join(f"{m:.2f}" for m in row["peak_mem_gib"]),
            f"{max(state) / 2**20:.1f}" if state else "-",
            f"{comm / 2**20:.1f}" if comm is not None else "-",
            f"{sum(row['tp_bytes_per_step'].values()) / 2**20:.1f}" if row.get("tp_bytes_per_step") else "-",
            ratios,
        )
    return table


def _fraction(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _tensor_parallel(row: dict) -> str:
    tp = row.get("tensor_parallel", 1)
    return "-" if tp == 1 else f"{tp}" + ("+sp" if row.get("sequence_parallel") else "")
