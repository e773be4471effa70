"""CSV cells that a spreadsheet will not run as formulas (OWASP "CSV injection").

Excel, LibreOffice and Google Sheets evaluate a cell that starts with ``=``, ``+``,
``-`` or ``@`` (and some also after a leading tab or carriage return) as a formula: a
file named ``=HYPERLINK("http://evil","x").jpg`` would become a live link in the
predictions CSV. Every CSV imgflow writes passes its text cells through
:func:`safe_cell`, which prefixes such a cell with a single quote, as OWASP recommends.

The opt-out (``neutralise=False``; the config key ``csv_neutralise: false``) is for
pipelines that read the CSV with a program and need the raw paths back. A neutralised
cell is reversible: drop one leading ``'`` when the next character is one of
:data:`FORMULA_PREFIXES`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: first characters a spreadsheet treats as the start of a formula
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any, neutralise: bool = True) -> str:
    """A CSV cell as text, with a leading ``'`` when it would start a spreadsheet formula.

    Args:
        value: the cell value (converted with ``str``; None becomes "").
        neutralise: False returns the text unchanged (the documented opt-out).

    Returns:
        ``"'=1+1.jpg"`` for ``"=1+1.jpg"``; every other text as it is.
    """
    text = "" if value is None else str(value)
    if neutralise and text.startswith(FORMULA_PREFIXES):
        return "'" + text
    return text


def safe_row(values: Iterable[Any], neutralise: bool = True) -> list[str]:
    """:func:`safe_cell` applied to every cell of a row."""
    return [safe_cell(value, neutralise) for value in values]


def restore_cell(text: str) -> str:
    """The original text of a cell :func:`safe_cell` neutralised (inverse of it)."""
    if text.startswith("'") and text[1:].startswith(FORMULA_PREFIXES):
        return text[1:]
    return text
