"""The estimate as a table: every term, its phase, the total and what dominates; with offload,
where each term lives (host memory, disk) and the host's and the disk's totals apart."""

from __future__ import annotations

from rich.text import Text

from sdtrain.console_table import FoldingColumn, FoldingTable
from sdtrain.estimate.terms import ALWAYS, DEVICE, Estimate


def estimate_table(estimate: Estimate, title: str) -> FoldingTable:
    """The explanation wraps in its cell; at 80 columns nothing is cut (console_table.py)."""
    table = FoldingTable(title, [FoldingColumn("term", wraps=True), FoldingColumn("when"), FoldingColumn("GiB", "right"),
                                 FoldingColumn("how it is counted", wraps=True)])
    peak = estimate.peak_phase
    for term in estimate.terms:
        # a term of another place (a GPU's host, the disk) adds to that place's row below, not to the peak
        live = term.phase in (ALWAYS, peak) or term.where not in estimate.counted
        gib = f"{term.bytes / 2**30:.3f}"
        when = term.phase if term.where == DEVICE else f"{term.phase}, {term.where}"
        table.add_row(term.name, when, gib if live else f"({gib})", term.detail)
    dominant = estimate.largest(1)[0]
    table.add_section()
    table.add_row(Text("peak", style="bold"), peak, Text(f"{estimate.total / 2**30:.3f}", style="bold"),
                  f"dominated by {dominant.name} ({100 * dominant.bytes / estimate.total:.0f}%); "
                  "terms in () belong to the other phase" + ("; on a CPU rank host memory is the device's"
                                                             if estimate.host_total and estimate.counted != (DEVICE,) else ""))
    if estimate.host_total and estimate.counted == (DEVICE,):
        table.add_row("host memory", "peak", f"{estimate.host_total / 2**30:.3f}",
                      "offloaded state and buffers in this rank's share of the host (checked apart)")
    if estimate.disk_total:
        table.add_row("disk", "whole run", f"{estimate.disk_total / 2**30:.3f}",
                      "nvme offload files of this rank under parallel.zero.nvme_path (ranks of a node share it)")
    for note in estimate.notes:
        table.add_row("note", "", "", note)
    if estimate.tp_bytes:
        sent = ", ".join(f"{kind.replace('_', '-')} {value / 2**20:.1f} MiB" for kind, value in estimate.tp_bytes.items())
        table.add_row("tensor-parallel traffic", "per step", f"{estimate.tp_wire_bytes / 2**30:.3f}",
                      f"what this rank sends per step in a ring, and receives as much (not memory); collectives of {sent}")
    return table
