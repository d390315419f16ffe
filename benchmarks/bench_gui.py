"""The largest GUI-thread stall while a user opens a 1000² H&E image, segments it, scores it,
re-thresholds and paints on it, measures its nuclei and fine-tunes the model for one epoch on the painted result,
through the plugin's widgets (Plugins > napari-medseg).

A 50 ms QTimer ticks on the GUI thread; the longest gap between ticks beyond 50 ms, per step, is
how long the window stood frozen. Run under a display (xvfb-run -a python benchmarks/bench_gui.py
[image] [--why]); prints one line per step; ``--why`` adds, per step, where the GUI thread was
during its longest stall (its stack, sampled every 20 ms while it stood still) and the garbage
collections over 20 ms in any thread (each holds the interpreter lock).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_IMAGE = Path("/work/shared/data/monuseg_train/images/TCGA-21-5784-01Z-00-DX1.png")
TICK_MS = 50
SAMPLE_MS, SAMPLE_AFTER_MS = 20, 100
COLLECTION_MS = 20  # garbage collections longer than this are listed with --why
STACK_PLACES = ("napari_medseg", "napari/", "vispy", "matplotlib", "magicgui", "bench_gui")


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


class CollectionMeter:
    """Python's garbage collections over ``COLLECTION_MS`` since ``reset`` (generation, ms): a
    collection holds the interpreter lock, so a worker's stops the GUI thread too."""

    def __init__(self):
        import gc

        self.started, self.pauses = 0.0, []
        gc.callbacks.append(self._record)

    def _record(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif (took := (time.perf_counter() - self.started) * 1000) > COLLECTION_MS:
            self.pauses.append((info["generation"], took))

    def reset(self) -> None:
        self.pauses = []


class StallSampler(threading.Thread):
    """While the GUI thread has not ticked for over ``SAMPLE_AFTER_MS``, takes its stack every
    ``SAMPLE_MS``; ``longest()`` gives the commonest stacks of the longest stall since ``reset``."""

    def __init__(self, meter: StallMeter):
        super().__init__(daemon=True)
        self.meter, self.gui = meter, threading.get_ident()
        self.samples: dict[float, list[str]] = {}
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(SAMPLE_MS / 1000):
            started = self.meter.last
            frame = sys._current_frames().get(self.gui)
            if frame is not None and (time.perf_counter() - started) * 1000 > SAMPLE_AFTER_MS:
                self.samples.setdefault(started, []).append(stack_summary(frame))

    def reset(self):
        self.samples = {}

    def longest(self) -> list[tuple[str, int]]:
        if not self.samples:
            return []
        return Counter(max(self.samples.values(), key=len)).most_common(3)


def stack_summary(frame, depth: int = 4) -> str:
    """The innermost ``depth`` frames in the plugin, napari, vispy, matplotlib or magicgui."""
    frames = [f for f in traceback.extract_stack(frame) if any(p in f.filename for p in STACK_PLACES)]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-depth:]))


def wait_for(app, done, timeout_s: float = 600) -> None:
    end = time.perf_counter() + timeout_s
    while not done():
        if time.perf_counter() > end:
            raise TimeoutError("step did not finish")
        app.processEvents()
        time.sleep(0.005)


def main(image_path: Path, why: bool = False) -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    app = QApplication.instance()
    meter = StallMeter()
    sampler = StallSampler(meter)
    collections = CollectionMeter()
    if why:
        sampler.start()
    results = []

    def step(name, action, done=lambda: True):
        wait_for(app, lambda: True)
        meter.reset()
        sampler.reset()
        collections.reset()
        start = time.perf_counter()
        action()
        wait_for(app, done)
        for _ in range(5):  # let the last events (layer hand-off, redraw) run
            app.processEvents()
            time.sleep(TICK_MS / 1000)
        results.append((name, time.perf_counter() - start, meter.worst, sampler.longest(), collections.pauses))

    with tempfile.TemporaryDirectory() as models:
        run_steps(viewer, image_path, step, Path(models))
    sampler.stopped.set()
    print(f"image {image_path.name} {viewer.layers[0].data.shape}")
    for name, seconds, worst, *_ in results:
        print(f"{name:40s} took {seconds:7.2f} s; longest GUI stall {worst:6.0f} ms")
    for name, _, worst, stacks, pauses in results if why else ():
        print(f"\n== {name}: the GUI thread during its longest stall ({worst:.0f} ms), by samples")
        for stack, count in stacks:
            print(f"  {count * SAMPLE_MS:5d} ms  {stack}")
        if pauses:
            print(f"  garbage collections over {COLLECTION_MS} ms (any thread): "
                  + ", ".join(f"generation {generation} {took:.0f} ms" for generation, took in pauses))
    viewer.close()


def run_steps(viewer, image_path: Path, step, models: Path) -> None:
    """open -> segment -> metrics -> re-threshold -> paint -> objects -> 1-epoch fine-tune."""
    import numpy as np

    from napari_medseg.io.images import read_label_map

    step("open", lambda: viewer.open(str(image_path), plugin="napari-medseg"))
    image = viewer.layers[0]
    _, segment = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
    segment.image_layer.value = image
    step("segment (model load + tiles + nuclei)", lambda: segment.run(),
         lambda: segment.last_layer is not None and segment.run_button.enabled)  # its layers in turns
    truth_path = image_path.parent.parent / "instances" / (image_path.stem + ".tif")
    if truth_path.is_file():
        viewer.add_labels(read_label_map(truth_path), name="ground truth")
    _, metrics = viewer.window.add_plugin_dock_widget("napari-medseg", "Metrics")
    metrics.prediction.value = segment.last_layer
    metrics.ground_truth.value = viewer.layers["ground truth"] if truth_path.is_file() else segment.last_layer
    step("metrics (Compute)", lambda: metrics.compute(threaded=True), lambda: metrics.result is not None)
    layer = segment.last_layer
    # re-threshold before painting: a result edited by hand is not remade (the edits would go)
    segment.threshold.value = 0.6
    step("re-threshold", lambda: segment.rethreshold(), lambda: "0.60" in segment.status.value)

    def paint():
        coords = np.argwhere(layer.data == 0)[:400]
        layer.data_setitem(tuple(coords.T), 3)
    first = metrics.result
    step("paint + live recompute", paint, lambda: metrics.result is not first)
    _, objects = viewer.window.add_plugin_dock_widget("napari-medseg", "Objects")
    objects.class_layer.value = segment.last_layer
    step("objects (Measure)", lambda: objects.measure(threaded=True), lambda: objects.objects is not None)
    train = fine_tune_form(viewer, image, segment.last_layer, models)
    step("fine-tune 1 epoch (painted layers)", lambda: train.run(),
         lambda: train.result is not None or train.error is not None)
    if train.error:
        print(f"fine-tune failed: {train.error}")


def fine_tune_form(viewer, image, labels, models: Path):
    """The Train widget set to fine-tune the shipped model for one epoch on the painted result."""
    from napari_medseg._napari.train_widget import DEFAULT_MODEL, FROM_LAYERS

    _, train = viewer.window.add_plugin_dock_widget("napari-medseg", "Train")
    train.source.value = FROM_LAYERS
    train.image_layer.value, train.labels_layer.value = image, labels
    train.start_from.value = DEFAULT_MODEL
    train.epochs.value = 1
    train.device.value = "cpu"
    train.output_dir.value = str(models)
    train.model_name.value = "bench"
    return train


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--why", action="store_true", help="print where the GUI thread stood during each step's "
                                                           "longest stall")
    args = parser.parse_args()
    main(args.image, args.why)
