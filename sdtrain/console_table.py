"""A table that fits whatever console it is printed on, and never cuts a value short.

rich shrinks a table wider than the console by cutting its cells to "…": a number, a host
name or a path loses its end, at 80 columns or whenever the output is piped (rich then
assumes 80). This table is laid out when it is printed, for that console's width: where all
columns fit, one table; where they do not, the columns are dealt into several tables, one
under the other, each repeating the key columns (the run's or the host's name) so every
row can still be read across. A long value (a list of numbers, a path) wraps inside its
cell; a header wraps at its spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

BORDER = 3  # per column: a padding space each side and a rule; plus one rule at the left edge
WRAPPED_CELL = 24  # the width a wrapping column is given when it would be wider


@dataclass
class FoldingColumn:
    header: str
    justify: str = "left"
    wraps: bool = False  # a long value (a list, a path, prose) may wrap inside its cell
    style: str | None = None


@dataclass
class FoldingTable:
    title: str | None
    columns: list[FoldingColumn]
    key_columns: int = 1  # repeated in every part when the columns are dealt out
    show_header: bool = True
    stack_when_narrow: bool = False  # too wide: one small table per row (label, value) instead
    rows: list[list[Text]] = field(default_factory=list)
    sections: set[int] = field(default_factory=set)  # a rule above these rows

    def add_section(self) -> None:
        self.sections.add(len(self.rows))

    def add_row(self, *cells) -> None:
        # Plain strings are data (a user's path may hold `[`), never markup.
        self.rows.append([cell if isinstance(cell, Text) else Text(str(cell)) for cell in cells])

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        natural = [self._width(i, width, wrap=False) for i in range(len(self.columns))]
        if 1 + sum(w + BORDER for w in natural) <= width:
            yield self._table(list(range(len(self.columns))), natural, self.title)
            return
        if self.stack_when_narrow:
            yield from self._stacked()
            return
        # Too wide whole: long values wrap, the columns are dealt out, and what a part has
        # to spare goes back to its wrapping columns (the key columns' last).
        narrow = [self._width(i, width, wrap=True) for i in range(len(self.columns))]
        for part, indexes in enumerate(self._parts(narrow, width)):
            widths = list(narrow)
            spare = width - 1 - sum(widths[i] + BORDER for i in indexes)
            for i in sorted(indexes, key=lambda i: i < self.key_columns):
                if self.columns[i].wraps and spare > 0:
                    grown = min(natural[i], widths[i] + spare)
                    spare -= grown - widths[i]
                    widths[i] = grown
            yield self._table(indexes, widths, self.title if part == 0 else None)

    def _stacked(self) -> RenderResult:
        """One table per row, titled by its key: each column's header beside its value."""
        for row in self.rows:
            key = " ".join(cell.plain for cell in row[:self.key_columns])
            table = Table(title=_title(f"{self.title}: {key}" if self.title else key), title_justify="left",
                          show_header=False)
            table.add_column(no_wrap=True, style="bold")
            table.add_column(overflow="fold")
            for column, cell in list(zip(self.columns, row))[self.key_columns:]:
                table.add_row(column.header, cell)
            yield table

    def _width(self, index: int, console_width: int, wrap: bool) -> int:
        column = self.columns[index]
        cells = [row[index] for row in self.rows if index < len(row)]
        longest_line = max((cell_len(line) for cell in cells for line in cell.plain.splitlines() or [""]), default=0)
        longest_word = max((cell_len(w) for cell in cells for w in cell.plain.split()), default=0)
        header_word = max((cell_len(w) for w in column.header.split()), default=0)
        if wrap and column.wraps:  # a word longer than half the console folds, the rest wraps at spaces
            wanted = min(max(longest_word, min(longest_line, WRAPPED_CELL)), console_width // 2)
        else:
            wanted = longest_line
        if self.show_header and not wrap:  # the whole table fits: no header wraps
            wanted = max(wanted, cell_len(column.header))
        elif self.show_header:
            # the header wraps at its spaces (a word stays whole); a short one stays on one line
            wanted = max(wanted, header_word, min(cell_len(column.header), 10))
        return max(1, min(wanted, console_width - 1 - BORDER))

    def _parts(self, widths: list[int], width: int) -> list[list[int]]:
        """Column indexes per part: the key columns, then as many others as fit."""
        keys = list(range(min(self.key_columns, len(self.columns))))
        key_width = 1 + sum(widths[i] + BORDER for i in keys)
        parts, current, used = [], list(keys), key_width
        for index in range(len(keys), len(self.columns)):
            if used + widths[index] + BORDER > width and len(current) > len(keys):
                parts.append(current)
                current, used = list(keys), key_width
            current.append(index)
            used += widths[index] + BORDER
        parts.append(current)
        return parts

    def _table(self, indexes: list[int], widths: list[int], title: str | None) -> Table:
        table = Table(title=_title(title), show_header=self.show_header)
        for i in indexes:
            column = self.columns[i]
            table.add_column(column.header, justify=column.justify, style=column.style, width=widths[i],
                             overflow="fold", no_wrap=False)
        for number, row in enumerate(self.rows):
            if number in self.sections:
                table.add_section()
            table.add_row(*(row[i] if i < len(row) else Text("") for i in indexes))
        return table


def _title(title: str | None) -> Text | None:
    """A title names user data (a recipe, a host): text, never markup."""
    return None if title is None else Text(title, style="table.title")
