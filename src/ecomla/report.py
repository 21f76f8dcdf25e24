"""One Markdown table writer for every report (conversion table, eval results, recipe reports)."""

from __future__ import annotations


def markdown_table(header: list[str], rows: list[list], fmt=str) -> str:
    """| header |, |---|, one line per row; each cell through `fmt(column, value)` when fmt takes two
    arguments, else `fmt(value)`; None prints as '-'."""
    two = fmt is not str and fmt.__code__.co_argcount == 2

    def cell(c, v):
        if v is None:
            return "-"
        return str(fmt(c, v) if two else fmt(v))

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(header, r)) + " |" for r in rows]
    return "\n".join(lines)
