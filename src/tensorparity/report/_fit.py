"""Text and tables that fit any width without breaking a number or a key's component.

Two renderables every report shares (through :mod:`._render`):

* :class:`Wrapped`: text that wraps at spaces, after ``/`` and after a ``.`` that is not between
  two digits nor next to another dot (``layers.0.`` | ``self_attn.`` | ``q_proj``), so ``0.0007813``,
  ``1.3e-06`` and ``{0..23}`` are never split. Only a single word wider than the whole line is
  folded, as a last resort.
* :class:`FitTable`: a table whose columns are sized here, not by rich. Number columns (``atom``)
  are as wide as their widest cell and never wrap; the others wrap as :class:`Wrapped`, never
  narrower than their longest word. When even that does not fit, each row is shown as a heading
  and indented ``column: value`` lines instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from rich.cells import cell_len
from rich.measure import Measurement
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
    from rich.table import Column, Table

__all__ = ["FitTable", "Kind", "Wrapped", "column_kind", "words"]

Kind = Literal["key", "text", "atom"]

_SPACES = re.compile(r"\s+|[/.]")
_SHAPE = re.compile(r"\[\d+(?:, \d+)*\]")
_KEY_COLUMNS = frozenset({"key", "layer", "parameter", "section", "reference layer", "module", "migration"})
_ATOM_COLUMNS = frozenset({"#", "shape", "dtype", "shape A", "shape B", "step", "epoch:batch", "version", "fwd", "bwd"})


def column_kind(index: int, name: str, left: Iterable[str]) -> Kind:
    """How a column wraps: ``key`` (a name; wraps at dots, heads a row when folded), ``atom``
    (right-aligned numbers, shapes, dtypes: never wraps) or ``text`` (wraps like :class:`Wrapped`).

    Example:
        >>> [column_kind(i, c, ("key",)) for i, c in enumerate(["key", "max abs", "shape"])]
        ['key', 'atom', 'atom']
    """
    if name in _KEY_COLUMNS:
        return "key"
    if name in _ATOM_COLUMNS or (index > 0 and name not in set(left)):
        return "atom"
    return "text"


def words(plain: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each unbreakable piece of ``plain``, trailing separator included.

    Example:
        >>> s = "layers.0.w [2, 3] max 0.0007813"
        >>> [s[a:b] for a, b in words(s)]
        ['layers.', '0.', 'w ', '[2, 3] ', 'max ', '0.0007813']
    """
    out, start = [], 0
    shapes = [m.span() for m in _SHAPE.finditer(plain)]
    for m in _SPACES.finditer(plain):
        if any(a < m.start() < b for a, b in shapes):
            continue  # a shape, [4096, 4096], stays on one line
        if m.group() == ".":
            # Not between two digits (0.5, 1.3e-06, 2.4.0), not next to another dot ({0..23}, "...").
            before, after = plain[m.start() - 1:m.start()], plain[m.end():m.end() + 1]
            if "." in (before, after) or (before.isdigit() and after.isdigit()) or not after or after.isspace():
                continue
        if m.end() > start:
            out.append((start, m.end()))
            start = m.end()
    if start < len(plain):
        out.append((start, len(plain)))
    return out


def _longest_word(plain: str) -> int:
    return max((cell_len(line[a:b].rstrip()) for line in plain.split("\n") for a, b in words(line)), default=0)


def _longest_name(plain: str) -> int:
    return max((cell_len(w) for w in plain.split()), default=0)


def _widest_line(plain: str) -> int:
    return max((cell_len(line) for line in plain.split("\n")), default=0)


def _fill(sizes: list[int], highs: list[int], members: list[int], spare: int) -> None:
    """Grow ``sizes[members]`` towards ``highs`` by ``spare`` in all: up to a common cap, the
    narrow ones whole, what is left over to the first."""
    if spare <= 0 or not members:
        return
    base = {i: sizes[i] for i in members}

    def used(cap: int) -> int:
        return sum(max(base[i], min(hi, cap)) - base[i] for i, hi in zip(members, highs))

    lo_cap, hi_cap = 0, max(highs)
    while lo_cap < hi_cap:
        cap = (lo_cap + hi_cap + 1) // 2
        lo_cap, hi_cap = (cap, hi_cap) if used(cap) <= spare else (lo_cap, cap - 1)
    for i, hi in zip(members, highs):
        sizes[i] = max(base[i], min(hi, lo_cap))
    spare -= used(lo_cap)
    for i, hi in zip(members, highs):
        give = min(spare, hi - sizes[i])
        sizes[i] += give
        spare -= give


