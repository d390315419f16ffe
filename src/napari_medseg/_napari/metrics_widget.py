"""Metrics panel: a prediction Labels layer against a ground-truth Labels layer, per class.

Recomputes (debounced, off the GUI thread) when either layer is painted; shows TP/FP/FN
overlays (redrawn with each recompute, their colours keyed in the legend); hides classes of the
prediction one by one; exports the table as CSV.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, PushButton, Select

from ..errors import MedsegError
from ..evaluation.error_maps import ERROR_COLORS, ERROR_NAMES, error_counts, error_map
from ..evaluation.ground_truth import (NUCLEUS_CLASSES, GroundTruth, as_scored, compare_to_ground_truth,
                                       ground_truth_from_label_map, merged_classes)
from ..evaluation.report import report_json
from ..evaluation.semantic import MetricsInputError
from ..inference.regions import Region
from ..io.images import atomic_write
from ..io.tables import write_csv
from ..nuclei.edits import nuclei_following
from .common import (CLASS_ID_LIMIT, warm_label_visuals, WidgetInputError, class_map_top, class_names, export_target,
                     numbered_classes, report_error, start_worker, write_failure)
from .dock import ScrollingDock
from .fast_table import FastTable
from .layers import (ANNOTATION_ENDINGS, METADATA_KEY, class_colormap, hidden_words, in_memory_plane, labels_layers,
                     layer_kind, legend_html, nuclei_twin_name, place, placement, recorded_polygon, region_in,
                     wrapping_label)
from .table_format import fixed_decimals
from .view_regions import inside

if TYPE_CHECKING:
    import napari

COLUMNS = ["IoU", "Dice", "Precision", "Recall", "PQ", "F1", "GT px", "Pred px", "GT objects", "Pred objects"]
ALL_CLASSES = "all classes"
DEBOUNCE_MS = 400
PREDICTION_INSTEAD = "Choose it under 'predicted instances', and a class map (e.g. Segment's) as the prediction."
TRUTH_INSTEAD = "Choose it under 'GT instances', and a class map or nucleus mask as the ground truth."


def _cell(value):
    """Numbers rounded for reading; undefined (NaN) shown as '-'."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else round(value, 4)
    return value


def _mask_value(pred: np.ndarray, truth_classes: list[str] | None) -> int:
    """The one value of an unnamed prediction read as a nucleus mask (0 if it is not one): a single
    value, 1 or beyond the ground truth's class ids (e.g. 255), as an unnamed ground truth is read."""
    top = int(pred.max(initial=0))
    if top == 0 or np.any((pred != 0) & (pred != top)):
        return 0
    return top if top == 1 or (truth_classes is not None and top >= len(truth_classes)) or top == 255 else 0


def _instance_map(layer, class_layer, class_map: np.ndarray, under=None) -> np.ndarray:
    """The nuclei of ``layer``, checked against the class map ``class_layer`` they belong to
    (``class_map``: the plane of it compared; ``under``: the layer whose plane of a stack it is)."""
    data = in_memory_plane(layer, "comparing with ground truth", under=under)
    if data.shape != class_map.shape:
        raise MetricsInputError(f"'{layer.name}' has shape {data.shape}, '{class_layer.name}' "
                                f"{class_map.shape}; choose the nuclei of the same image.")
    if data.min(initial=0) < 0:
        raise MetricsInputError(f"'{layer.name}' holds the negative id {int(data.min())}; nucleus ids are 1 and up "
                                "(0 = background).")
    return data


VISIBLE_CLASS_ROWS = 6  # the class list's height in rows (CoNSeP's four and PanNuke's five without scrolling)


