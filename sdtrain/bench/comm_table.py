"""The comm bench results as a rich table, and the one-line verdict on large all_reduce."""

from __future__ import annotations

from sdtrain.bench.comm_spec import format_size
from sdtrain.console_table import FoldingColumn, FoldingTable


def comm_table(result: dict) -> FoldingTable:
    """At 80 columns the columns are dealt into tables led by op and size (console_table.py)."""
    title = (f"sdtrain bench comm: {result['backend']} on {result['device']}, {result['world_size']} ranks on "
             f"{result['nodes']} node(s), float32, best of {result['repeats']}; bus bandwidth as nccl-tests")
    columns = ("op", "size", "iters", "time us", "algbw GB/s", "busbw GB/s", "correct", "plain loop busbw", "vs plain")
    table = FoldingTable(title, [FoldingColumn(c, "left" if c in ("op", "correct") else "right", wraps=c == "correct")
                                 for c in columns], key_columns=2)
    for row in result["results"]:
        plain = row.get("plain_busbw_gbps")
        table.add_row(
            row["op"], format_size(row["bytes"]), str(row["iters"]), f"{row['time_us']:,.1f}",
            f"{row['algbw_gbps']:.3f}", f"{row['busbw_gbps']:.3f}",
            "yes" if row["correct"] else f"NO (ranks {', '.join(map(str, row['wrong_ranks']))})",
            f"{plain:.3f}" if plain is not None else "-", f"{row['vs_plain']:.2f}" if plain is not None else "-",
        )
    return table


def largest_all_reduce(result: dict) -> dict | None:
    rows = [row for row in result["results"] if row["op"] == "all_reduce"]
    return max(rows, key=lambda row: row["bytes"]) if rows else None


def verdict(result: dict) -> str | None:
    row = largest_all_reduce(result)
    if row is None:
        return None
    return (f"all_reduce {format_size(row['bytes'])}: bus bandwidth {row['busbw_gbps']:.3f} GB/s, a plain "
            f"torch.distributed loop in the same workers {row['plain_busbw_gbps']:.3f} GB/s (ratio {row['vs_plain']:.2f})")
