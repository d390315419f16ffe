"""napari's process without torch: opening the plugin's four widgets, segmenting a slide (in a
child process) and then an image (here, by the runtime the slide run recorded) from the Segment
widget, and fine-tuning on painted layers from the Train widget (in a child process) load no
deep-learning framework into the viewer. torch there froze the GUI for seconds
when the Segment widget opened and doubled the cost of every later garbage collection (the
result hand-off's largest stall on a whole slide).

The viewer runs in a fresh python (this test process has long imported torch), as a user's does."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from napari_medseg.devices import available_devices, probe_devices
from test_slides import _mosaic, _write_slide

VIEWER_SCRIPT = r"""
import json, sys
import napari
from qtpy.QtCore import QEventLoop, QTimer
from napari_medseg._napari.segment_widget import FILE_MODEL, WHOLE_IMAGE, WHOLE_SLIDE

slide, checkpoint, results = sys.argv[1:4]
viewer = napari.Viewer(show=False)
(layer,) = viewer.open(slide, plugin="napari-medseg")
for name in ("Metrics", "Objects", "Train"):
    viewer.window.add_plugin_dock_widget("napari-medseg", name)
_, widget = viewer.window.add_plugin_dock_widget("napari-medseg", "Segment")
torch_after_open = "torch" in sys.modules
widget.model_source.value, widget.checkpoint.value = FILE_MODEL, checkpoint
widget.device.value, widget.tile_size.value, widget.overlap.value = "cpu", 128, 32
widget.results_folder.value, widget.target.value = results, WHOLE_SLIDE
loop = QEventLoop()
set_running = widget._set_running

def running(now):  # the run is over when the Segment button is back: every layer is in
    set_running(now)
    if not now:
        loop.quit()

widget._set_running = running
widget.run()
QTimer.singleShot(300_000, loop.quit)
loop.exec()
slide_run = {"torch_after_run": "torch" in sys.modules, "layers": [layer.name for layer in viewer.layers],
             "status": widget.status.value}
widget.target.value = WHOLE_IMAGE  # the slide's full-resolution level as an image, in this process
widget.run()
QTimer.singleShot(300_000, loop.quit)
loop.exec()
image_run = {"torch_after_image_run": "torch" in sys.modules, "image_status": widget.status.value,
             "layers_after_image_run": len(viewer.layers)}
# a fine-tune on painted layers from the Train widget, threaded as the button runs it
import tifffile
from napari_medseg._napari.train_widget import FILE_MODEL as TRAIN_FILE_MODEL, FROM_LAYERS
from napari_medseg.io import read_image
consep = sys.argv[4]
he = viewer.add_image(read_image(f"{consep}/images/train_1_005.png"), name="H&E", rgb=True)
painted = viewer.add_labels(tifffile.imread(f"{consep}/labels/train_1_005.tif").astype("uint8"), name="painted")
train = [w for name, w in viewer.window.dock_widgets.items() if "Train" in name][0]
train.source.value, train.start_from.value, train.checkpoint.value = FROM_LAYERS, TRAIN_FILE_MODEL, checkpoint
train.image_layer.value, train.labels_layer.value = he, painted
train.tile_size.value, train.val_fraction.value, train.crops_per_image.value = 128, 0.25, 2
train.crop_size.value, train.batch_size.value, train.epochs.value, train.device.value = 64, 4, 1, "cpu"
train.output_dir.value, train.model_name.value = results + "-models", "tuned"
train.run()
QTimer.singleShot(300_000, loop.quit)
timer = QTimer(); timer.timeout.connect(lambda: (train.result is not None or train.error is not None) and loop.quit())
timer.start(100)
loop.exec()
print(json.dumps({"torch_after_open": torch_after_open, **slide_run, "devices": list(widget.device.choices),
                  **image_run, "trained": train.result is not None, "train_error": train.error,
                  "torch_after_training": "torch" in sys.modules}))