class Wrapped:
    """A :class:`~rich.text.Text` that wraps between words as :func:`words` cuts them.

    Example:
        >>> from rich.console import Console
        >>> import io
        >>> c = Console(width=12, file=io.StringIO())
        >>> c.print(Wrapped("layers.10.self_attn.q_proj"))
        >>> c.file.getvalue().splitlines()
        ['layers.10.', 'self_attn.', 'q_proj']
    """

    def __init__(self, text: Text | str, style: str = "", *, indent: int = 0) -> None:
        self.text = text if isinstance(text, Text) else Text(text, style=style)
        self.indent = indent  # spaces before every line (no trailing padding, unlike rich's Padding)

    def lines(self, width: int) -> Text:
        """The text with a line break wherever a line would pass ``width``."""
        text = self.text
        pieces: list[Text] = []
        for line in text.split("\n", allow_blank=True):
            cuts, used = [], 0
            space_at, used_at_space = -1, 0  # the last cut after a space on this line
            for a, b in words(line.plain):
                piece = line.plain[a:b]
                need = cell_len(piece.rstrip())
                if used and used + need > width:
                    # Between list items ("a.x, b.y") before inside a name ("b." / "y"), unless
                    # that leaves the line less than half full.
                    if 0 <= space_at < a and used_at_space * 2 >= width and used - used_at_space + need <= width:
                        cuts.append(space_at)
                        used -= used_at_space
                    else:
                        cuts.append(a)
                        used = 0
                    space_at = -1
                used += cell_len(piece)
                if piece.endswith(" "):
                    space_at, used_at_space = b, used
            for part in line.divide(cuts):
                part.rstrip()
                pieces.append(Text.assemble(" " * self.indent, part) if self.indent else part)
        out = Text("\n", style=text.style).join(pieces)
        out.overflow, out.no_wrap, out.justify = "fold", False, text.justify
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.lines(max(1, options.max_width - self.indent))

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        plain = self.text.plain
        return Measurement(_longest_word(plain) + self.indent,
                           _widest_line(plain) + self.indent).with_maximum(options.max_width)


