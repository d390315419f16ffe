"""One number format in the plugin's tables: ratios with four decimals, counts as whole numbers
(Qt would otherwise show 0.0, 0.839, 8.580e-02 and 7.737e+05 side by side)."""

from __future__ import annotations


def display_number(value, decimals: int = 4) -> str | None:
    """How a table cell shows ``value``; ``None`` where it is no number (Qt's own text then).
    magicgui's ``Table`` keeps every cell as text, so numbers arrive as strings."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit():
            return text  # a count, as it is
        try:
            value = float(text)
        except ValueError:
            return None
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.{decimals}f}"
    return None


def fixed_decimals(table, decimals: int = 4) -> None:
    """Show ``table``'s (a magicgui ``Table``) floats with ``decimals`` places and integers as
    integers; the values themselves are unchanged (exports keep them)."""
    from qtpy.QtWidgets import QStyledItemDelegate

    class Delegate(QStyledItemDelegate):
        def displayText(self, value, locale):  # noqa: N802 (Qt's name)
            shown = display_number(value, decimals)
            return super().displayText(value, locale) if shown is None else shown

    table.native.setItemDelegate(Delegate(table.native))
    table.native._medseg_delegate = table.native.itemDelegate()  # keep it alive with the table
