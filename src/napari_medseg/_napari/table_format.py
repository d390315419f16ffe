"""One number format in the plugin's tables: ratios with four decimals, counts as whole numbers
(Qt would otherwise show 0.0000, 8.580e-02 and 7.737e+05 side by side)."""

from __future__ import annotations


def fixed_decimals(table, decimals: int = 4) -> None:
    """Show ``table``'s (a magicgui ``Table``) floats with ``decimals`` places and integers as
    integers; the values themselves are unchanged (exports keep them)."""
    from qtpy.QtWidgets import QStyledItemDelegate

    class Delegate(QStyledItemDelegate):
        def displayText(self, value, locale):  # noqa: N802 (Qt's name)
            if isinstance(value, bool):
                return str(value)
            if isinstance(value, float):
                return f"{value:.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.{decimals}f}"
            return super().displayText(value, locale)

    table.native.setItemDelegate(Delegate(table.native))
    table.native._medseg_delegate = table.native.itemDelegate()  # keep it alive with the table
