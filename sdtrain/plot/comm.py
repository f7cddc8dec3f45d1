"""`sdtrain bench comm --plot FILE.png`: bus bandwidth against message size, one line per op,
and the plain torch.distributed all_reduce loop dashed beside sdtrain's all_reduce."""

from __future__ import annotations

from sdtrain.plot.backend import figure_class


def comm_figure(result: dict):
    """The Figure (not yet saved)."""
    figure = figure_class()(figsize=(8, 5), layout="constrained")
    ax = figure.subplots()
    ops = list(dict.fromkeys(row["op"] for row in result["results"]))
    for index, op in enumerate(ops):
        rows = sorted((row for row in result["results"] if row["op"] == op), key=lambda row: row["bytes"])
        sizes = [row["bytes"] for row in rows]
        ax.plot(sizes, [row["busbw_gbps"] for row in rows], "-o", color=f"C{index}", label=op, markersize=3)
        if op == "all_reduce" and all("plain_busbw_gbps" in row for row in rows):
            ax.plot(sizes, [row["plain_busbw_gbps"] for row in rows], "--", color=f"C{index}",
                    label="all_reduce, plain torch.distributed loop")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size, bytes per rank")
    ax.set_ylabel("bus bandwidth, GB/s")
    ax.set_title(f"sdtrain bench comm: {result['backend']}, {result['world_size']} ranks on {result['nodes']} node(s)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return figure