"""


def test_a_slide_is_segmented_from_the_viewer_without_torch_in_its_process(consep, tiny_checkpoint, tmp_path):
    image = np.full((1024, 1024, 3), 242, np.uint8)
    image[256:768, 256:768] = _mosaic(consep, "image", 2)
    _write_slide(tmp_path / "slide.tif", image)
    done = subprocess.run([sys.executable, "-c", VIEWER_SCRIPT, str(tmp_path / "slide.tif"), str(tiny_checkpoint),
                           str(tmp_path / "results"), str(consep)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["layers"] == ["slide", "slide segmentation", "slide nuclei"], seen
    assert "nuclei" in seen["status"] and "failed" not in seen["status"].lower(), seen["status"]
    assert not seen["torch_after_open"] and not seen["torch_after_run"], seen
    # an image run in napari's own process loads the model by the runtime the slide run recorded
    assert seen["layers_after_image_run"] == 5 and "nuclei" in seen["image_status"], seen["image_status"]
    assert not seen["torch_after_image_run"]
    # a fine-tune from the Train widget trains in a process of its own
    assert seen["trained"] and seen["train_error"] is None and not seen["torch_after_training"], seen
    # the device list came from a child python that has torch: the same as this process's own
    assert seen["devices"] == available_devices()


@pytest.mark.parametrize("gpu_nodes", [True, False], ids=["asks-a-child", "no-gpu-node"])
def test_the_device_probe_lists_torchs_devices_without_loading_torch(gpu_nodes):
    # as on a machine with a GPU's device node (the child python is asked), and as on this one
    script = ("import json, sys; import napari_medseg.devices as d; "
              f"d.gpu_possible = lambda: {gpu_nodes}; import subprocess; run = subprocess.run; calls = []; "
              "subprocess.run = lambda *a, **k: calls.append(a) or run(*a, **k); "
              "print(json.dumps([d.probe_devices(), 'torch' in sys.modules, len(calls)]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    devices, torch_loaded, children = json.loads(done.stdout.strip().splitlines()[-1])
    assert devices == available_devices() and not torch_loaded
    assert children == (1 if gpu_nodes else 0)
    assert probe_devices() == available_devices()  # torch already loaded here: asked directly


def test_no_gpu_is_possible_without_a_gpu_device_node(monkeypatch):
    import napari_medseg.devices as devices

    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: [])
    assert not devices.gpu_possible()
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    assert devices.gpu_possible()
    monkeypatch.setattr(devices.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(devices.sys, "platform", "darwin")  # Metal: only torch can tell
    assert devices.gpu_possible()


def test_a_failing_device_probe_leaves_the_devices_every_machine_has(monkeypatch, tmp_path):
    import napari_medseg.devices as devices

    monkeypatch.delitem(sys.modules, "torch")  # as in a viewer that has not loaded it (restored after)
    monkeypatch.setattr(devices, "gpu_possible", lambda: True)  # as on a machine with a GPU's device node
    monkeypatch.setattr(devices.sys, "executable", str(tmp_path / "no-python-here"))
    assert probe_devices() == ["auto", "cpu"]
    broken = tmp_path / "python-that-prints-nonsense"
    broken.write_text("#!/bin/sh\necho 'not json'\n")
    broken.chmod(0o755)
    monkeypatch.setattr(devices.sys, "executable", str(broken))
    assert probe_devices() == ["auto", "cpu"]


TORCH_FREE_MODULES = (  # what napari's process imports to open the widgets and run a slide, and what the
    # slide run's process imports to segment by a recorded runtime (``Segmenter.load_recorded``)
    "napari_medseg.devices", "napari_medseg.models", "napari_medseg.training", "napari_medseg.training.config",
    "napari_medseg.inference.rethreshold", "napari_medseg.inference.slide", "napari_medseg.inference.slide_process",
    "napari_medseg.inference.segmenter", "napari_medseg.inference.runtime_record", "napari_medseg.inference.backends",
    "napari_medseg.io.slides",
    "napari_medseg._napari.reader", "napari_medseg._napari.writers", "napari_medseg._napari.segment_widget",
    "napari_medseg._napari.metrics_widget", "napari_medseg._napari.objects_widget",
    "napari_medseg._napari.train_widget",
)


def test_the_viewers_modules_import_without_torch():
    """Each module alone, in a fresh python: the first to pull torch in is named."""
    script = """
import builtins, importlib, json, sys
first = []
real_import = builtins.__import__
def watching(name, globals=None, locals=None, fromlist=(), level=0):
    if (name == "torch" or name.startswith("torch.")) and "torch" not in sys.modules and not first:
        first.append((globals or {}).get("__name__"))
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = watching
for module in sys.argv[1:]:
    importlib.import_module(module)
    if first:
        print(json.dumps([module, first[0]]))
        break
else:
    print(json.dumps(None))
"""
    done = subprocess.run([sys.executable, "-c", script, *TORCH_FREE_MODULES], capture_output=True, text=True,
                          timeout=300, check=True)
    culprit = json.loads(done.stdout.strip().splitlines()[-1])
    assert culprit is None, f"importing {culprit[0]} loads torch (first imported by {culprit[1]})"
