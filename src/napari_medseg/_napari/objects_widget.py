"""Objects widget: count nuclei per class and measure each (area, centroid, mean intensity)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, Table

from ..errors import MedsegError
from ..io.geojson import write_geojson
from ..io.tables import write_csv
from ..nuclei.measure import counts_per_class, object_table
from ..nuclei.watershed import InstanceSettings, semantic_to_instances
from .common import WidgetInputError, report_error
from .layers import METADATA_KEY, image_layers, instance_labels_kwargs, labels_layers, layer_classes, layer_kind

if TYPE_CHECKING:
    import napari


class ObjectsWidget(Container):
    # napari passes its viewer to a parameter of this name: see common.py
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self._viewer = napari_viewer
        self.class_layer = ComboBox(label="class map", choices=self._class_layers)
        self.instance_layer = ComboBox(label="instances", choices=self._instance_choices)
        self.image_layer = ComboBox(label="image", choices=self._image_choices)
        self.measure_button = PushButton(text="Measure objects")
        self.summary = Label(value="")
        self.table = Table(value={"data": [], "columns": []})
        self.csv_path = FileEdit(label="CSV", mode="w", filter="*.csv", value="objects.csv")
        self.export_csv_button = PushButton(text="Export objects as CSV")
        self.geojson_path = FileEdit(label="GeoJSON", mode="w", filter="*.geojson", value="objects.geojson")
        self.export_geojson_button = PushButton(text="Export outlines for QuPath (GeoJSON)")
        self.extend([self.class_layer, self.instance_layer, self.image_layer, self.measure_button, self.summary,
                     self.table, self.csv_path, self.export_csv_button, self.geojson_path, self.export_geojson_button])
        self.measure_button.changed.connect(lambda: self.measure())
        self.export_csv_button.changed.connect(lambda: self.export_csv())
        self.export_geojson_button.changed.connect(lambda: self.export_geojson())
        self._viewer.layers.events.inserted.connect(self.reset_choices)
        self._viewer.layers.events.removed.connect(self.reset_choices)
        self.reset_choices()
        self.objects: dict | None = None
        self._instances: np.ndarray | None = None

    def _class_layers(self, _widget=None) -> list:
        return labels_layers(self._viewer, exclude=("instances", "errors"))

    def _instance_choices(self, _widget=None) -> list:
        instances = [l for l in labels_layers(self._viewer) if layer_kind(l) == "instances"]
        return [("derive from class map (watershed)", None)] + [(l.name, l) for l in instances]

    def _image_choices(self, _widget=None) -> list:
        return [("none", None)] + [(l.name, l) for l in image_layers(self._viewer)]

    def _fail(self, error: BaseException | str) -> None:
        report_error(self.summary, error)

    def measure(self, add_instances_layer: bool = True) -> dict | None:
        layer = self.class_layer.value
        if layer is None:
            return self._fail("Choose a class-map Labels layer.")
        class_map = np.asarray(layer.data)
        names = layer_classes(layer) or ["background"] + [f"class {i}" for i in range(1, int(class_map.max(initial=0)) + 1)]
        try:
            if class_map.ndim != 2:
                raise WidgetInputError(f"Objects are measured on 2-D maps; '{layer.name}' has shape {class_map.shape}.")
            inst_layer = self.instance_layer.value
            if inst_layer is not None:
                instances = np.asarray(inst_layer.data)
            else:
                instances = semantic_to_instances(class_map, InstanceSettings())
            image_layer = self.image_layer.value
            image = np.asarray(image_layer.data) if image_layer is not None else None
            table = object_table(instances, class_map, names, image)
        except MedsegError as exc:
            return self._fail(exc)
        if inst_layer is None and add_instances_layer:
            self._viewer.add_labels(instances, **instance_labels_kwargs(f"{layer.name} instances"))
        columns = [c for c in table if c != "class_id"]
        rows = [[(round(float(v), 2) if isinstance(v, (float, np.floating)) else v) for v in row]
                for row in zip(*(table[c] for c in columns))]
        self.table.value = {"data": rows, "columns": columns}
        counts = counts_per_class(table)
        self.summary.value = f"{len(table['label'])} objects: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        self.objects, self._instances, self._names = table, instances, names
        return table

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        if self.objects is None:
            return self._fail("Measure the objects before exporting them.")
        target = Path(path or str(self.csv_path.value))
        try:
            return write_csv(target, {k: v for k, v in self.objects.items()})
        except OSError as exc:  # a folder that is not there or not writable: the user's to fix
            return self._fail(f"Cannot write {target}: {exc.strerror or exc}")

    def export_geojson(self, path: str | Path | None = None) -> Path | None:
        if self.objects is None:
            return self._fail("Measure the objects before exporting them.")
        target = Path(path or str(self.geojson_path.value))
        classes = np.zeros(int(self._instances.max(initial=0)) + 1, np.int64)
        classes[self.objects["label"]] = self.objects["class_id"]
        colors = self.class_layer.value.metadata.get(METADATA_KEY, {}).get("colors")
        try:
            return write_geojson(target, self._instances, classes, self._names, colors)
        except OSError as exc:  # a folder that is not there or not writable: the user's to fix
            return self._fail(f"Cannot write {target}: {exc.strerror or exc}")
