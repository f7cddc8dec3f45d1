"""The estimate as a table: every term, its phase, the total and what dominates."""

from __future__ import annotations

from rich.text import Text

from sdtrain.console_table import FoldingColumn, FoldingTable
from sdtrain.estimate.terms import ALWAYS, Estimate


def estimate_table(estimate: Estimate, title: str) -> FoldingTable:
    """The explanation wraps in its cell; at 80 columns nothing is cut (console_table.py)."""
    table = FoldingTable(title, [FoldingColumn("term", wraps=True), FoldingColumn("when"), FoldingColumn("GiB", "right"),
                                 FoldingColumn("how it is counted", wraps=True)])
    peak = estimate.peak_phase
    for term in estimate.terms:
        live = term.phase in (ALWAYS, peak)
        gib = f"{term.bytes / 2**30:.3f}"
        table.add_row(term.name, term.phase, gib if live else f"({gib})", term.detail)
    dominant = estimate.largest(1)[0]
    table.add_section()
    table.add_row(Text("peak", style="bold"), peak, Text(f"{estimate.total / 2**30:.3f}", style="bold"),
                  f"dominated by {dominant.name} ({100 * dominant.bytes / estimate.total:.0f}%); "
                  "terms in () belong to the other phase")
    if estimate.tp_bytes:
        sent = ", ".join(f"{kind.replace('_', '-')} {value / 2**20:.1f} MiB" for kind, value in estimate.tp_bytes.items())
        table.add_row("tensor-parallel traffic", "per step", f"{estimate.tp_wire_bytes / 2**30:.3f}",
                      f"what this rank sends per step in a ring, and receives as much (not memory); collectives of {sent}")
    return table