def _plain(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def _text(cell: Any) -> Text:
    return cell.copy() if isinstance(cell, Text) else Text(str(cell))


class FitTable:
    """A table built like a rich ``Table`` (``add_row``, ``columns``, ``show_footer``) that fits
    the console it is printed on; see the module's docstring.

    Example:
        >>> from rich.console import Console
        >>> import io
        >>> t = FitTable("T", ["key", "max abs"], ["key", "atom"], ["left", "right"])
        >>> t.add_row("layers.0.self_attention_q.weight", "0.0007813")
        >>> c = Console(width=24, file=io.StringIO())
        >>> c.print(t)
        >>> c.file.getvalue().splitlines()
        ['T', 'layers.0.', 'self_attention_q.weight', '  max abs: 0.0007813']
    """

    def __init__(self, title: str, columns: Sequence[str], kinds: Sequence[Kind], justify: Sequence[str]) -> None:
        from rich import box
        from rich.table import Table

        self.kinds = list(kinds)
        # The table as built: its columns hold the cells and footers; a fitted copy is drawn.
        self.table: Table = Table(title=title or None, title_justify="left", title_style="bold", box=box.SIMPLE,
                                  show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
        for name, j in zip(columns, justify, strict=True):
            self.table.add_column(name, justify=j)  # type: ignore[arg-type]

    @property
    def columns(self) -> list[Column]:
        return self.table.columns

    @property
    def show_footer(self) -> bool:
        return self.table.show_footer

    @show_footer.setter
    def show_footer(self, value: bool) -> None:
        self.table.show_footer = value

    @property
    def row_count(self) -> int:
        return self.table.row_count

    def add_row(self, *cells: RenderableType | None) -> None:
        self.table.add_row(*cells)

    def _rows(self) -> list[list[Any]]:
        cols = [list(c.cells) for c in self.columns]
        rows = [list(r) for r in zip(*cols)] if cols else []
        if self.show_footer:
            rows.append([c.footer for c in self.columns])
        return rows

    def _bounds(self) -> list[tuple[int, int]]:
        """Each column's (narrowest, widest) content width."""
        out = []
        for column, kind in zip(self.columns, self.kinds, strict=True):
            texts = [_plain(c) for c in column.cells]
            texts += [_plain(column.footer)] if self.show_footer and column.footer is not None else []
            head = _plain(column.header)
            widest = max([_widest_line(t) for t in texts] + [_widest_line(head)])
            if kind == "atom":
                low = max([_widest_line(t) for t in texts] + [_longest_word(head)])  # a number on one line
            else:
                low = max(_longest_word(t) for t in [*texts, head])
            out.append((max(low, 1), max(widest, low, 1)))
        return out

    def widths(self, width: int) -> tuple[list[int], int] | None:
        """Content width of each column at console ``width`` and the gap between columns (two
        spaces, one where two do not fit); ``None``: it does not fit."""
        bounds = self._bounds()
        least = sum(lo for lo, _ in bounds)
        gap = next((g for g in (2, 1) if least + g * (len(bounds) - 1) <= width), None)
        if gap is None:
            return None
        room = width - gap * (len(bounds) - 1)
        if sum(hi for _, hi in bounds) <= room:
            return [hi for _, hi in bounds], gap
        if sum(hi for _, hi in bounds) <= room:
            return [hi for _, hi in bounds]
        # First each name whole (``a.b + c.d`` may still wrap at its spaces), then every flexible
        # column towards its widest cell, the wide ones giving way first.
        sizes = [lo for lo, _ in bounds]
        keys = [i for i, k in enumerate(self.kinds) if k == "key"]
        whole = [max([_longest_name(_plain(c)) for c in self.columns[i].cells] + [bounds[i][0]]) for i in keys]
        _fill(sizes, whole, keys, room - sum(sizes))
        flexible = [i for i, k in enumerate(self.kinds) if k != "atom"]
        _fill(sizes, [bounds[i][1] for i in flexible], flexible, room - sum(sizes))
        return sizes, gap

    def _fitted(self, widths: list[int], gap: int) -> Table:
        from rich.table import Table

        src = self.table
        t = Table(title=src.title, title_justify="left", title_style="bold", box=src.box, show_edge=False,
                  pad_edge=False, padding=(0, gap - 1), collapse_padding=True, show_footer=src.show_footer)
        for column, kind, w in zip(self.columns, self.kinds, widths, strict=True):
            footer = column.footer
            if footer is not None and kind != "atom":
                footer = Wrapped(_text(footer))
            t.add_column(Wrapped(_text(column.header)), footer=footer or "", justify=column.justify, width=w,
                         no_wrap=kind == "atom", overflow="fold")
        for cells in zip(*(list(c.cells) for c in self.columns)):
            t.add_row(*(_text(c) if k == "atom" else Wrapped(_text(c)) for c, k in zip(cells, self.kinds)))
        return t

    def _heading_columns(self) -> int:
        keys = [i for i, k in enumerate(self.kinds) if k == "key"]
        return keys[0] + 1 if keys and keys[0] <= 1 else 1

    def _vertical(self) -> list[RenderableType]:
        parts: list[RenderableType] = []
        if self.table.title:
            parts.append(Text(str(self.table.title), style="bold"))
        names = [" ".join(_plain(c.header).split()) for c in self.columns]
        lead = self._heading_columns()
        for row in self._rows():
            head = Text(style="bold")
            for i in range(lead):
                cell = _text(row[i] if row[i] is not None else "")
                if self.kinds[i] != "key" and cell.plain:
                    cell = Text.assemble(f"{names[i]}" if names[i] == "#" else f"{names[i]} ", cell) \
                        if names[i] else cell
                if cell.plain:
                    head.append_text(cell if not head.plain else Text.assemble("  ", cell))
            parts.append(Wrapped(head))
            for name, cell in zip(names[lead:], row[lead:]):
                value = _text(cell if cell is not None else "")
                if value.plain.strip():
                    line = Text.assemble(f"{name}: " if name else "", value)
                    parts.append(Wrapped(line, indent=2))
        return parts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        fit = self.widths(options.max_width)
        if fit is None:
            yield from self._vertical()
        else:
            yield self._fitted(*fit)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        bounds = self._bounds()
        gaps = 2 * (len(bounds) - 1)
        lo = max(max((lo for lo, _ in bounds), default=1), 1)
        return Measurement(lo, sum(hi for _, hi in bounds) + gaps).with_maximum(options.max_width)
