"""The bench results as a table. A pipeline row's bubble (its stages' idle share of a step,
measured from the schedule's timeline) stands beside its replay (the schedule run again on each
step's own compute times with free communication: what imbalance and jitter alone leave idle)
and the schedule's formula (equal stages, steady compute); an MoE row's
all-to-all column is the share of its step time spent in dispatch and combine; a
tensor-parallel row's tp column is T (+sp where sequence parallelism is on) and its tp comm
column TP's own bytes per step (in comm/step as well); an offload row's io wait column is the
step's exposed (not overlapped) I/O time, its read and write columns the bandwidth achieved, to
compare with the disk's own (a note under the table).

At 80 columns the columns are dealt into several tables, each led by the run's name
(console_table.py): no number is ever cut to "…"."""

from __future__ import annotations

from sdtrain.console_table import FoldingColumn, FoldingTable

# (header, wraps): a list of every rank's numbers, or of ratios, may wrap in its cell
COLUMNS = (("run", True), ("world", False), ("step s", False), ("tokens/s", False), ("MFU", False),
           ("bubble", False), ("replayed", False), ("formula", False), ("all-to-all", False), ("tp", False),
           ("io wait s", False), ("read GB/s", False), ("write GB/s", False),
           ("peak mem/rank GiB", True), ("model state/rank MiB", False), ("comm/step MiB", False), ("tp comm/step MiB", False),
           ("ratios", True))
OFFLOAD_COLUMNS = {"io wait s", "read GB/s", "write GB/s"}  # shown where a row offloads


def bench_table(results: dict) -> FoldingTable:
    title = (f"sdtrain bench: {results['recipe']}, {results['precision']}, {results['steps']} steps, "
             f"best of {results['repeats']}")
    offloads = any("offload_optimizer" in row for row in results["results"])
    shown = [offloads or name not in OFFLOAD_COLUMNS for name, _ in COLUMNS]
    table = FoldingTable(title, [FoldingColumn(name, "left" if name in ("run", "ratios") else "right", wraps)
                                 for (name, wraps), show in zip(COLUMNS, shown) if show])
    for row in results["results"]:
        ratios = ", ".join(f"{k.removeprefix('vs_')} {v:.2f}" for k, v in row.items() if k.startswith("vs_"))
        state = row["model_state_bytes"]
        comm = row["comm_bytes_per_step"]
        cells = (
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
            _number(row.get("offload_wait_s")),
            _number(row.get("offload_read_gbps"), 2),
            _number(row.get("offload_write_gbps"), 2),
            ", ".join(f"{m:.2f}" for m in row["peak_mem_gib"]),
            f"{max(state) / 2**20:.1f}" if state else "-",
            f"{comm / 2**20:.1f}" if comm is not None else "-",
            f"{sum(row['tp_bytes_per_step'].values()) / 2**20:.1f}" if row.get("tp_bytes_per_step") else "-",
            ratios,
        )
        table.add_row(*(cell for cell, show in zip(cells, shown) if show))
    return table


def _fraction(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _number(value: float | None, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if value is not None else "-"


def _tensor_parallel(row: dict) -> str:
    tp = row.get("tensor_parallel", 1)
    return "-" if tp == 1 else f"{tp}" + ("+sp" if row.get("sequence_parallel") else "")
