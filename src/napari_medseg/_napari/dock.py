"""The base of the plugin's tall docks: a form that scrolls inside its dock.

napari docks a widget's ``native``; for a scrollable magicgui container that is the form inside
the scroll area, so a tall form in a short dock was cut off (its buttons out of reach) or grew
the window past the screen. These docks hand napari the scroll area itself.
"""

from __future__ import annotations

from magicgui.widgets import ComboBox, Container

SCROLL_MIN_HEIGHT = 200  # px a dock keeps however many docks share the column
CHOICE_MIN_CHARS = 12  # a layer or model list may shrink to this many characters; its popup shows whole names


class ScrollingDock(Container):
    def __init__(self, **kwargs):
        super().__init__(scrollable=True, **kwargs)  # docks never push the window past the screen
        self.root_native_widget.setMinimumHeight(SCROLL_MIN_HEIGHT)

    def insert(self, key, widget) -> None:
        super().insert(key, widget)
        if isinstance(widget, ComboBox):
            # a combo box is as wide as its longest choice ('CoNSeP H&E segmentation', a checkpoint's
            # path): wider than the dock, the form was cut off on the right (no horizontal scrolling)
            from qtpy.QtWidgets import QComboBox

            widget.native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            widget.native.setMinimumContentsLength(CHOICE_MIN_CHARS)

    def span_full_width(self, *widgets) -> None:
        """Give each of ``widgets`` (already in the form) the dock's whole width: a status line,
        a legend or a table has no label, yet the form kept a label column's width empty beside
        it, and a metrics table of nine columns showed two of them."""
        for widget in widgets:
            labeled = getattr(widget, "_labeled_widget", lambda: None)()  # magicgui's label + widget row
            if labeled is not None:
                labeled._label_widget.visible = False

    @property
    def native(self):
        """The scroll area round the form (what napari docks)."""
        return self.root_native_widget
