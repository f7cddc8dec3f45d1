"""The bench results as a rich table."""

from __future__ import annotations

from rich.table import Table


def bench_table(results: dict) -> Table:
    table = Table(title=f"sdtrain bench: {results['recipe']}, {results['steps']} steps, best of {results['repeats']}")
    for column in ("run", "world", "tokens/s", "rounds", "MFU", "peak RSS / rank (GiB)", "vs torch DDP"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for row in results["results"]:
        ratio = row.get("ratio_vs_torch_ddp")
        table.add_row(
            row["name"] + (" (peer)" if row["kind"] == "peer" else ""),
            str(row["world_size"]),
            f"{row['tokens_per_s']:,.0f}",
            ", ".join(f"{s:,.0f}" for s in row["rounds"]),
            f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-",
            ", ".join(f"{m:.2f}" for m in row["peak_mem_gib"]),
            f"{ratio:.3f}" if ratio is not None else "",
        )
    return table
