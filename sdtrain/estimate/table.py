"""The estimate as a table: every term, its phase, the total and what dominates."""

from __future__ import annotations

from rich.table import Table

from sdtrain.estimate.terms import ALWAYS, Estimate


def estimate_table(estimate: Estimate, title: str) -> Table:
    table = Table(title=title)
    for column in ("term", "when", "GiB", "how it is counted"):
        table.add_column(column, justify="right" if column == "GiB" else "left")
    peak = estimate.peak_phase
    for term in estimate.terms:
        live = term.phase in (ALWAYS, peak)
        gib = f"{term.bytes / 2**30:.3f}"
        table.add_row(term.name, term.phase, gib if live else f"({gib})", term.detail)
    dominant = estimate.largest(1)[0]
    table.add_section()
    table.add_row("[bold]peak[/]", peak, f"[bold]{estimate.total / 2**30:.3f}[/]",
                  f"dominated by {dominant.name} ({100 * dominant.bytes / estimate.total:.0f}%); "
                  "terms in () belong to the other phase")
    return table