class MetricsWidget(ScrollingDock):
    # napari passes its viewer to a parameter of this name: see common.py
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        warm_label_visuals()  # off the GUI thread: the first result layer is added sooner
        super().__init__()
        self._viewer = napari_viewer
        self.prediction = ComboBox(label="prediction", choices=self._class_layers)
        # empty where no layer but the prediction could be one (a slide's region result alone)
        self.ground_truth = ComboBox(label="ground truth", choices=self._class_layers, nullable=True)
        self.gt_instances = ComboBox(label="GT instances", choices=self._instance_choices)
        # e.g. the Segment widget's nuclei layer, seeded by the model's distance map
        self.pred_instances = ComboBox(label="predicted instances", choices=self._instance_choices)
        self.live = CheckBox(text="recompute when painted", value=True)
        self.compute_button = PushButton(text="Compute metrics")
        self.summary = wrapping_label(value="")
        self.legend = wrapping_label(value="")
        self.table = FastTable(value={"data": [], "index": [], "columns": COLUMNS})
        self.table.min_height = 190  # the overall row and every class row without scrolling
        fixed_decimals(self.table)
        self.csv_path = FileEdit(label="CSV", mode="w", filter="*.csv")
        self.export_button = PushButton(text="Export table as CSV")
        self.error_class = ComboBox(label="errors of", choices=self._error_choices)
        self.errors_button = PushButton(text="Show TP / FP / FN overlay")
        self.visible_classes = Select(label="show classes", choices=self._class_choices)
        self.extend([self.prediction, self.ground_truth, self.gt_instances, self.pred_instances, self.live, self.compute_button,
                     self.summary, self.legend, self.table, self.csv_path, self.export_button, self.error_class,
                     self.errors_button, self.visible_classes])
        self.span_full_width(self.summary, self.legend, self.table)
        # a row per class, not the list's default ten: the form's height goes to the table
        rows = self.visible_classes.native
        rows.setMaximumHeight(VISIBLE_CLASS_ROWS * rows.fontMetrics().lineSpacing() + 2 * rows.frameWidth() + 4)
        self.compute_button.changed.connect(lambda: self.compute(threaded=True))
        self.export_button.changed.connect(lambda: self.export_csv())
        self.errors_button.changed.connect(lambda: self.show_errors())
        self.visible_classes.changed.connect(self._apply_visible_classes)
        for box in (self.prediction, self.ground_truth, self.gt_instances, self.pred_instances):
            box.changed.connect(self._watch_layers)  # painting any of the four recomputes
        self.prediction.changed.connect(self._show_all_classes)
        self.prediction.changed.connect(self._pick_instances)
        self._viewer.layers.events.inserted.connect(self._on_inserted)
        self._viewer.layers.events.removed.connect(self.reset_choices)
        self.result: dict | None = None
        self._metrics_text = ""  # the summary of the last computed metrics
        self._class_legend = ""
        self._error_key = ""  # the shown overlay's colours and pixel counts (rich text, under the legend)
        self._instances_note = ""
        self._compared: dict = {}  # the layers the shown numbers compared, and the panel's notes
        self._hidden_by_overlay: list = []  # layers the error overlay hid (said while they stay hidden)
        self._region_note = ""  # what part of the ground truth a region's result is scored on
        self._worker = None
        self._watched: list = []
        self._timer = None
        self._picked = None  # the predicted nuclei ``_pick_instances`` chose (not the user)
        self._painted: set[int] = set()  # ids of predictions painted by hand: their nuclei follow the edits
        self._unpainted: tuple[int, np.ndarray] | None = None  # (prediction id, its nucleus pixels when chosen)
        self.reset_choices()
        self._auto = {"prediction": self.prediction.value, "ground_truth": self.ground_truth.value,
                      "gt_instances": self.gt_instances.value}  # magicgui's first choices, not the user's
        self._pick_layers()
        self._pick_instances()
        self.visible_classes.value = list(self.visible_classes.choices)

    # -- choices ------------------------------------------------------------------------
    def _class_layers(self, _widget=None) -> list:
        # layers we know hold instances (or TP / FP / FN overlays) are not class maps
        return labels_layers(self._viewer, exclude=("instances", "errors"))

    def _instance_choices(self, _widget=None) -> list:
        # the plugin's instance maps first; any other (e.g. a file napari's own reader opened) may be one
        layers = labels_layers(self._viewer, exclude=("errors",))
        layers.sort(key=lambda l: layer_kind(l) != "instances")
        return [("derive from class map (watershed)", None)] + [(l.name, l) for l in layers]

    def _on_inserted(self, *_):
        """A new layer among the choices; the prediction's own nuclei where they are it (Segment
        adds its class map first, its nuclei a turn later)."""
        self.reset_choices()
        self._pick_layers()
        chosen = self.pred_instances.value
        if chosen is self._picked:
            self._pick_instances()  # a layer the user chose stays, 'derive' too

    def _pick_layers(self) -> None:
        """Boxes the user has not set: Segment's newest result as the prediction, a ground truth
        that is another layer (a file's or sample's '<name> ground truth' / '<name> labels' /
        '<name>_labels' first), and that ground truth's own annotated nuclei ('<name> instances',
        '<name>_instances': a file pair's had been left out, the nuclei derived). Both boxes had shown the
        first class map: 'the same layer' on the sample, and Segment's result never chosen."""
        layers = self._class_layers()
        if not layers:
            return
        results = [layer for layer in layers if layer.name.endswith(" segmentation")]
        if results and self.prediction.value is self._auto["prediction"]:
            self.prediction.value = self._auto["prediction"] = results[-1]
        prediction = self.prediction.value
        if self.ground_truth.value is self._auto["ground_truth"] or self.ground_truth.value is prediction:
            others = [layer for layer in layers if layer is not prediction]
            if prediction is not None:  # of the prediction's size; its own image's first ('<image> ground truth')
                others = [layer for layer in others if layer.data.shape == prediction.data.shape]
            image = prediction.name[:-len(" segmentation")] if prediction is not None and \
                prediction.name.endswith(" segmentation") else None
            own = [layer for layer in others if image and layer.name in (image + end for end in ANNOTATION_ENDINGS)]
            annotated = [layer for layer in others if layer.name.endswith(ANNOTATION_ENDINGS)]
            # alone, an annotation stays the ground truth (the prediction box follows Segment's result);
            # a result alone is no ground truth of itself: the box stays empty
            alone = prediction if prediction is not None and prediction.name.endswith(ANNOTATION_ENDINGS) else None
            kept = self.ground_truth.value if self.ground_truth.value is not prediction else None
            truth = (own or annotated or others or [kept or alone])[0]
            self.ground_truth.value = self._auto["ground_truth"] = truth
        truth = self.ground_truth.value
        if self.gt_instances.value is self._auto["gt_instances"] and truth is not None:
            twin = nuclei_twin_name(truth.name) if truth.name.endswith(ANNOTATION_ENDINGS) else None
            own = [layer for _name, layer in self._instance_choices()
                   if twin and layer is not None and layer.name == twin and layer.data.shape == truth.data.shape]
            self.gt_instances.value = self._auto["gt_instances"] = own[0] if own else None

    def _pick_instances(self, *_):
        """Segment's own nuclei ('<image> nuclei' beside its '<image> segmentation') as the predicted
        instances: the nuclei Segment counted and outlined, seeded by its model's distance map.
        Derived from the class map by a plain watershed, its scores had differed from those of the
        nuclei shown (bPQ 0.433 against 0.418 on the CoNSeP sample)."""
        layer = self.prediction.value
        twin = layer.name.replace(" segmentation", " nuclei") if layer is not None and " segmentation" in layer.name \
            else None  # only Segment's results have a twin (a painted one's follow its edits: ``_inputs``)
        self.pred_instances.reset_choices()  # a layer being inserted may not be among its choices yet
        for _name, candidate in self._instance_choices():
            if (twin and candidate is not None and candidate.name == twin and layer_kind(candidate) == "instances"
                    and candidate.data.shape == layer.data.shape):
                self.pred_instances.value = self._picked = candidate
                return
        if self._picked is not None and self.pred_instances.value is self._picked:
            # another prediction's nuclei would be scored with this one: derived instead; a layer the user chose stays
            self.pred_instances.value = self._picked = None

    def _names(self) -> list[str]:
        for layer in (self.ground_truth.value, self.prediction.value):
            names = class_names(layer)
            if names:
                return names
        return []

    def _error_choices(self, _widget=None) -> list:
        return [ALL_CLASSES] + self._names()[1:]

    def _class_choices(self, _widget=None) -> list:
        return (class_names(self.prediction.value) or self._names())[1:]

    def _show_all_classes(self, *_):
        """A newly chosen prediction shows all its classes (the list's choices follow it)."""
        self.reset_choices()
        self.visible_classes.value = list(self.visible_classes.choices)

    # -- live recompute -----------------------------------------------------------------
    def _watch_layers(self, *_):
        for layer in self._watched:
            layer.events.paint.disconnect(self._schedule)
            layer.events.data.disconnect(self._schedule)
            layer.events.paint.disconnect(self._prediction_painted)
            layer.events.data.disconnect(self._prediction_replaced)
        chosen = (self.prediction.value, self.ground_truth.value, self.gt_instances.value, self.pred_instances.value)
        self._watched = [l for l in {id(l): l for l in chosen if l}.values()]
        for layer in self._watched:
            layer.events.paint.connect(self._schedule)
            layer.events.data.connect(self._schedule)
        prediction = self.prediction.value
        if prediction is not None:
            prediction.events.paint.connect(self._prediction_painted)
            prediction.events.data.connect(self._prediction_replaced)
            if self._unpainted is None or self._unpainted[0] != id(prediction):
                self._prediction_replaced()

    def _prediction_replaced(self, *_):
        """The prediction's nucleus pixels as its nuclei were made (chosen, or remade by Segment's
        re-threshold, which remakes its nuclei too): what painting adds is told from what Segment
        left out. Not once painted: the edits would count as made with the nuclei."""
        prediction = self.prediction.value
        if prediction is None or id(prediction) in self._painted:
            return
        plain = not getattr(prediction, "multiscale", False) and isinstance(prediction.data, np.ndarray)
        self._unpainted = (id(prediction), prediction.data > 0) if plain else None

    def _prediction_painted(self, *_):
        """A painted class map: its nuclei follow the edits (``nuclei_following``), said in the panel."""
        self._painted.add(id(self.prediction.value))
        if self.pred_instances.value is not None:
            self._instances_note = (f"'{self.pred_instances.value.name}' follows the painted prediction: each nucleus "
                                    "keeps its pixels where the prediction still has a nucleus class, and each newly "
                                    "painted piece counts as a nucleus.")

    def _schedule(self, *_):
        """Debounce: many paint events in a stroke lead to one recompute."""
        if not self.live.value or self.result is None:
            return
        from qtpy.QtCore import QTimer

        if self._timer is None:
            self._timer = QTimer(self.native)  # goes with the dock: never fires into a closed one
            self._timer.setSingleShot(True)
            self._timer.timeout.connect(lambda: self.compute(threaded=True))
        self._timer.start(DEBOUNCE_MS)

    # -- metrics ------------------------------------------------------------------------
    def _inputs(self):
        """(ground truth, prediction, its class names, predicted instances or None), checked."""
        pred_layer, gt_layer = self.prediction.value, self.ground_truth.value
        if pred_layer is None:
            raise MetricsInputError("Choose a prediction and a ground-truth Labels layer.")
        if gt_layer is None:
            raise MetricsInputError(
                f"No ground truth to compare '{pred_layer.name}' with: open one (a dataset folder, a label TIFF of "
                "the same image) or paint one in a new Labels layer, then choose it under 'ground truth'.")
        if pred_layer is gt_layer:
            raise MetricsInputError("Prediction and ground truth are the same layer.")
        pred = in_memory_plane(pred_layer, "comparing with ground truth")
        # a stack's ground truth (a PanNuke fold's): the plane of the prediction (Segment's of one plane)
        gt = in_memory_plane(gt_layer, "comparing with ground truth", under=pred_layer)
        for layer, data in ((gt_layer, gt), (pred_layer, pred)):
            if data.ndim != 2:
                raise MetricsInputError(f"Metrics compare 2-D maps; '{layer.name}' has shape {data.shape}.")
        region, whole_gt = (slice(None), slice(None)), gt
        if pred.shape != gt.shape:
            region = region_in(pred_layer, pred.shape, gt_layer, gt.shape)
            if region is None:
                raise MetricsInputError(f"'{pred_layer.name}' has shape {pred.shape} but '{gt_layer.name}' {gt.shape}; "
                                        "compare a prediction with the ground truth of the same image.")
            gt = gt[region]  # a region's result: scored against the truth of that region
        self._region_note, outside = self._scored_part(pred_layer, region, pred.shape)
        if outside is not None:  # a polygon's result: the truth outside the polygon is not what it missed
            gt = np.where(outside, 0, gt)
        pred_names = self._prediction_classes(pred_layer, pred, gt)
        mask_value = _mask_value(pred, class_names(gt_layer)) if class_names(pred_layer) is None else 0
        if mask_value:  # e.g. another tool's 0/255 mask: nuclei, not class 255 (nor all 'other')
            pred, pred_names = (pred > 0).astype(np.uint8), list(NUCLEUS_CLASSES)
        truth = self._truth(gt_layer, gt, pred_names,
                            mask=f"'{pred_layer.name}' (one value, {mask_value}: a nucleus mask)" if mask_value else "")
        gt_inst = self.gt_instances.value
        if gt_inst is not None:
            truth.instances = _instance_map(gt_inst, gt_layer, whole_gt, under=pred_layer)[region]
            if outside is not None:
                truth.instances = np.where(outside, 0, truth.instances)
        pred_inst = self.pred_instances.value
        pred_instances = _instance_map(pred_inst, pred_layer, pred).copy() if pred_inst is not None else None
        if pred_instances is not None and id(pred_layer) in self._painted:
            before = self._unpainted[1] if self._unpainted is not None and self._unpainted[0] == id(pred_layer) \
                and self._unpainted[1].shape == pred.shape else None
            pred_instances = nuclei_following(pred_instances, pred, before)
        return truth, pred.copy(), pred_names, pred_instances

    @staticmethod
    def _scored_part(pred_layer, region: tuple[slice, slice], shape: tuple[int, int]) -> tuple[str, np.ndarray | None]:
        """What of the ground truth a region's result is scored on, in words, and the pixels outside
        the polygon it was drawn inside (``None`` for a rectangle or a whole image)."""
        if region[0].start is None:
            return "", None
        (rows, cols), (h, w) = region, shape
        where = f"{w} x {h} px from row {rows.start}, column {cols.start}"
        polygon = recorded_polygon(pred_layer.metadata)
        if polygon is None:
            return f"Scored on the region segmented only ({where} of the ground truth).", None
        outside = ~inside(polygon, Region(0, 0, w, h))
        return (f"Scored inside the polygon segmented only ({int((~outside).sum())} px of its box, {where}): "
                "the ground truth outside the polygon is left out."), outside

    def _prediction_classes(self, layer, pred: np.ndarray, gt: np.ndarray) -> list[str]:
        """The prediction's class names: its own; unnamed, the ground truth's where its ids fit them,
        else numbered up to the highest id of the two (of the ground truth only where that can be a
        class id: an unnamed instance map is nucleus-only ground truth)."""
        names = class_names(layer)
        top = class_map_top(layer.name, pred, names, instead=PREDICTION_INSTEAD)
        if names:
            return names
        gt_names = class_names(self.ground_truth.value)
        if gt_names and top < len(gt_names):
            return gt_names
        gt_top = int(gt.max(initial=0))
        return numbered_classes(max(top, gt_top if gt_top < CLASS_ID_LIMIT else 0))

    @staticmethod
    def _truth(layer, gt: np.ndarray, pred_names: list[str], mask: str = "") -> GroundTruth:
        """The ground truth as its layer names it; unnamed, as its values suggest (a class map with
        the prediction's classes, a nucleus mask or an instance map: ``ground_truth_from_label_map``).
        ``mask``: the prediction, unnamed, was read as a nucleus mask (said so): classes are merged."""
        names = class_names(layer)
        if names is not None and names == numbered_classes(len(names) - 1):
            # the reader's stand-in names of a label file opened alone ('class 1', ... 'class 255' for
            # a 0/255 mask): no classes anyone named, so the map is read for what it holds
            names = None
        if names is not None and len(names) > 2:
            class_map_top(layer.name, gt, names, instead=TRUTH_INSTEAD)
            if len(pred_names) == 2:  # a nucleus-only model's prediction, or a mask read so: nucleus vs background
                return merged_classes(GroundTruth(gt, names), because=f"the prediction {mask + ' ' if mask else ''}names none")
            return GroundTruth(gt, names)  # other classes than the prediction's: scored as nuclei (as_scored)
        if gt.min(initial=0) < 0:
            raise MetricsInputError(f"'{layer.name}' holds the negative id {int(gt.min())}; label ids are 0 "
                                    "(background) and up.")
        if names is not None:  # nucleus / background: any label > 0 is nucleus
            return GroundTruth((gt > 0).astype(np.uint8), list(NUCLEUS_CLASSES),
                               reading=f"nucleus vs background, the prediction {mask}" if mask else "")
        truth = ground_truth_from_label_map(gt, pred_names)
        if mask:
            truth.reading += f"; the prediction {mask}"
        return truth

    @staticmethod
    def _scored_maps(truth: GroundTruth, pred: np.ndarray, pred_names: list[str]):
        """(ground-truth class map, prediction, class names) as scored: classes merged into
        'nucleus' when the ground truth names none."""
        scored, truth, names, _ = as_scored(pred, pred_names, truth)
        return truth.class_map, scored, names

    def _overlay_layer(self):
        return next((l for l in labels_layers(self._viewer) if layer_kind(l) == "errors"), None)

    def compute(self, threaded: bool = False):
        """Fill the table; on bad input show why and leave the previous table as it was.

        ``threaded=True`` computes in a worker thread (as live recomputes do).
        """
        try:
            truth, pred, names, pred_instances = self._inputs()
        except MedsegError as exc:
            return self._fail(exc)
        # a shown overlay is redrawn with the scores: after painting it had kept the old errors
        overlay_choice = self.error_class.value if self._overlay_layer() is not None else None

        def job():
            report = compare_to_ground_truth(pred, names, truth, pred_instances)
            overlay = None
            if overlay_choice is not None:
                gt_map, pred_map, scored_names = self._scored_maps(truth, pred, names)
                choice = overlay_choice if overlay_choice in scored_names[1:] else ALL_CLASSES
                class_id = None if choice == ALL_CLASSES else scored_names.index(choice)
                overlay = (choice, class_id, error_map(gt_map, pred_map, len(scored_names), class_id))
            return report, overlay

        if not threaded:
            try:
                return self._show_with_overlay(job())
            except MedsegError as exc:
                return self._fail(exc)
        if self._worker is not None:
            self._worker.quit()
        self.summary.value = "Computing..."
        self._worker = start_worker(job, on_error=self._fail, returned=self._show_with_overlay)
        return self._worker

    def _show_with_overlay(self, result) -> dict:
        report, overlay = result
        if overlay is not None and self._overlay_layer() is not None:  # not removed meanwhile
            self._put_overlay(*overlay)
        return self._show(report)

    def _fail(self, error: BaseException | str) -> None:
        report_error(self.summary, error)

    def _show(self, report: dict) -> dict:
        rows, index = [], []
        for name, m in report["per_class"].items():
            index.append(name)
            rows.append([_cell(m["iou"]), _cell(m["dice"]), _cell(m["precision"]), _cell(m["recall"]),
                         _cell(m["pq"]), _cell(m["f1"]), m["tp"] + m["fn"], m["tp"] + m["fp"],
                         m["gt_objects"], m["pred_objects"]])
        o = report["overall"]
        index.append("overall (nuclei)")
        rows.append([_cell(o["miou"]), _cell(o["mean_dice"]), "", "", _cell(o["mpq"]), _cell(o["f1"]), "", "", "", ""])
        self.table.value = {"data": rows, "index": index, "columns": COLUMNS}
        self.table.native.resizeColumnsToContents()  # a few rows: 4-decimal columns, not 100 px each
        self.summary.value = (
            f"nucleus Dice {_cell(o['nucleus_dice'])} · mIoU {_cell(o['miou'])} · pixel accuracy {_cell(o['pixel_accuracy'])}\n"
            f"bPQ {_cell(o['bpq'])} · mPQ {_cell(o['mpq'])} · F1 {_cell(o['f1'])} · AJI {_cell(o['aji'])}\n"
            "Overall row: IoU/Dice = mean over nucleus classes; PQ = mPQ (classes present in the ground truth); "
            "F1 = detection F1 at IoU > 0.5, all nuclei."
        )
        merged = report.get("classes_merged")
        notes = [report["note"]] if report.get("note") else []
        notes += [note for note in (self._region_note, self._instances_note) if note]
        if notes:
            self.summary.value = "\n".join([*notes, self.summary.value])
        self._compared = {box: (getattr(self, box).value.name if getattr(self, box).value is not None else
                                "derived from the class map")
                          for box in ("prediction", "ground_truth", "gt_instances", "pred_instances")}
        self._compared["notes"] = notes
        self._metrics_text = self.summary.value
        pred_layer = self.prediction.value
        info = pred_layer.metadata.get(METADATA_KEY, {}) if pred_layer is not None else {}
        classes = list(NUCLEUS_CLASSES) if merged or not info.get("classes") else info["classes"]
        colors = None if merged or not info.get("colors") else info["colors"]
        self._class_legend = legend_html(classes, colors)
        self._show_legend()
        self.result = report
        return report

    def _show_legend(self) -> None:
        """The prediction's class colours, and under them the overlay's own colours, which differ
        (its vermilion false positives are not the orange of 'epithelial')."""
        parts = [self._class_legend, self._error_key if self._overlay_layer() is not None else ""]
        self.legend.value = "<br>".join(p for p in parts if p)

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        if self.result is None:
            return self._fail("Compute the metrics before exporting them.")
        value = self.table.value
        columns = {"class": list(value["index"])}
        for j, name in enumerate(value["columns"]):
            columns[name] = [row[j] for row in value["data"]]
        target = export_target(self.csv_path, path)
        if target is None:
            self.summary.value = "Nothing exported."
            return None
        replacing = target.exists()  # the user said yes to replacing it: its numbers file goes with it
        try:
            written = write_csv(target, columns)
        except OSError as exc:  # a folder that is not there or not writable: the user's to fix
            return self._fail(write_failure(target, exc))
        numbers = self._write_numbers(target.with_suffix(".json"), replacing)
        self.summary.value = f"Wrote the table ({len(columns['class'])} rows) to {written}" + numbers
        return written

    def _write_numbers(self, path: Path, replacing: bool) -> str:
        """Beside the table, every number of the panel (bPQ, AJI, nucleus Dice, pixel accuracy, mPQ+,
        the aggregations), its notes and the layers compared, as ``medseg evaluate --json`` writes them:
        the CSV had held the table alone. An existing file is replaced only with the table it belongs to."""
        if path.exists() and not replacing:
            return f"; {path.name} exists, left as it was"
        record = {**self.result, "compared": self._compared}
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_text(report_json(record)))
        except OSError as exc:
            return f"; not {path.name}: {write_failure(path, exc)}"
        return f", and all the numbers, notes and layers compared to {path.name}"

    # -- overlays -----------------------------------------------------------------------
    def show_errors(self):
        """Add (or update) a Labels layer with TP / FP / FN pixels in three distinct colours."""
        try:
            gt, pred, names = self._scored_maps(*self._inputs()[:3])
            choice = self.error_class.value
            if choice not in (None, ALL_CLASSES, *names[1:]):
                raise WidgetInputError(f"The layers have no class '{choice}'; choose one of {names[1:]}.")
            class_id = None if choice in (None, ALL_CLASSES) else names.index(choice)
            errors = error_map(gt, pred, len(names), class_id)
        except MedsegError as exc:
            return self._fail(exc)
        layer = self._put_overlay(choice or ALL_CLASSES, class_id, errors)
        self.summary.value = self._metrics_text  # the scores stay in view beside the overlay
        # the overlay over the image alone: under it the class colours and nucleus outlines had mixed with
        # its own (false negatives' sky blue beside spindle cyan outlines, pink over orange read as brown)
        for shown in (self.prediction.value, self.pred_instances.value, self.gt_instances.value, self.ground_truth.value):
            if shown is not None and shown.visible and shown is not layer:
                shown.visible = False
                self._hidden_by_overlay.append(shown)
        hidden = [l for l in dict.fromkeys(self._hidden_by_overlay) if l in self._viewer.layers and not l.visible]
        self._hidden_by_overlay = hidden
        if hidden:
            self.summary.value += "\n" + hidden_words(hidden, "the overlay")
        return layer

    def _put_overlay(self, choice: str, class_id: int | None, errors: np.ndarray):
        """Show ``errors`` in the overlay layer (made once, then updated in place) and key its colours."""
        from napari.utils.colormaps import DirectLabelColormap

        colors = {None: np.zeros(4), 0: np.zeros(4)}
        colors.update({k: np.array([*(np.asarray(c) / 255.0), 0.8]) for k, c in ERROR_COLORS.items()})
        name = f"errors: {choice}"
        features = {"index": [0, *ERROR_NAMES], "error": ["none", *ERROR_NAMES.values()]}
        meta = {METADATA_KEY: {"kind": "errors"}}
        existing = self._overlay_layer()
        pred_layer = self.prediction.value
        # on the prediction, wherever its image sits (µm, moved), on its plane of a stack only
        where = placement(pred_layer, ndim=pred_layer.ndim)
        errors = errors.reshape((1,) * (pred_layer.ndim - errors.ndim) + errors.shape)
        if existing is not None and existing.ndim != errors.ndim:  # napari cannot change a layer's ndim
            self._viewer.layers.remove(existing)
            existing = None
        if existing is not None:  # its scale, translate, affine and units all the new prediction's
            existing.data, existing.name = errors, name
            place(existing, where)
            layer = existing
        else:
            layer = self._viewer.add_labels(errors, name=name, colormap=DirectLabelColormap(color_dict=colors),
                                            features=features, metadata=meta, opacity=0.8, **where)
        self._error_key = self._overlay_key(name, error_counts(errors), class_id)
        self._show_legend()
        return layer

    @staticmethod
    def _overlay_key(name: str, counts: dict[str, int], class_id: int | None) -> str:
        items = [f'<span style="color:#{"".join(f"{c:02x}" for c in ERROR_COLORS[value])}; font-size:large">&#9632;'
                 f'</span>&nbsp;{label}: {counts[label]} px'
                 for value, label in ERROR_NAMES.items() if class_id is None or label != "wrong class"]
        return f"'{escape(name)}': " + " &nbsp; ".join(items)

    def _apply_visible_classes(self, visible=None):
        layer = self.prediction.value
        info = layer.metadata.get(METADATA_KEY, {}) if layer is not None else {}
        if not info.get("colors"):
            return
        shown = set(self.visible_classes.value)
        colors = [c if (i == 0 or name in shown) else None for i, (name, c) in enumerate(zip(info["classes"], info["colors"]))]
        layer.colormap = class_colormap(colors)
