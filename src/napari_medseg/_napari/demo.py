"""`medseg demo`: napari with the sample H&E segmented by the default model (nuclei outlined in
their class colours over the class map), scored against its ground truth in the metrics panel."""

from __future__ import annotations

from .metrics_widget import MetricsWidget
from .model_list import FILE_MODEL
from .sample_data import consep_sample
from .segment_widget import SegmentWidget

SEGMENT_DOCK, METRICS_DOCK = "Segment (napari-medseg)", "Metrics (napari-medseg)"


def build_demo(viewer, model: str = "default") -> tuple[SegmentWidget, MetricsWidget]:
    layers = {kwargs["name"]: getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in consep_sample()}
    image, truth, truth_instances = layers["CoNSeP H&E"], layers["CoNSeP ground truth"], layers["CoNSeP instances"]
    truth.visible = False  # scored in Metrics; drawn, it would hide the prediction's outlines
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name=SEGMENT_DOCK, area="right")
    if model != "default":
        segment.model_source.value = FILE_MODEL
        segment.checkpoint.value = model
    segment.image_layer.value = image
    prediction = segment.run(threaded=False)  # a 256x256 patch takes well under a second
    metrics = MetricsWidget(viewer)
    # its scroll area, not the form inside it (what napari docks of a magicgui widget): the
    # metrics scroll in their part of the column rather than being cut off
    viewer.window.add_dock_widget(metrics.root_native_widget, name=METRICS_DOCK, area="right")
    if prediction is not None:
        metrics.prediction.value = prediction
        metrics.ground_truth.value = truth
        metrics.gt_instances.value = truth_instances
        if segment.last_instances_layer is not None:
            metrics.pred_instances.value = segment.last_instances_layer
        metrics.compute()
    return segment, metrics


def _give_metrics_room(viewer, segment: SegmentWidget, metrics: MetricsWidget) -> None:
    """Segment's dock as tall as its controls, status and legend need at the column's width; the
    rest of the column for the metrics, scrolled to their summary and table."""
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtWidgets import QApplication, QDockWidget

    window = viewer.window._qt_window
    docks = {d.windowTitle(): d for d in window.findChildren(QDockWidget)}
    segment_dock, metrics_dock = docks.get(SEGMENT_DOCK), docks.get(METRICS_DOCK)
    if segment_dock is None or metrics_dock is None:
        return
    scroll = segment.native  # the dock holds a scroll area round the form: the form's own height counts
    form = scroll.widget() if hasattr(scroll, "widget") and scroll.widget() is not None else scroll
    chrome = segment_dock.height() - (scroll.viewport().height() if hasattr(scroll, "viewport") else scroll.height())
    wanted = (form.heightForWidth(form.width()) if form.hasHeightForWidth() else -1)
    height = (wanted if wanted > 0 else form.sizeHint().height()) + chrome
    rest = segment_dock.height() + metrics_dock.height() - height
    window.resizeDocks([segment_dock, metrics_dock], [height, rest], Qt.Orientation.Vertical)
    QApplication.processEvents()
    scroll.verticalScrollBar().setValue(0)  # all of Segment, from its image box to its legend
    scroll = metrics.root_native_widget
    summary_top = metrics.summary.native.mapTo(scroll.widget(), QPoint(0, 0)).y()
    scroll.verticalScrollBar().setValue(summary_top - 8)


def run_demo(model: str = "default", show: bool = True, screenshot: str | None = None) -> None:
    import napari

    viewer = napari.Viewer(title="napari-medseg demo")
    segment, metrics = build_demo(viewer, model)
    if metrics.result is not None:
        print(metrics.summary.value)
    if screenshot:
        # lay the window out at a readable size (docks included) before grabbing it: shown first,
        # since showing a window may give it back its saved or minimum geometry
        from qtpy.QtWidgets import QApplication

        viewer.window.show()
        QApplication.processEvents()
        viewer.window._qt_window.resize(1600, 1000)
        QApplication.processEvents()  # docks are laid out at the new size before they are split
        _give_metrics_room(viewer, segment, metrics)
        QApplication.processEvents()
        viewer.reset_view()
        QApplication.processEvents()
        viewer.screenshot(screenshot, canvas_only=False)
        print(f"wrote {screenshot}")
    if show:
        napari.run()
    else:
        viewer.close()
