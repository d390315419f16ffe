"""`medseg demo`: napari with the sample H&E, segmented by the default model, beside its ground
truth, with the metrics panel filled in."""

from __future__ import annotations

from .metrics_widget import MetricsWidget
from .model_list import FILE_MODEL
from .sample_data import consep_sample
from .segment_widget import SegmentWidget


def build_demo(viewer, model: str = "default") -> tuple[SegmentWidget, MetricsWidget]:
    layers = [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in consep_sample()]
    image, truth, truth_instances = layers[0], layers[1], layers[2]
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment (napari-medseg)", area="right")
    if model != "default":
        segment.model_source.value = FILE_MODEL
        segment.checkpoint.value = model
    segment.image_layer.value = image
    prediction = segment.run(threaded=False)  # a 256x256 patch takes well under a second
    metrics = MetricsWidget(viewer)
    viewer.window.add_dock_widget(metrics, name="Metrics (napari-medseg)", area="right")
    if prediction is not None:
        metrics.prediction.value = prediction
        metrics.ground_truth.value = truth
        metrics.gt_instances.value = truth_instances
        if segment.last_instances_layer is not None:
            metrics.pred_instances.value = segment.last_instances_layer
        metrics.compute()
    return segment, metrics


def _give_metrics_room(viewer) -> None:
    """Segment's dock as tall as its controls, the rest of the column for the metrics table."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget

    window = viewer.window._qt_window
    docks = {d.windowTitle(): d for d in window.findChildren(QDockWidget)}
    segment, metrics = docks.get("Segment (napari-medseg)"), docks.get("Metrics (napari-medseg)")
    if segment is not None and metrics is not None:
        window.resizeDocks([segment, metrics], [360, 600], Qt.Orientation.Vertical)


def run_demo(model: str = "default", show: bool = True, screenshot: str | None = None) -> None:
    import napari

    viewer = napari.Viewer(title="napari-medseg demo")
    _, metrics = build_demo(viewer, model)
    if metrics.result is not None:
        print(metrics.summary.value)
    if screenshot:
        # lay the window out at a readable size (docks included) before grabbing it: shown first,
        # since showing a window may give it back its saved or minimum geometry
        from qtpy.QtWidgets import QApplication

        viewer.window.show()
        QApplication.processEvents()
        viewer.window._qt_window.resize(1600, 1000)
        _give_metrics_room(viewer)
        QApplication.processEvents()
        viewer.reset_view()
        QApplication.processEvents()
        viewer.screenshot(screenshot, canvas_only=False)
        print(f"wrote {screenshot}")
    if show:
        napari.run()
    else:
        viewer.close()
