"""The largest GUI-thread stall while a user opens a 1000² H&E image, segments it, scores it,
paints on it and measures its nuclei, through the plugin's widgets (Plugins > napari-medseg).

A 50 ms QTimer ticks on the GUI thread; the longest gap between ticks beyond 50 ms, per step, is
how long the window stood frozen. Run under a display (xvfb-run -a python benchmarks/bench_gui.py
[image]); prints one line per step.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_IMAGE = Path("/work/shared/data/monuseg_train/images/TCGA-21-5784-01Z-00-DX1.png")
TICK_MS = 50


class StallMeter:
    """Longest gap between ticks of a 50 ms timer, less the 50 ms, since ``reset``."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.timeout.connect(self._tick)
        self.reset()
        self.timer.start(TICK_MS)

    def _tick(self):
        now = time.perf_counter()
        self.worst = max(self.worst, (now - self.last) * 1000 - TICK_MS)
        self.last = now

    def reset(self):
        self.last, self.worst = time.perf_counter(), 0.0


def wait_for(app, done, timeout_s: float = 600) -> None:
    end = time.perf_counter() + timeout_s
    while not done():
        if time.perf_counter() > end:
            raise TimeoutError("step did not finish")
        app.processEvents()
        time.sleep(0.005)


def main(image_path: Path) -> None:
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_medseg.io.images import read_label_map

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    app = QApplication.instance()
    meter = StallMeter()
    results = []

    def step(name, action, done=lambda: True):
        wait_for(app, lambda: True)
        meter.reset()
        start = time.perf_counter()
        action()
        wait_for(app, done)
        for _ in range(5):  # let the last events (layer hand-off, redraw) run
            app.processEvents()
            time.sleep(TICK_MS / 1000)
        results.append((name, time.perf_counter() - start, meter.worst))

    step("open", lambda: viewer.open(str(image_path), plugin="napari-medseg"))
    _, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    segment.image_layer.value = viewer.layers[0]
    step("segment (model load + tiles + nuclei)", lambda: segment.run(), lambda: segment.last_layer is not None)
    truth_path = image_path.parent.parent / "instances" / (image_path.stem + ".tif")
    if truth_path.is_file():
        viewer.add_labels(read_label_map(truth_path), name="ground truth")
    _, metrics = viewer.window.add_plugin_dock_widget("napari-medseg", "Metrics")
    metrics.prediction.value = segment.last_layer
    metrics.ground_truth.value = viewer.layers["ground truth"] if truth_path.is_file() else segment.last_layer
    step("metrics (Compute)", lambda: metrics.compute(threaded=True), lambda: metrics.result is not None)
    layer = segment.last_layer

    def paint():
        coords = np.argwhere(layer.data == 0)[:400]
        layer.data_setitem(tuple(coords.T), 3)
    first = metrics.result
    step("paint + live recompute", paint, lambda: metrics.result is not first)
    segment.threshold.value = 0.6
    step("re-threshold", lambda: segment.rethreshold(), lambda: "0.60" in segment.status.value)
    _, objects = viewer.window.add_plugin_dock_widget("napari-medseg", "Objects")
    objects.class_layer.value = segment.last_layer
    step("objects (Measure)", lambda: objects.measure(threaded=True), lambda: objects.objects is not None)
    print(f"image {image_path.name} {viewer.layers[0].data.shape}")
    for name, seconds, worst in results:
        print(f"{name:40s} took {seconds:7.2f} s; longest GUI stall {worst:6.0f} ms")
    viewer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_IMAGE)
