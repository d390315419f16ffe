"""Objects widget: count nuclei per class and measure each (area, in µm² where the pixel size is
known; centroid; mean intensity), off the GUI thread."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, PushButton

from ..errors import MedsegError
from ..io.geojson import write_geojson
from ..io.pixel_size import is_plausible_pixel_size
from ..io.tables import write_csv
from ..nuclei.measure import counts_per_class, nucleus_count, object_table
from ..nuclei.watershed import InstanceSettings, semantic_to_instances
from .common import (WidgetInputError, warm_label_visuals, class_map_top, class_names, export_target, numbered_classes,
                     report_error, start_worker, write_failure)
from .dock import ScrollingDock
from .fast_table import FastTable
from .table_format import fixed_decimals
from .layers import (METADATA_KEY, NUCLEUS_OUTLINE_PX, image_layers, in_memory_plane, instance_labels_kwargs,
                     labels_layers, layer_kind, legend_html, nuclei_twin_name, pixel_size_um, place, placement,
                     plane_placement, recorded_origin, recorded_polygon, region_in, region_origin, shown_plane,
                     shown_plane_words, with_origin, wrapping_label)

if TYPE_CHECKING:
    import napari

DERIVE = "derive from class map (watershed)"
CLASS_MAP_INSTEAD = "Choose it under 'instances', and a class map (e.g. Segment's) as the class map."


# shown first: the dock is narrow, and what a reader looks for (what, how big) sat behind the centroids
FIRST_COLUMNS = ("class", "area_um2", "area")


def table_rows(table: dict) -> dict:
    """The object table as a magicgui ``Table`` value: one row per nucleus, named by its id;
    ``FIRST_COLUMNS`` first (the CSV keeps the table's own order)."""
    columns = [c for c in FIRST_COLUMNS if c in table]
    columns += [c for c in table if c not in ("label", "class_id", *columns)]
    rows = [[_cell(v) for v in row] for row in zip(*(table[c] for c in columns))]
    return {"data": rows, "index": [str(int(i)) for i in table["label"]], "columns": columns}


def _cell(value):
    if isinstance(value, (float, np.floating)):
        return round(float(value), 2)
    return value.item() if isinstance(value, np.generic) else value


def _spatial_shape(layer) -> tuple | None:
    """An image layer's (H, W); None for a pyramid (a slide: measured through a region's result)."""
    if getattr(layer, "multiscale", False):
        return None
    return tuple(layer.data.shape[:-1] if getattr(layer, "rgb", False) else layer.data.shape)


def _matching(layer, class_layer, what: str, plane: tuple[int, ...] | None = None) -> np.ndarray:
    """``layer``'s pixels under the class map ``class_layer``, pixel for pixel: all of them, or for
    a region's result (Segment's drawn shape, field of view) those of the region, where the map
    records it and sits on ``layer`` there. A class map that is one plane of a stack (Segment's
    result on a PanNuke fold's shown patch) takes that plane of a stacked ``layer``; a stacked
    class map measured at its ``plane`` takes that plane of a stack like it."""
    shape = class_layer.data.shape
    if getattr(layer, "multiscale", False):
        return _region_of_pyramid(layer, class_layer)
    if plane is not None and layer.ndim == class_layer.ndim and tuple(layer.data.shape[:len(plane)]) == shape[:len(plane)]:
        data = in_memory_plane(layer, "measuring nuclei", plane=plane)
        shape = shape[len(plane):]
    else:
        data = in_memory_plane(layer, "measuring nuclei", under=class_layer)
    spatial = data.shape[:-1] if getattr(layer, "rgb", False) else data.shape
    if len(shape) > 2 and all(n == 1 for n in shape[:-2]):
        shape = shape[-2:]  # one plane: measured as its 2-D map (in_memory_plane)
    if spatial == shape:
        return data
    region = region_in(class_layer, shape, layer, spatial) if len(spatial) == len(shape) == 2 else None
    if region is None:
        raise WidgetInputError(f"'{layer.name}' has shape {data.shape}, the class map '{class_layer.name}' "
                               f"{shape}; choose the {what} of the same 2-D image.")
    return data[region]


def _region_of_pyramid(layer, class_layer) -> np.ndarray:
    """The level-0 pixels of a slide (a pyramid) under a region's result that lies on it (Segment's
    region of a slide, in memory): that region only is read. Any other map: refused, as a pyramid is."""
    level0 = layer.data[0]
    spatial = tuple(level0.shape[:-1] if getattr(layer, "rgb", False) else level0.shape)
    shape = class_layer.data.shape
    region = region_in(class_layer, shape, layer, spatial) if len(shape) == len(spatial) == 2 else None
    if region is None:
        in_memory_plane(layer, "measuring nuclei")  # says why a pyramid is not read whole
    return np.asarray(level0[region])


def _plane_words(viewer, layer, plane: tuple[int, ...]) -> str:
    """Which image of a stack was measured."""
    return (f"\n\n'{layer.name}' is a stack: the image shown ({shown_plane_words(viewer, layer, plane)}) was measured. "
            "Move the slider and Measure again for another.")


class ObjectsWidget(ScrollingDock):
    # napari passes its viewer to a parameter of this name: see common.py
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        warm_label_visuals()  # off the GUI thread: the first result layer is added sooner
        super().__init__()
        self._viewer = napari_viewer
        self._worker = None
        self.objects: dict | None = None
        self._instances: np.ndarray | None = None
        self._origin = (0, 0)  # (y, x) of the measured map's first pixel in its image
        self._colors = None  # the measured class map's colours (its GeoJSON export uses them)
        self.class_layer = ComboBox(label="class map", choices=self._class_layers)
        self.instance_layer = ComboBox(label="instances", choices=self._instance_choices)
        self.image_layer = ComboBox(label="image", choices=self._image_choices)
        self.measure_button = PushButton(text="Measure objects")
        self.summary = wrapping_label(value="")
        self.legend = wrapping_label(value="")
        self.table = FastTable(value={"data": [], "index": [], "columns": []})
        self.table.min_height = 240
        fixed_decimals(self.table, 2)
        self.table.enable_sorting()  # a header click: the largest nuclei, one class together, ...
        self.table.native.setSelectionBehavior(self.table.native.SelectionBehavior.SelectRows)
        self.table.native.itemSelectionChanged.connect(self._go_to_selected)
        self._measured_layer = None  # the class map measured, and the nuclei layer measured with it
        self._measured_plane = None  # of a stacked class map: the index of the image measured
        self._nuclei_layer = None
        self.csv_path = FileEdit(label="CSV", mode="w", filter="*.csv")
        self.export_csv_button = PushButton(text="Export objects as CSV")
        self.geojson_path = FileEdit(label="GeoJSON", mode="w", filter="*.geojson")
        self.export_geojson_button = PushButton(text="Export outlines for QuPath (GeoJSON)")
        self.extend([self.class_layer, self.instance_layer, self.image_layer, self.measure_button, self.summary,
                     self.legend, self.table, self.csv_path, self.export_csv_button, self.geojson_path,
                     self.export_geojson_button])
        self.span_full_width(self.summary, self.legend, self.table)
        self.measure_button.changed.connect(lambda: self.measure(threaded=True))
        self.export_csv_button.changed.connect(lambda: self.export_csv())
        self.export_geojson_button.changed.connect(lambda: self.export_geojson())
        # what the widget itself last put in these boxes: a box showing something else, the user chose
        # (magicgui says nothing when a box is set to None, 'derive' / 'none': so compared, not signalled)
        self._auto = {"instance_layer": None, "image_layer": None}
        self._class_map_shown = None
        self._auto_class_map = None  # the class map the widget chose (not the user): a new result replaces it
        self._derived: dict = {}  # class-map layer -> the layer of nuclei derived from it (this widget's)
        self.class_layer.changed.connect(self._on_class_map)
        self._viewer.layers.events.inserted.connect(self._on_inserted)
        self._viewer.layers.events.removed.connect(self._refill)
        self._refill()
        self._pick_newest_class_map()
        self._pick_instances()

    def _pick_newest_class_map(self) -> None:
        """Opened after a run: the class map the user selected in the layer list, else the newest
        (Segment's result, not the ground truth opened before it, which the box's first choice
        had been: Measure counted the truth while Segment had just counted its own nuclei)."""
        choices = self._class_layers()
        if not choices:
            return
        active = self._viewer.layers.selection.active
        self.class_layer.value = self._auto_class_map = active if any(active is c for c in choices) else choices[-1]

    def _refill(self, *_) -> None:
        """The boxes' choices again (a layer went): a box moved off a removed layer was not the user's choice."""
        chosen = {box: self._user_chose(box) for box in self._auto}
        self.reset_choices()
        for box, by_user in chosen.items():
            if not by_user:
                self._auto[box] = getattr(self, box).value

    def _user_chose(self, box: str) -> bool:
        return getattr(self, box).value is not self._auto[box]

    def _on_class_map(self, *_) -> None:
        """Another class map: its own nuclei and image, whatever was chosen for the one before (the
        box refilled as a layer comes or goes says its value again: not another map)."""
        if self.class_layer.value is not self._class_map_shown:
            self._class_map_shown = self.class_layer.value
            self._pick_instances(keep_choices=False)
        else:
            self._pick_instances()

    def _on_inserted(self, event=None):
        """A new layer among the choices; the class map's own nuclei where they are it. Segment adds
        its class map first and its nuclei a turn later: the class map, chosen as it came, had been
        measured with nuclei derived by a watershed (another count than Segment's). What the user
        chose stays (also 'derive from class map'). A new Segment result replaces a class map the
        widget chose itself: opened before the run, it had measured the ground truth again (104 nuclei
        where Segment had just found 65)."""
        self._refill()
        new = getattr(event, "value", None)
        if (new is not None and new.name.endswith(" segmentation") and layer_kind(new) == "classes"
                and self.class_layer.value is self._auto_class_map and any(new is c for c in self._class_layers())):
            self.class_layer.value = self._auto_class_map = new  # its own nuclei follow (_on_class_map)
        self._pick_instances()

    def _class_layers(self, _widget=None) -> list:
        return labels_layers(self._viewer, exclude=("instances", "errors"))

    def _instance_choices(self, _widget=None) -> list:
        # the plugin's instance maps first; any other (e.g. a file napari's own reader opened) may be one
        layers = labels_layers(self._viewer, exclude=("errors",))
        layers.sort(key=lambda l: layer_kind(l) != "instances")
        return [(DERIVE, None)] + [(l.name, l) for l in layers]

    def _image_choices(self, _widget=None) -> list:
        return [("none", None)] + [(l.name, l) for l in image_layers(self._viewer)]

    def _pick_instances(self, keep_choices: bool = True):
        """The class map's own nuclei (Segment's '<image> nuclei' beside '<image> segmentation', a
        file's or sample's '<name> instances' beside its '<name> labels' / '<name> ground truth'),
        so that Objects counts the nuclei Segment or the annotator counted; derived by a
        watershed without them. Then its image (``_own_image``). With ``keep_choices``, a box the
        user set stays."""
        self.instance_layer.reset_choices()  # a layer being inserted may not be among its choices yet
        self.image_layer.reset_choices()
        for box, own in (("instance_layer", self._own_nuclei), ("image_layer", self._own_image)):
            if not (keep_choices and self._user_chose(box)):
                getattr(self, box).value = self._auto[box] = own()

    def _own_nuclei(self):
        layer = self.class_layer.value
        twin = nuclei_twin_name(layer.name) if layer is not None else None
        for _name, candidate in self._instance_choices():
            if twin and candidate is not None and candidate.name == twin and candidate.data.shape == layer.data.shape:
                return candidate
        return None

    def _own_image(self):
        """The image the class map was made of, for the intensity columns: the image layer whose
        name the class map's starts with ('<image> segmentation'), else the only one its size;
        none where that is not clear."""
        layer = self.class_layer.value
        if layer is None:
            return None
        images = [candidate for _name, candidate in self._image_choices() if candidate is not None]
        named = [im for im in images if layer.name.startswith(im.name + " ")]
        sized = [im for im in images if _spatial_shape(im) == layer.data.shape]
        return max(named, key=lambda im: len(im.name)) if named else sized[0] if len(sized) == 1 else None

    def _fail(self, error: BaseException | str) -> None:
        report_error(self.summary, error)

    def _inputs(self):
        layer = self.class_layer.value
        if layer is None:
            raise WidgetInputError("Choose a class-map Labels layer.")
        lead = layer.ndim - 2
        # a stack (a PanNuke fold's ground truth): the image the viewer shows, as Segment takes it
        plane = (shown_plane(self._viewer, layer, lead)
                 if lead > 0 and not all(n == 1 for n in layer.data.shape[:lead]) else None)
        class_map = in_memory_plane(layer, "measuring nuclei", plane=plane)
        if class_map.ndim != 2:
            raise WidgetInputError(f"Objects are measured on 2-D maps; '{layer.name}' has shape {class_map.shape}.")
        top = class_map_top(layer.name, class_map, class_names(layer), instead=CLASS_MAP_INSTEAD)
        names = class_names(layer) or numbered_classes(top)
        inst_layer, image_layer = self.instance_layer.value, self.image_layer.value
        instances = _matching(inst_layer, layer, "nuclei", plane) if inst_layer is not None else None
        if instances is not None and instances.min(initial=0) < 0:
            raise WidgetInputError(f"'{inst_layer.name}' holds the negative id {int(instances.min())}; nucleus ids "
                                   "are 1 and up (0 = background).")
        image = _matching(image_layer, layer, "image", plane) if image_layer is not None else None
        # the map's own where it records one: Segment records a pixel size typed in its form there
        # (the image's scale is then 1)
        recorded = "pixel_size_um" in getattr(layer, "metadata", {})
        pixel_size = pixel_size_um(layer if recorded or image_layer is None else image_layer)
        if not is_plausible_pixel_size(pixel_size):  # a display scale of 100, not µm: areas in px only
            pixel_size = None
        return layer, plane, class_map, names, instances, image, pixel_size

    def measure(self, add_instances_layer: bool = True, threaded: bool = False):
        """Measure every nucleus; returns the table (or, ``threaded``, the started worker)."""
        try:
            layer, plane, class_map, names, instances, image, pixel_size = self._inputs()
        except MedsegError as exc:
            return self._fail(exc)

        def job():
            derived = instances is None
            found = semantic_to_instances(class_map, InstanceSettings()) if derived else instances
            return object_table(found, class_map, names, image, pixel_size), found, derived

        def done(result, in_steps=True):
            return self._show(result, layer, plane, names, add_instances_layer, in_steps)

        if not threaded:
            try:
                return done(job(), in_steps=False)
            except MedsegError as exc:
                return self._fail(exc)
        self.summary.value = "Measuring..."
        self.measure_button.enabled = False
        self._worker = start_worker(job, on_error=self._fail, returned=done,
                                    finished=lambda: setattr(self.measure_button, "enabled", True))
        return self._worker

    def _show(self, result, layer, plane, names: list[str], add_instances_layer: bool, in_steps: bool) -> dict:
        table, instances, derived = result
        # centroids in the image's pixels: a region's result sits at the region's corner
        origin = recorded_origin(layer.metadata)
        table["centroid_y"], table["centroid_x"] = table["centroid_y"] + origin[0], table["centroid_x"] + origin[1]
        if derived and add_instances_layer:
            self._show_derived(layer, plane, instances, origin)
        self.table.fill(table_rows(table), in_steps)  # thousands of rows: a slice per event-loop turn
        counts = counts_per_class(table)
        area = (f"; mean area {np.mean(table['area_um2']):.1f} µm²" if "area_um2" in table and len(table["label"])
                else "")
        self.summary.value = (f"{nucleus_count(instances)} nuclei: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                              + area + (_plane_words(self._viewer, layer, plane) if plane is not None else ""))
        info = layer.metadata.get(METADATA_KEY, {})
        self.legend.value = legend_html(names, info.get("colors"))
        self.objects, self._instances, self._names = table, instances, names
        self._origin, self._colors = origin, info.get("colors")
        self._measured_layer, self._measured_plane = layer, plane
        self._nuclei_layer = self._derived.get(layer) if derived else self.instance_layer.value
        return table

    def _go_to_selected(self) -> None:
        """A row chosen in the table: the view centred on that nucleus, its id the nuclei layer's
        selected label (shown in the layer controls; the brush would paint it)."""
        q = self.table.native
        rows = sorted({i.row() for i in q.selectedIndexes()})
        if len(rows) != 1 or self.objects is None or self._measured_layer not in self._viewer.layers:
            return
        header = q.verticalHeaderItem(rows[0])
        try:
            nucleus = int(header.text()) if header is not None else None
        except ValueError:
            return
        where = np.flatnonzero(np.asarray(self.objects["label"]) == nucleus)
        if nucleus is None or not where.size:
            return
        i = int(where[0])
        # the table's centroids are in the image's pixels; the map's own start at its origin
        y = float(self.objects["centroid_y"][i]) - self._origin[0]
        x = float(self.objects["centroid_x"][i]) - self._origin[1]
        layer, plane = self._measured_layer, self._measured_plane
        lead = layer.ndim - 2
        point = [float(k) for k in (plane or (0,) * lead)] + [y, x]
        world = layer.data_to_world(point)
        if plane is not None:  # the stack's plane that was measured, wherever the slider is now
            for axis in range(lead):
                self._viewer.dims.set_point(self._viewer.dims.ndim - layer.ndim + axis, world[axis])
        scene = getattr(self._viewer, "scene", None)  # napari >= 0.9 keeps the camera there
        (scene.camera if scene is not None else self._viewer.camera).center = tuple(world[-2:])
        nuclei = self._nuclei_layer
        if nuclei is not None and nuclei in self._viewer.layers:
            nuclei.selected_label = nucleus

    def _show_derived(self, layer, plane, instances: np.ndarray, origin: tuple[int, int]) -> None:
        """The nuclei derived from ``layer`` in a layer of their own: the one made for it before,
        updated in place (each Measure had added one more), else a new one. Of a stack's
        ``plane``: on that plane only."""
        kwargs = with_origin(instance_labels_kwargs(f"{layer.name} instances"), region_origin(layer.metadata),
                             recorded_polygon(layer.metadata))
        where = placement(layer)
        if plane is not None:
            where = plane_placement(layer, plane, where)
            instances = instances.reshape((1,) * len(plane) + instances.shape)
        self._derived = {c: d for c, d in self._derived.items() if c in self._viewer.layers and d in self._viewer.layers}
        made = self._derived.get(layer)
        if made is not None:  # its name as it is now (the user's, maybe)
            made.metadata = kwargs["metadata"]
            made.data = instances  # first: a new shape, then its place (napari checks scale against ndim)
            place(made, where)
            return
        made = self._viewer.add_labels(instances, **kwargs, **where)
        made.contour = NUCLEUS_OUTLINE_PX
        self._derived[layer] = made

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        if self.objects is None:
            return self._fail("Measure the objects before exporting them.")
        return self._export(self.csv_path, path, lambda target: write_csv(target, dict(self.objects)))

    def export_geojson(self, path: str | Path | None = None) -> Path | None:
        if self.objects is None:
            return self._fail("Measure the objects before exporting them.")
        # id -> class as a mapping: another tool's ids may be huge and sparse (no table up to the largest)
        classes = dict(zip(self.objects["label"].tolist(), self.objects["class_id"].tolist()))
        colors = self._colors  # the measured map's, not whatever the class-map box shows now
        return self._export(self.geojson_path, path,
                            lambda target: write_geojson(target, self._instances, classes, self._names, colors,
                                                         self._origin))

    def _export(self, path_widget, path, write) -> Path | None:
        target = export_target(path_widget, path)
        if target is None:
            self.summary.value = "Nothing exported."
            return None
        try:
            written = write(target)
        except OSError as exc:  # a folder that is not there or not writable: the user's to fix
            return self._fail(write_failure(target, exc))
        self.summary.value = f"Wrote {len(self.objects['label'])} nuclei to {written}"
        return written
