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


def test_no_form_is_wider_than_its_dock_with_every_setting_shown(make_napari_viewer):
    """Train's advanced settings had made its form 445 px wide in a 365 px dock (no sideways
    scrolling): 'Choose directory' read 'Cho', the status lost the model's name, the loss plot its
    last epoch. Now the dock keeps the form's width, and every label shows all its letters."""
    from qtpy.QtWidgets import QApplication, QLabel, QPushButton

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "consep")
    docks = {name: viewer.window.add_plugin_dock_widget(PLUGIN, name) for name in ("Segment", "Train", "Metrics")}
    for _, widget in docks.values():
        if hasattr(widget, "show_advanced"):
            widget.show_advanced.value = True
    for _ in range(5):
        QApplication.processEvents()
    assert (window.width(), window.height()) == (1600, 1000)
    assert viewer.window._qt_viewer.canvas.native.width() >= 0.5 * window.width()
    for name, (dock, _) in docks.items():
        scroll = dock.widget()
        form = scroll.widget()
        assert form.width() <= scroll.viewport().width(), (name, form.width(), scroll.viewport().width())
        for label in form.findChildren(QLabel):
            if label.isVisible() and not label.wordWrap() and label.text():
                assert label.width() >= label.sizeHint().width(), (name, label.text(), label.width())
        for button in form.findChildren(QPushButton):
            if button.isVisible():
                assert button.width() >= button.sizeHint().width() - 2, (name, button.text(), button.width())


def test_a_dock_alone_in_its_column_keeps_its_rows_together(make_napari_viewer):
    """Segment alone at 1600x1000: its rows had been spread down the window, a gap as tall as a
    row between each (a walkthrough's screenshot); they stay together at the top."""
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "consep")
    dock, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    for _ in range(5):
        QApplication.processEvents()
    assert dock.height() > 700  # the column's whole height
    image_row, model_row = (widget.native.mapTo(dock, widget.native.rect().topLeft()).y()
                            for widget in (seg.image_layer, seg.model_source))
    row = seg.image_layer.native.height()
    assert model_row - image_row < 3 * (row + 12), (image_row, model_row, row)  # two rows apart, not spread


def test_a_layer_box_too_narrow_for_its_name_shows_the_whole_name_on_hover(make_napari_viewer):
    """MoNuSeg's layer names outgrow Metrics' boxes, whose text is cut at the right: all four had
    read 'TCGA-21-5786-01Z-00-DX1'. Each box's tooltip is its whole choice, and follows it."""
    import numpy as np
    from qtpy.QtWidgets import QApplication

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    case = "TCGA-21-5786-01Z-00-DX1"
    classes = np.zeros((32, 32), np.uint8)
    classes[4:12, 4:12] = 1
    viewer.add_labels(classes, name=f"{case} ground truth")
    viewer.add_labels(classes.copy(), name=f"{case} classes")
    _, metrics = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    QApplication.processEvents()
    for box in (metrics.prediction, metrics.ground_truth):
        native = box.native
        assert native.toolTip() == native.currentText() and native.currentText().startswith(case), native.toolTip()
    metrics.prediction.value = viewer.layers[f"{case} ground truth"]
    QApplication.processEvents()
    assert metrics.prediction.native.toolTip() == f"{case} ground truth"
