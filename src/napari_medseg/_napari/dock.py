"""The base of the plugin's tall docks: a form that scrolls inside its dock.

napari docks a widget's ``native``; for a scrollable magicgui container that is the form inside
the scroll area, so a tall form in a short dock was cut off (its buttons out of reach) or grew
the window past the screen. These docks hand napari the scroll area itself.
"""

from __future__ import annotations

from magicgui.widgets import ComboBox, Container

SCROLL_MIN_HEIGHT = 200  # px a dock keeps however many docks share the column
DOCK_MIN_WIDTH = 400  # px: the main window gives a dock its minimum; the metrics table needs about this
CHOICE_MIN_CHARS = 12  # a layer or model list may shrink to this many characters; its popup shows whole names


class ScrollingDock(Container):
    def __init__(self, **kwargs):
        super().__init__(scrollable=True, **kwargs)  # docks never push the window past the screen
        self.root_native_widget.setMinimumHeight(SCROLL_MIN_HEIGHT)
        from qtpy.QtCore import Qt

        # rows keep their height at the top of a tall dock: alone in its column, Segment's rows had
        # been spread down the window with gaps as tall as the rows
        self.root_native_widget.widget().layout().setAlignment(Qt.AlignmentFlag.AlignTop)
        self._width_keeper = _keep_form_width(self.root_native_widget)

    def insert(self, key, widget) -> None:
        super().insert(key, widget)
        for box in _combo_boxes(widget):
            # a combo box is as wide as its longest choice ('CoNSeP H&E segmentation', a checkpoint's
            # path): wider than the dock, the form was cut off on the right (no horizontal scrolling)
            from qtpy.QtWidgets import QComboBox

            box.native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            box.native.setMinimumContentsLength(CHOICE_MIN_CHARS)
            # a box narrower than its choice shows the name's start only (MoNuSeg's four layers all
            # read 'TCGA-21-5786-01Z-00-DX1'): the whole name on hover
            box.native.setToolTip(box.native.currentText())
            box.native.currentTextChanged.connect(box.native.setToolTip)

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


def _combo_boxes(widget) -> list:
    """``widget`` if it is a combo box, else those of a folded group of settings (a nested form)."""
    if isinstance(widget, ComboBox):
        return [widget]
    if isinstance(widget, Container):
        return [box for child in widget for box in _combo_boxes(child)]
    return []


def _keep_form_width(scroll):
    """Keep ``scroll`` (the dock's scroll area, which scrolls up and down only) at least as wide as
    its form's narrowest layout: a dock narrower than that had clipped the form's right edge
    (Train's advanced settings lost its buttons' text, its status the model's name). The main
    window then gives the dock that width and the canvas the rest. Returns the event filter,
    which the dock keeps."""
    from qtpy.QtCore import QEvent, QObject

    class WidthKeeper(QObject):
        def eventFilter(self, watched, event):  # noqa: N802 (Qt's name)
            if event.type() == QEvent.Type.LayoutRequest:
                _fit_label_columns(watched)
                bar = scroll.verticalScrollBar().sizeHint().width()
                fits = watched.minimumSizeHint().width() + bar + 2 * scroll.frameWidth()
                scroll.setMinimumWidth(max(fits, DOCK_MIN_WIDTH))
            return False

    keeper = WidthKeeper(scroll)
    scroll.widget().installEventFilter(keeper)
    return keeper


def _fit_label_columns(form) -> None:
    """Widen each label column of ``form`` (the form's own, and a folded group's) to its widest
    label as drawn: magicgui sizes the column by the default font's text width, and napari's
    style draws a little wider, so the longest label lost its last letter ('dataset folde')."""
    from qtpy.QtWidgets import QLabel

    columns: dict[int, list] = {}
    for label in form.findChildren(QLabel):
        # a column's labels: a fixed minimum width, one line; status lines and legends wrap
        if label.wordWrap() or label.minimumWidth() <= 0 or label.isHidden():
            continue
        row = label.parentWidget()
        columns.setdefault(id(row.parentWidget() if row is not None else None), []).append(label)
    for labels in columns.values():
        need = max(label.sizeHint().width() for label in labels)
        for label in labels:
            if label.minimumWidth() < need:
                label.setMinimumWidth(need)
