"""The Metrics dock read at 1600x1000 beside Segment, as a newcomer opens them from the menu: the
table has the dock's width (it had shown two columns beside an empty label column) and every
class row without scrolling; the class list is as tall as its classes."""

from __future__ import annotations

PLUGIN = "napari-medseg"


def test_metrics_table_spans_the_dock_and_shows_every_row(make_napari_viewer):
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "consep")
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    dock, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    seg.device.value = "cpu"
    assert seg.run(threaded=False) is not None, seg.status.value
    metrics.reset_choices()
    metrics.compute()
    QApplication.processEvents()
    table = metrics.table.native
    scroll = dock.widget()
    assert table.width() > 0.9 * scroll.viewport().width(), (table.width(), scroll.viewport().width())
    assert metrics.summary.native.width() > 0.9 * scroll.viewport().width()
    columns = [table.horizontalHeaderItem(i).text() for i in range(table.columnCount())]
    shown = [name for i, name in enumerate(columns)
             if table.columnViewportPosition(i) + table.columnWidth(i) <= table.viewport().width()]
    assert shown[:4] == ["IoU", "Dice", "Precision", "Recall"], shown  # read without scrolling sideways
    rows = [table.verticalHeaderItem(i).text() for i in range(table.rowCount())]
    assert rows == ["background", "other", "inflammatory", "epithelial", "spindle", "overall (nuclei)"], rows
    last = table.rowCount() - 1
    assert table.rowViewportPosition(last) + table.rowHeight(last) <= table.viewport().height()  # no scrolling down
    classes = metrics.visible_classes.native
    assert classes.height() < 8 * classes.fontMetrics().lineSpacing()  # not the list's default ten rows and more
